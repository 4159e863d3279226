"""The distribution: one wheel holding every slice of the `laas` namespace, importable from anywhere;
installed without extras it is the client alone (no llama.cpp, no onnxruntime) and talks to a real
daemon; and the committed protobuf code matches the .proto files."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.daemon_process import DaemonProcess

ROOT = Path(__file__).resolve().parents[2]
# The daemon's packages (its `daemon` extra) and the exporters' heaviest: none is in a client install.
NOT_IN_THE_CLIENT = ("llama_cpp", "onnxruntime", "tokenizers", "numpy", "jinja2", "httpx", "prometheus_client",
                     "grpc_reflection", "torch", "transformers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    return next(dist.glob("laas-*.whl"))


def test_generated_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_installs_the_laas_namespace_and_runs_outside_the_repo(wheel: Path, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("laas/daemon/server.py", "laas/daemon/backends/gguf.py", "laas/client/api.py",
                     "laas/router/policy.py", "laas/v1/runtime_pb2.py", "laas/v1/runtime_pb2_grpc.py",
                     "laas/v1/runtime.proto", "laas/daemon/backends/onnx.py", "laas/exporters/pipeline.py",
                     "laas/exporters/data/heldout.txt"):
        assert expected in names, expected
    assert "laas/__init__.py" not in names  # a PEP 420 namespace package
    assert not [n for n in names if n.startswith(("daemon/", "router/", "protos/", "tests/"))]

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:  # install = unpack, for a pure-Python wheel
        zf.extractall(site)
    # The dependencies come from the development environment, through PYTHONPATH, which does not read
    # its .pth files: `laas` itself can only come from the wheel just installed.
    deps = sysconfig.get_paths()["purelib"]
    code = ("import laas, laas.daemon.server, laas.client, laas.router.policy, laas.v1.runtime_pb2 as pb;"
            "print(list(laas.__path__)); print(pb.DESCRIPTOR.package)")
    result = subprocess.run([python, "-c", code], cwd=tmp_path, env={"PYTHONPATH": deps},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert str(ROOT) not in result.stdout
    assert site in result.stdout and "laas.v1" in result.stdout


def test_the_wheel_without_extras_is_a_client_that_talks_to_a_real_daemon(wheel: Path, daemon: DaemonProcess,
                                                                         tmp_path: Path) -> None:
    env_dir = tmp_path / "client"
    venv.create(env_dir, with_pip=True)
    # Outside the repository, with no variable of this environment that would put its packages in reach.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAAS_", "PYTHON", "VIRTUAL_ENV"))}

    def run(*cmd: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)

    # The wheel alone, its requirements from the package index pip is configured with (binary only:
    # nothing of a client install may need a compiler).
    installed = run(env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--only-binary", ":all:",
                    "--find-links", wheel.parent, wheel, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    found = run(env_dir / "bin" / "python", "-c",
                "import importlib.util as u, sys, laas.client, laas.client.cli; "
                f"print([m for m in {NOT_IN_THE_CLIENT!r} if u.find_spec(m)]); "
                "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
                "(['laas', 'daemon'], ['laas', 'router'], ['laas', 'exporters']))); "
                "print(laas.client.__file__)")
    assert found.returncode == 0, found.stderr
    absent, imported, where = found.stdout.splitlines()
    assert absent == "[]" and imported == "[]"
    assert where.startswith(str(env_dir)), where

    laas: Sequence[str | Path] = (env_dir / "bin" / "laas", "--target", daemon.target)
    health = run(*laas, "health")
    assert (health.returncode, health.stdout) == (0, "SERVING\n"), health.stderr
    generated = run(*laas, "generate", "The capital of France is", "-n", "8", "-t", "0", "--stats")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip() and "prompt +" in generated.stderr  # tokens, then the --stats line

    # What is not installed says so, in one line, and how to get it.
    laasd = run(env_dir / "bin" / "laasd", "serve")
    assert laasd.returncode == 1 and laasd.stderr.count("\n") == 1, laasd.stderr
    assert "`daemon` extra" in laasd.stderr and "llama-cpp-python" in laasd.stderr
    assert "pip install 'laas[daemon]'" in laasd.stderr and "Traceback" not in laasd.stderr
    assert "not installed" in run(*laas, "--help").stdout
    export = run(*laas, "export", "model.gguf")
    assert export.returncode == 1 and "laas[daemon,export]" in export.stderr and "torch" in export.stderr
