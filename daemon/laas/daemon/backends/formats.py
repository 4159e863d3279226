"""The model formats the daemon serves: one line per format.

Layer: infrastructure (the backend registry). A new format is one module that defines ``FORMAT`` (a
Backend: locate, describe, load; see backend.py) plus its line here. The table names modules rather
than importing them, so settings can check a `[[models]]` table's `format` against it without importing
any backend (which would import settings back), and a backend's module is imported only when a model of
its format is served (loader.py).
"""

from __future__ import annotations

FORMATS: dict[str, str] = {
    "gguf": "laas.daemon.backends.gguf_format",  # a .gguf file, run by llama.cpp
    "onnx": "laas.daemon.backends.onnx_format",  # a `laas export` package folder, run by onnxruntime
}
