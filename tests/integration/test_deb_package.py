"""The Debian package: built by packaging/deb/build.sh, inspected (files, control, maintainer scripts,
unit), checked by lintian, run from its files under the unit's sandbox approximated (this machine has
no systemd as PID 1: bubblewrap gives a read-only root except the state and runtime directories,
setpriv a non-root user without capabilities), then installed, removed and purged with dpkg."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from laas.client import Client
from laas.daemon.store import DEFAULT_MODEL
from tests.notify_socket import NotifySocket

ROOT = Path(__file__).resolve().parents[2]
UID = 61234  # an unprivileged uid with no account, like DynamicUser's
# Building the package builds its portable llama.cpp (every CPU variant) once: long on 2 cores, then cached.
pytestmark = pytest.mark.timeout(3600)
# A CPU with fewer features than any machine that builds the package, and the variant ggml must pick there.
LESSER_CPU = {"x86_64": ("Haswell", "haswell"), "aarch64": ("cortex-a53", "armv8.0_1")}[platform.machine()]


def run(*cmd: str, check: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if check:
        assert result.returncode == 0, f"{cmd}: {result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    result = run("bash", str(ROOT / "packaging" / "deb" / "build.sh"), str(out))
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.parent == out and re.fullmatch(r"laas_\d+\.\d+\.\d+-1_\w+\.deb", path.name)
    return path


@pytest.fixture(scope="module")
def extracted(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deb-root")
    run("dpkg-deb", "-x", str(deb), str(root))
    run("dpkg-deb", "-e", str(deb), str(root / "DEBIAN"))
    return root


def test_contents_control_and_maintainer_scripts(deb: Path, extracted: Path) -> None:
    listing = run("dpkg-deb", "-c", str(deb)).stdout
    files = {line.split()[-1].removeprefix(".") for line in listing.splitlines() if not line.endswith("/")}
    files |= {line.split()[-3].removeprefix(".") for line in listing.splitlines() if " -> " in line}
    for expected in ("/opt/laas/bin/laasd", "/opt/laas/bin/laas", "/opt/laas/pyvenv.cfg",
                     "/lib/systemd/system/laasd.service", "/etc/laas/laasd.toml", "/usr/bin/laas",
                     "/usr/share/doc/laas/copyright", "/usr/share/doc/laas/changelog.Debian.gz",
                     "/usr/share/lintian/overrides/laas"):
        assert expected in files, expected
    assert any(f.startswith("/opt/laas/lib/python3") and f.endswith("/laas/daemon/server.py") for f in files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert all(line.split()[1] == "root/root" for line in listing.splitlines())

    # The unit and the default config are the repository's, byte for byte.
    assert (extracted / "lib/systemd/system/laasd.service").read_bytes() == \
        (ROOT / "packaging/systemd/laasd.service").read_bytes()
    assert (extracted / "etc/laas/laasd.toml").read_bytes() == (ROOT / "packaging/laasd.toml").read_bytes()
    # The venv points at /opt/laas (where it will live), not at the build directory.
    for script in ("laasd", "laas"):
        assert (extracted / "opt/laas/bin" / script).read_text().startswith("#!/opt/laas/bin/python\n")
    assert os.readlink(extracted / "opt/laas/bin/python3").startswith("/usr/bin/python3")

    control = (extracted / "DEBIAN/control").read_text()
    assert re.search(r"^Depends: python3 \(>= 3\.\d+\), python3 \(<< 3\.\d+\), adduser, init-system-helpers",
                     control, flags=re.M)
    assert (extracted / "DEBIAN/conffiles").read_text().split() == ["/etc/laas/laasd.toml"]
    postinst = (extracted / "DEBIAN/postinst").read_text()
    assert "adduser --system" in postinst and "deb-systemd-helper enable laasd.service" in postinst
    assert "deb-systemd-invoke start laasd.service" in postinst
    prerm = (extracted / "DEBIAN/prerm").read_text()
    assert "deb-systemd-invoke stop laasd.service" in prerm
    postrm = (extracted / "DEBIAN/postrm").read_text()
    purge = postrm[postrm.index('if [ "$1" = "purge" ]'):]
    assert "rm -rf /var/lib/laas" in purge and "rm " not in postrm[:postrm.index(purge)]  # models: purge only
    for script in ("postinst", "prerm", "postrm"):
        run("sh", "-n", str(extracted / "DEBIAN" / script))
        assert (extracted / "DEBIAN" / script).stat().st_mode & 0o111


def test_lintian_is_clean_with_only_explained_overrides(deb: Path) -> None:
    result = run("lintian", "--tag-display-limit", "0", str(deb), check=False)
    tags = [line for line in result.stdout.splitlines() if re.match(r"[EWX]: ", line)]
    assert result.returncode == 0 and not tags, result.stdout + result.stderr
    overrides = (ROOT / "packaging/deb/lintian-overrides").read_text().splitlines()
    for i, line in enumerate(overrides):  # every override follows a comment that says why
        if line.startswith("laas: "):
            assert any(prev.startswith("# ") for prev in overrides[max(0, i - 3):i]), line


@pytest.fixture
def sandbox_dirs(model_file: Path) -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="laas-sbx-"))  # short paths: the socket's must fit sun_path
    state, runtime = base / "state", base / "run"
    (state / "models").mkdir(parents=True)
    runtime.mkdir()
    shutil.copyfile(model_file, state / "models" / DEFAULT_MODEL.filename)
    for path in (state, state / "models", state / "models" / DEFAULT_MODEL.filename, runtime):
        os.chown(path, UID, UID)
    state.chmod(0o750)
    runtime.chmod(0o750)
    yield state, runtime
    shutil.rmtree(base)


def _unit_values(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.splitlines() if line.startswith(f"{key}=")]


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def test_packaged_daemon_serves_in_the_units_sandbox_approximated(
        extracted: Path, sandbox_dirs: tuple[Path, Path], notify: NotifySocket) -> None:
    state, runtime = sandbox_dirs
    unit = (extracted / "lib/systemd/system/laasd.service").read_text()
    assert _unit_values(unit, "User") == ["laas"] and _unit_values(unit, "ProtectSystem") == ["strict"]
    environ = {"PATH": "/usr/bin:/bin", "STATE_DIRECTORY": "/var/lib/laas", "RUNTIME_DIRECTORY": "/run/laas",
               "CONFIGURATION_DIRECTORY": "/run/laas-config", "NOTIFY_SOCKET": "/run/laas/notify.sock"}
    for assignments in _unit_values(unit, "Environment"):
        environ |= dict(a.split("=", 1) for a in assignments.split())
    exec_start = _unit_values(unit, "ExecStart")[0].replace("${CONFIGURATION_DIRECTORY}", "/run/laas-config")
    os.rename(notify.path, runtime / "notify.sock")
    notify.path = runtime / "notify.sock"
    notify.path.chmod(0o666)
    # Not --unshare-pid: MAINPID in READY=1 must be the host's pid, to send the daemon SIGTERM.
    bwrap = ["bwrap", "--die-with-parent", "--unshare-ipc", "--unshare-net",
             "--ro-bind", "/", "/",  # ProtectSystem=strict: all read-only ...
             "--tmpfs", "/tmp", "--tmpfs", "/root", "--tmpfs", "/home",  # PrivateTmp, ProtectHome
             "--proc", "/proc", "--dev", "/dev",  # PrivateDevices
             "--tmpfs", "/opt", "--ro-bind", str(extracted / "opt/laas"), "/opt/laas",
             "--tmpfs", "/var/lib", "--bind", str(state), "/var/lib/laas",  # ... but StateDirectory
             "--tmpfs", "/run", "--bind", str(runtime), "/run/laas",  # and RuntimeDirectory
             "--ro-bind", str(extracted / "etc/laas"), "/run/laas-config",
             "--clearenv", *[x for k, v in environ.items() for x in ("--setenv", k, v)],
             "--", "setpriv", "--reuid", str(UID), "--regid", str(UID), "--clear-groups", "--no-new-privs",
             "--inh-caps=-all", "--bounding-set=-all", *exec_start.split()]
    with subprocess.Popen(bwrap, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        try:
            ready = notify.wait_for("READY", "1", timeout=120)
            assert ready["STATUS"] == "serving 1 model(s); default smollm2-135m-instruct"
            sock = runtime / "laasd.sock"  # the default under systemd: RUNTIME_DIRECTORY/laasd.sock
            assert sock.is_socket() and sock.stat().st_uid == UID and sock.stat().st_mode & 0o777 == 0o660
            with Client(f"unix:{sock}") as client:
                assert client.health() == "SERVING"
                reply = client.complete("The capital of France is", max_tokens=4, temperature=0)
                assert reply.completion_tokens == 4 and reply.text
            probe = [*bwrap[:bwrap.index("--clearenv")], "--", "setpriv", "--reuid", str(UID), "--regid", str(UID),
                     "--clear-groups", "sh", "-c", "touch /var/lib/laas/ok && ! touch /etc/laas-probe 2>/dev/null"
                     " && ! touch /opt/laas/probe 2>/dev/null && ! touch /usr/probe 2>/dev/null"]
            run(*probe)  # the same sandbox lets the user write its state, and nothing else
            assert (state / "ok").is_file()
        finally:
            messages = notify.with_key("MAINPID")
            if messages:
                os.kill(int(messages[0][1]["MAINPID"]), signal.SIGTERM)  # what `systemctl stop` does
            else:
                proc.terminate()
            _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert notify.wait_for("STOPPING", "1", timeout=5)["STATUS"] == "draining 0 stream(s)"
    assert "<6>" not in err and "listening on 127.0.0.1:7734 (port 7734)" in err
    assert "listening on unix:/run/laas/laasd.sock (mode 0660)" in err
    assert not list((extracted / "opt/laas").rglob("__pycache__"))  # nothing written to /opt


def test_install_enable_remove_keeps_models_and_purge_cleans_up(deb: Path) -> None:
    assert run("dpkg-query", "-W", "-f=${Status}", "laas", check=False).stdout.find("installed") < 0, \
        "laas is already installed on this machine: the test would disturb it"
    wants = Path("/etc/systemd/system/multi-user.target.wants/laasd.service")
    try:
        run("dpkg", "-i", str(deb))
        assert run("getent", "passwd", "laas").stdout.split(":")[5] == "/var/lib/laas"
        assert wants.is_symlink()  # postinst enabled the service
        assert Path("/etc/laas/laasd.toml").is_file()
        models = Path("/var/lib/laas/models")
        assert models.is_dir() and models.stat().st_uid == int(run("id", "-u", "laas").stdout)
        verify = run("systemd-analyze", "verify", "/lib/systemd/system/laasd.service", check=False)
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        assert "serve" in run("/usr/bin/laas", "--help").stdout + run("/opt/laas/bin/laasd", "--help").stdout
        (models / "downloaded.gguf").write_bytes(b"GGUF")

        run("dpkg", "-r", "laas")
        assert not Path("/opt/laas/bin").exists() and not Path("/usr/bin/laas").exists()
        assert (models / "downloaded.gguf").read_bytes() == b"GGUF"  # models survive a remove
        assert Path("/etc/laas/laasd.toml").is_file()  # and so does the conffile
        assert not wants.exists()

        run("dpkg", "-P", "laas")
        assert not Path("/var/lib/laas").exists() and not Path("/etc/laas").exists()
        assert not Path("/opt/laas").exists()
    finally:
        run("dpkg", "-P", "laas", check=False)


def _doctor_in_sandbox(extracted: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The packaged `laasd doctor`, run from the package's own files at /opt/laas."""
    sandbox = ["bwrap", "--die-with-parent", "--unshare-net", "--ro-bind", "/", "/", "--tmpfs", "/tmp",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/opt", "--ro-bind", str(extracted / "opt/laas"),
               "/opt/laas", "--tmpfs", "/var/lib", "--bind", str(state), "/var/lib/laas", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
               "--", "/opt/laas/bin/laasd", "--home", "/var/lib/laas", "doctor", *args]
    return subprocess.run(sandbox, capture_output=True, text=True, timeout=2400, check=False)


