"""packaging/systemd/laasd.service: `systemd-analyze verify` accepts it and `systemd-analyze security`
rates its exposure 2.5 or lower. (The installed unit is verified again in test_deb_package.py.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "packaging" / "systemd" / "laasd.service"
MAX_EXPOSURE = 2.5


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, check=False)


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at this checkout's laasd, change nothing else.
    laasd = Path(sys.executable).with_name("laasd")
    unit = tmp_path / "laasd.service"
    unit.write_text(UNIT.read_text().replace("/opt/laas/bin/laasd", str(laasd)))
    result = analyze("verify", str(unit))
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    unit = tmp_path / "laasd.service"
    unit.write_text(UNIT.read_text().replace("Type=notify", "Type=notifyy"))
    assert "Failed to parse service type" in analyze("verify", str(unit)).stderr


def test_security_exposure_is_at_most_2_5() -> None:
    result = analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for laasd.service: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout
    # The settings the issue names are there, and none is reported missing.
    text = UNIT.read_text()
    for setting in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=laas", "StateDirectory=laas",
                    "ConfigurationDirectory=laas", "RuntimeDirectory=laas", "LoadCredential=",
                    "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                    "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                    "SystemCallFilter=@system-service", "ExecReload=/bin/kill -HUP $MAINPID"):
        assert setting in text, setting
    for line in result.stdout.splitlines():
        if line.startswith("✗"):
            assert not re.match(r"✗ (User=|ProtectSystem=|ProtectHome=|PrivateTmp=|NoNewPrivileges=)", line), line
