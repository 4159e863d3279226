"""The real daemon under a stand-in for systemd: sd_notify over a real datagram socket (STATUS, READY
once SERVING, WATCHDOG pings, STOPPING), SIGHUP reloading the model list while a stream runs, and a
Unix socket whose file permissions decide who may connect."""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laas.client import Client
from laas.daemon.store import DEFAULT_MODEL
from tests.daemon_process import DaemonProcess
from tests.notify_socket import NotifySocket

MODEL_FILE = DEFAULT_MODEL.filename


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


def _wait_log(daemon: DaemonProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log}"
        time.sleep(0.02)


def test_notify_status_ready_watchdog_and_stopping(start_daemon: Callable[..., DaemonProcess],
                                                   notify: NotifySocket) -> None:
    daemon = start_daemon(wait_serving=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
    ready = notify.wait_for("READY", "1")
    assert daemon.health() == "SERVING"  # READY=1 only once health says SERVING
    assert ready["STATUS"] == "serving 1 model(s); default smollm2-135m-instruct"
    assert ready["MAINPID"] == str(daemon.proc.pid if daemon.proc else 0)
    statuses = [m["STATUS"] for _, m in notify.with_key("STATUS")]
    assert statuses.index("loading model smollm2-135m-instruct") < statuses.index(ready["STATUS"])

    for _ in range(4):  # the check runs every WATCHDOG_USEC / 2 = 0.2 s: four more pings come
        notify.wait_for("WATCHDOG", timeout=10, after=len(notify.messages))
    pings = notify.with_key("WATCHDOG")
    assert all(m["WATCHDOG"] == "1" for _, m in pings)

    daemon.signal(signal.SIGTERM)
    stopping = notify.wait_for("STOPPING", "1", timeout=10)
    assert stopping["STATUS"] == "draining 0 stream(s)"
    assert daemon.wait(30) == 0


def _models_config(*models: tuple[str, int], default: str) -> str:
    tables = "".join(f'[[models]]\nname = "{n}"\npath = "{MODEL_FILE}"\ncontext_length = {c}\n' for n, c in models)
    return f'default_model = "{default}"\n{tables}'


def test_sighup_reloads_the_model_list_without_dropping_streams(start_daemon: Callable[..., DaemonProcess],
                                                                 notify: NotifySocket) -> None:
    daemon = start_daemon(_models_config(("a", 512), default="a"), env={"NOTIFY_SOCKET": str(notify.path)})
    assert daemon.config is not None
    with Client(daemon.target) as client:
        stream = client.generate("Once upon a time", model="a", max_tokens=400, ignore_eos=True, temperature=0)
        first = next(stream)
        seen = len(notify.messages)
        daemon.config.write_text(_models_config(("a", 1024), ("b", 256), default="a"))
        daemon.signal(signal.SIGHUP)
        reloading_at = notify.wait_for("RELOADING", "1", after=seen)
        assert reloading_at["STATUS"] == "reloading the model list"
        ready = notify.wait_for("READY", "1", after=seen)
        assert ready["STATUS"] == "serving 2 model(s); default a"
        assert {m.name: m.context_length for m in client.models()} == {"a": 1024, "b": 256}
        assert client.complete("Hello", model="b", max_tokens=2).completion_tokens == 2

        rest = list(stream)  # the stream that began on the old "a" finishes whole
        assert rest[-1].finish_reason == "length" and rest[-1].completion_tokens == 400
        assert first.text + "".join(c.text for c in rest)
    _wait_log(daemon, "model a unloaded (replaced)")
    log = daemon.log
    assert "reloaded: added ['b'], changed ['a'], removed none" in log
    # The old engine was closed only after its stream ended (the access line is written at the end).
    assert log.index("reloaded:") < log.index("Runtime/Generate OK") < log.index("model a unloaded (replaced)")

    seen = len(notify.messages)
    daemon.config.write_text("default_model = [not toml\n")
    daemon.signal(signal.SIGHUP)
    assert notify.wait_for("READY", "1", after=seen)["STATUS"].startswith("reload failed: config ")
    assert "reload failed, the model list is unchanged" in daemon.log
    assert daemon.health() == "SERVING"
    with Client(daemon.target) as client:
        assert sorted(m.name for m in client.models()) == ["a", "b"]
    assert daemon.stop() == 0


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="laas-sock-"))  # short: sun_path holds at most 107 bytes
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def _connect_as(uid: int, groups: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Connects to a Unix socket as another user (setpriv), with the system Python (readable by all)."""
    code = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('connected')"
    ids = ["--reuid", str(uid), "--regid", str(uid)]
    ids += ["--groups", groups] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", *ids, "/usr/bin/python3", "-c", code, str(path)],
                          capture_output=True, text=True, check=False, cwd="/")


def test_unix_socket_serves_and_its_permissions_decide_who_connects(
        start_daemon: Callable[..., DaemonProcess], make_home: Callable[..., Path], socket_dir: Path) -> None:
    sock = socket_dir / "laasd.sock"
    with socket.socket(socket.AF_UNIX) as stale:  # a socket file left by a daemon that was killed
        stale.bind(str(sock))
    daemon = DaemonProcess(make_home(), listen=f"127.0.0.1:0,unix:{sock}").start()
    try:
        assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o660
        assert f"listening on unix:{sock} (mode 0660)" in daemon.log
        with Client(f"unix:{sock}") as client:
            assert client.health() == "SERVING"
            assert client.complete("Hello", max_tokens=3).completion_tokens == 3
        stranger = _connect_as(61234, "", sock)
        assert stranger.returncode != 0 and "PermissionError" in stranger.stderr
        group_member = _connect_as(61234, str(sock.stat().st_gid), sock)
        assert group_member.stdout.strip() == "connected", group_member.stderr
    finally:
        assert daemon.stop() == 0, daemon.log
    assert not sock.exists()  # removed on a clean stop

    config = socket_dir / "open.toml"
    config.write_text('socket_mode = "0666"\n')
    daemon = DaemonProcess(make_home(), config, listen=f"127.0.0.1:0,unix:{sock}").start()
    try:
        assert sock.stat().st_mode & 0o777 == 0o666
        assert _connect_as(61234, "", sock).stdout.strip() == "connected"
    finally:
        assert daemon.stop() == 0, daemon.log
    config.unlink()
