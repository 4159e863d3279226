"""Real OpenAI-compatible servers for tests: llama-cpp-python's own `llama_cpp.server` on loopback (through
tests/openai_server.py, which maps OpenAI's structured-output and `required` tool-choice shapes onto it),
and an /v1/embeddings server computing real vectors with an ONNX embedding package."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

CLOUD_MODEL = "smol-cloud"
SERVER = Path(__file__).with_name("openai_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CloudServer:
    def __init__(self, model_file: Path, n_ctx: int = 8192, threads: int = 1) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER), "--model", str(model_file), "--model_alias", CLOUD_MODEL,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
             "--interrupt_requests", "False", "--verbose", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 120.0) -> CloudServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("llama_cpp.server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class EmbeddingCloud:
    """An OpenAI-compatible /v1/embeddings server on loopback (a thread of the test process) that computes
    real vectors with laas' embedding engine on an ONNX package, under the name `model`. Other model names
    get 404, as OpenAI answers them."""

    def __init__(self, package: Path, model: str) -> None:
        from laas.daemon.backends.onnx_embed import OnnxEmbeddingEngine

        self.model = model
        self.calls = 0
        self.engine = OnnxEmbeddingEngine.load_blocking(package, 1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        cloud = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(200, {"object": "list", "data": [{"id": cloud.model, "object": "model"}]})

            def do_POST(self) -> None:
                from laas.core.types import EmbeddingRequest

                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                if self.path != "/v1/embeddings" or body.get("model") != cloud.model:
                    self._answer(404, {"error": {"message": f"no model {body.get('model')!r}"}})
                    return
                cloud.calls += 1
                inputs = [i if isinstance(i, str) else tuple(i) for i in body["input"]]
                result = cloud.engine.embed_blocking(EmbeddingRequest(tuple(inputs)))
                self._answer(200, {"object": "list", "model": cloud.model,
                                   "data": [{"object": "embedding", "index": k, "embedding": list(e.vector)}
                                            for k, e in enumerate(result.embeddings)],
                                   "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
