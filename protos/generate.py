"""Regenerates the committed protobuf/gRPC code of laas.v1; `--check` fails if it is stale.

Usage: python protos/generate.py [--check]   (needs the `dev` extra: grpcio-tools, mypy-protobuf)
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = Path("laas/v1")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / PACKAGE).glob("*.proto"))
    bin_dir = Path(sys.executable).parent
    plugins = [f"--plugin=protoc-gen-{name}={bin_dir / f'protoc-gen-{name}'}" for name in ("mypy", "mypy_grpc")]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", *plugins, f"--python_out={out}",
         f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}", *protos],
        check=True, cwd=ROOT,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = sorted((Path(tmp) / PACKAGE).glob("*_pb2*"))
        stale = [p.name for p in fresh if not (ROOT / PACKAGE / p.name).exists()
                 or not filecmp.cmp(p, ROOT / PACKAGE / p.name, shallow=False)]
        if args.check:
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run python protos/generate.py")
                return 1
            print("generated code is up to date")
            return 0
        for p in fresh:
            shutil.copyfile(p, ROOT / PACKAGE / p.name)
        print(f"wrote {', '.join(p.name for p in fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
