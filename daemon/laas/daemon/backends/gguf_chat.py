"""The chat template of a GGUF model, rendered by llama-cpp-python's sandboxed Jinja environment.

Layer: infrastructure. The template is the one embedded in the file's metadata; its BOS/EOS tokens come
from the model's vocabulary. A template that refuses the messages is the caller's error (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from laas.daemon.engine import GenerationRequest
from laas.daemon.errors import InvalidArgument
from laas.daemon.gguf_header import GgufHeader


def chat_formatter(model: Any, header: GgufHeader) -> Callable[[list[dict[str, str]]], GenerationRequest] | None:
    """A renderer for the model's embedded chat template, in llama-cpp-python's sandboxed Jinja env.

    `model` is llama-cpp-python's LlamaModel (the vocabulary names the template's BOS/EOS tokens)."""
    template = header.chat_template
    if not template:
        return None
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token_id: int) -> str:
        return str(model.token_get_text(token_id)) if token_id >= 0 else ""

    formatter = Jinja2ChatFormatter(
        template=template, eos_token=token_text(model.token_eos()), bos_token=token_text(model.token_bos()),
        add_generation_prompt=True,
    )

    def render(messages: list[dict[str, str]]) -> GenerationRequest:
        try:
            result = formatter(messages=messages)  # type: ignore[arg-type]
        except (ValueError, jinja2.TemplateError) as e:  # the template's raise_exception, or a sandbox refusal
            raise InvalidArgument(f"messages: the model's chat template refused them: {e}", field="messages") from e
        stop = result.stop
        stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
        return GenerationRequest(prompt=result.prompt, template_stops=stops, add_special=not result.added_special)

    return render
