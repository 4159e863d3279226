"""The chat template of a GGUF model: compiled before llama.cpp loads the file, bound to its vocabulary after.

Layer: infrastructure. The template is the one embedded in the file's metadata (chat_template.py compiles
and renders it in a sandboxed worker process with a time and size budget); its BOS/EOS tokens come from the
model's vocabulary, which exists only once llama.cpp has loaded the model.
"""

from __future__ import annotations

from typing import Any

from laas.daemon.chat_template import ChatTemplate
from laas.daemon.gguf_header import GgufHeader


def compile_chat_template(header: GgufHeader, model_name: str) -> ChatTemplate | None:
    """The file's template, compiled (blocking); None if it has none. Raises ModelLoadError if it does not
    compile, so that a broken template fails the model before any native object exists."""
    source = header.chat_template
    return ChatTemplate(source, bos_token="", eos_token="", model=model_name) if source else None


def bind_tokens(template: ChatTemplate | None, model: Any) -> ChatTemplate | None:
    """Names the template's BOS/EOS tokens from `model` (llama-cpp-python's LlamaModel)."""
    if template is not None:
        def token_text(token_id: int) -> str:
            return str(model.token_get_text(token_id)) if token_id >= 0 else ""

        template.bos_token, template.eos_token = token_text(model.token_bos()), token_text(model.token_eos())
    return template