def test_packaged_llama_cpp_is_portable_and_picks_its_kernels_at_run_time(
        extracted: Path, sandbox_dirs: tuple[Path, Path]) -> None:
    state, _runtime = sandbox_dirs
    lib = next((extracted / "opt/laas/lib").glob("python3*/site-packages/llama_cpp/lib"))
    variants = {p.name.removeprefix("libggml-cpu-").removesuffix(".so") for p in lib.glob("libggml-cpu-*.so")}
    assert LESSER_CPU[1] in variants and "sapphirerapids" not in variants  # ggml's AMX kernels left out
    assert not (lib / "libggml-cpu.so").exists()  # no single CPU backend built for the build machine
    assert "-portable-" in (extracted / "opt/laas/llama-build.txt").read_text()

    here = _doctor_in_sandbox(extracted, state)
    assert here.returncode == 0, here.stdout + here.stderr
    picked = re.search(r"with CPU backend (\S+)", here.stdout)
    assert picked and picked[1] in variants, here.stdout

    # The same files on a CPU with fewer features than this one: qemu's user-mode emulation.
    lesser = _doctor_in_sandbox(extracted, state, "--cpu", LESSER_CPU[0])
    assert lesser.returncode == 0, lesser.stdout + lesser.stderr
    assert f"with CPU backend {LESSER_CPU[1]}" in lesser.stdout and "decoded " in lesser.stdout
