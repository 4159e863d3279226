"""Chat templates shipped with models compile at load and render in a sandboxed worker with a time and size
budget: a refusal (`raise_exception`) is the caller's error, any other failure the model's."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from laas.core.errors import InvalidArgument, ModelLoadError
from laas.core.types import ChatMessage
from laas.daemon.chat_template import MAX_RENDERED_BYTES, ChatTemplate

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
USER = [ChatMessage("user", "x")]
FOREVER_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


def test_renders_with_the_generation_prompt_and_the_eos_stop() -> None:
    request = ChatTemplate(CHATML, bos_token="<s>", eos_token="<|im_end|>").render([ChatMessage("user", "Hi")])
    assert request.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert request.template_stops == ("<|im_end|>",) and request.add_special is False


def test_hugging_face_extras_render() -> None:
    template = ChatTemplate("{% generation %}{{ bos_token }}{{ messages | tojson }}{% endgeneration %}"
                            "{{ strftime_now('%Y') | length }}", bos_token="<s>", eos_token="")
    assert template.render(USER).prompt == '<s>[{"role": "user", "content": "x"}]4'


def test_raise_exception_becomes_invalid_argument_on_messages() -> None:
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}",
                            bos_token="", eos_token="")
    with pytest.raises(InvalidArgument, match="user first") as error:
        template.render([ChatMessage("assistant", "x")])
    assert error.value.field == "messages"


@pytest.mark.parametrize("source", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch /tmp/laas-pwned').read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
    "{{ messages.append.__self__.__class__.__dict__ }}",
    "{% set x = messages.append({'role': 'user'}) %}{{ x }}",
])
def test_the_sandbox_refuses_reaching_python_internals(source: str) -> None:
    with pytest.raises(ModelLoadError, match=r"model 'm\.gguf': its chat template failed: SecurityError"):
        ChatTemplate(source, bos_token="", eos_token="", model="m.gguf").render(USER)
    assert not Path("/tmp/laas-pwned").exists()


@pytest.mark.parametrize("source", ["{% for %}", "{{ x", "{% if %}{% endfor %}"])
def test_a_template_that_does_not_parse_fails_the_model(source: str) -> None:
    with pytest.raises(ModelLoadError, match="does not parse: TemplateSyntaxError"):
        ChatTemplate(source, bos_token="", eos_token="")


@pytest.mark.parametrize(("source", "why"), [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% for i in range(100001) %}{% endfor %}", "OverflowError"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
    ("{{ messages.x.y }}", "UndefinedError"),
    ("{{ '\\ud800' }}", "UnicodeEncodeError"),  # a prompt that cannot be tokenized
    ("{% set s = 'x' * 4000000000 %}{{ s | length }}", "memory"),
])
def test_a_failing_template_is_the_models_error_not_internal(source: str, why: str) -> None:
    template = ChatTemplate(source, bos_token="", eos_token="", model="m.gguf")
    with pytest.raises(ModelLoadError, match=r"model 'm\.gguf': its chat template failed") as error:
        template.render(USER)
    assert why in str(error.value) and type(error.value) is ModelLoadError
    template.close()


def test_the_rendered_prompt_is_bounded() -> None:
    template = ChatTemplate("{% for i in range(100000) %}{{ messages[0].content * 20 }}{% endfor %}",
                            bos_token="", eos_token="", model="m.gguf")
    with pytest.raises(ModelLoadError, match=f"exceeds {MAX_RENDERED_BYTES} bytes"):
        template.render(USER)
    ok = ChatTemplate(CHATML, bos_token="", eos_token="").render([ChatMessage("user", "y" * (1 << 20))])
    assert len(ok.prompt) > 1 << 20  # a full-size request still renders


def test_a_template_that_runs_forever_is_stopped_within_its_budget() -> None:
    template = ChatTemplate(FOREVER_LOOP + "{{ messages }}", bos_token="", eos_token="", model="m.gguf",
                            timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"time budget of 0\.5 s"):
        template.render(USER)
    assert time.monotonic() - started < 10
    killed = template._process._proc  # the worker was killed, not left running
    assert killed is None
    with pytest.raises(ModelLoadError, match="time budget"):  # a fresh worker, the same budget
        template.render(USER)
    template.close()


def test_an_oversized_template_fails_the_model() -> None:
    with pytest.raises(ModelLoadError, match="more than"):
        ChatTemplate("x" * (2 << 20), bos_token="", eos_token="")


def test_a_worker_that_grows_past_the_memory_bound_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where setrlimit is forbidden (systemd's SystemCallFilter=~@resources), the daemon's RSS poll bounds it."""
    from laas.daemon import template_process

    monkeypatch.setattr(template_process, "MAX_RSS", 200 << 20)
    template = ChatTemplate("{% set s = messages[0].content * 400000000 %}" + FOREVER_LOOP, bos_token="",
                            eos_token="", model="m", timeout_s=60)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="more than 200 MiB of memory"):
        template.render(USER)
    assert time.monotonic() - started < 30 and template._process._proc is None


async def test_renders_waiting_for_a_slow_template_hold_no_threads() -> None:
    """Requests to a model whose template runs to its budget wait on the event loop, not in the thread pool
    that every other blocking call of the daemon shares."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    template = ChatTemplate(FOREVER_LOOP, bos_token="", eos_token="", model="m", timeout_s=1.0)
    renders = [asyncio.ensure_future(template.arender(USER)) for _ in range(4)]
    await asyncio.sleep(0)  # the renders start: one thread renders, three wait on the loop
    started = time.monotonic()
    assert await asyncio.to_thread(lambda: 7) == 7
    assert time.monotonic() - started < 0.5, "the pool was full of waiting renders"
    for result in await asyncio.gather(*renders, return_exceptions=True):
        assert isinstance(result, ModelLoadError)
    template.close()
