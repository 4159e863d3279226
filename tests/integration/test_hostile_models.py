"""Model files that pass the format checks but would abort llama.cpp, and hostile chat templates, served by a
real daemon beside the default model (issue 13, items 3 and 4): each is refused with FAILED_PRECONDITION and a
reason that names the key or the model; health checks answer while a template runs; the default model serves."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from laas.client import Client
from laas.daemon.store import DEFAULT_MODEL
from tests.daemon_process import DaemonProcess
from tests.gguf_edit import edit_gguf
from tests.integration.test_errors import _error

FOREVER = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages }}"
HOSTILE: dict[str, dict[str, str | bool | int | float]] = {
    "no-layers": {"llama.block_count": 0},
    "nan-eps": {"llama.attention.layer_norm_rms_epsilon": math.nan},
    "huge-ctx": {"llama.context_length": 0xFFFFFFFF},
    "bad-syntax": {"tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }"},
    "divides-by-zero": {"tokenizer.chat_template": "{{ 1 / 0 }}"},
    "runs-forever": {"tokenizer.chat_template": FOREVER},
}


def test_hostile_model_files_are_refused_and_the_default_model_serves(
        start_daemon: Callable[..., DaemonProcess], make_home: Callable[..., Any]) -> None:
    home = make_home()
    real = home / "models" / DEFAULT_MODEL.filename
    config = ""
    for name, changes in HOSTILE.items():
        edit_gguf(real, home / "models" / f"{name}.gguf", changes)
        config += f'[[models]]\nname = "{name}"\npath = "{name}.gguf"\ncontext_length = 512\n\n'
    daemon = start_daemon(config, home=home)
    with Client(daemon.target) as client:
        models = {m.name: m for m in client.models()}
        for name, key in (("no-layers", "llama.block_count"), ("nan-eps", "llama.attention.layer_norm_rms_epsilon"),
                          ("huge-ctx", "llama.context_length")):
            assert models[name].state == "failed" and key in models[name].error, models[name]
            error = _error(lambda name=name: client.generate("Hi", model=name, max_tokens=2))  # type: ignore[misc]
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION and key in str(error)

        # (a) a template that does not compile fails its model at load, with the reason, and stays failed
        for _ in range(3):
            error = _error(lambda: client.chat([("user", "Hi")], model="bad-syntax", max_tokens=2))
            assert error.code == grpc.StatusCode.FAILED_PRECONDITION, error
            assert "bad-syntax.gguf" in str(error) and "does not parse" in str(error)
        failed = client.model("bad-syntax")
        assert failed.state == "failed" and "does not parse" in failed.error and not failed.loaded

        # (b) an exception in the template's code is the model's error, not INTERNAL
        error = _error(lambda: client.chat([("user", "Hi")], model="divides-by-zero", max_tokens=2))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "ZeroDivisionError" in str(error)
        assert "divides-by-zero.gguf" in str(error)

        # (c) a template that runs forever is stopped at its budget; health checks answer meanwhile
        client.load_model("runs-forever")  # loaded first: the timings below are the render's alone
        done, slowest = threading.Event(), [0.0]

        def probe() -> None:
            for _ in range(10_000):
                if done.is_set():
                    return
                started = time.monotonic()
                assert client.health(timeout=10) == "SERVING"
                slowest[0] = max(slowest[0], time.monotonic() - started)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            started = time.monotonic()
            error = _error(lambda: client.chat([("user", "Hi")], model="runs-forever", max_tokens=2, timeout=60))
            took = time.monotonic() - started
        finally:
            done.set()
            prober.join()
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "time budget" in str(error), error
        assert took < 30, took
        assert slowest[0] < 1.0, f"a health check waited {slowest[0]:.2f} s during the render"

        # the default model serves throughout
        assert client.complete("Hello", max_tokens=3, temperature=0).completion_tokens == 3
        reply = "".join(c.text for c in client.chat([("user", "Hi")], max_tokens=3) if hasattr(c, "text"))
        assert reply
