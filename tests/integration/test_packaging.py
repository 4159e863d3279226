"""The distribution: one wheel holding every slice of the `laas` namespace, importable from anywhere,
and the committed protobuf code matching the .proto files."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wheel_installs_the_laas_namespace_and_runs_outside_the_repo(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("laas-*.whl"))
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
