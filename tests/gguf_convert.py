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


def requantize(model: Path, weights: str, out: Path) -> Path:
    """`out`: a copy of the GGUF `model` with its weights in `weights` (q8_0 or f16), written by llama.cpp's
    own quantizer (llama_model_quantize, in this process) unless it is there already."""
    import ctypes

    import llama_cpp

    if out.is_file():
        return out
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[weights]
    params.allow_requantize = True
    partial = out.with_name(f".{out.name}.partial")
    if llama_cpp.llama_model_quantize(str(model).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize could not write {out}")
    partial.rename(out)
    return out
