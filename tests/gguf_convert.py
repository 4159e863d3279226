"""A GGUF of a Hugging Face folder, made with llama.cpp's own converter (convert_hf_to_gguf.py), which ships
in the llama-cpp-python sdist of the version installed here (fetched once with pip, into the test cache)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter(cache: Path) -> Path:
    """The llama.cpp folder (converter, its conversion package, gguf-py) of the installed llama-cpp-python."""
    version = importlib.metadata.version("llama-cpp-python")
    root = cache / f"llama.cpp-{version}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    with tempfile.TemporaryDirectory(prefix="laas-sdist-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        "--disable-pip-version-check", "--dest", tmp, f"llama-cpp-python=={version}"],
                       check=True, capture_output=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        partial = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=cache))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(CONVERTER_PARTS) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(partial, members=members, filter="data")
        partial.rename(root)
    return root


def convert(folder: Path, out: Path, cache: Path, outtype: str = "f16") -> Path:
    """`folder` as a GGUF file at `out` (made once)."""
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    root = converter(cache)
    partial = out.with_suffix(".partial")
    env = dict(os.environ, PYTHONPATH=str(root / "gguf-py"))
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(partial),
                    "--outtype", outtype], check=True, capture_output=True, env=env)
    partial.rename(out)
    return out
