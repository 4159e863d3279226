"""A model's own (Hugging Face style) chat template, rendered in a sandboxed Jinja environment.

Layer: domain. Templates ship with models, so they are untrusted code: they render in jinja2's
ImmutableSandboxedEnvironment with the settings Hugging Face and llama-cpp-python use (trim_blocks,
lstrip_blocks, `raise_exception`, `tojson`), so one template means the same prompt on every engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from laas.daemon.engine import ChatMessage, GenerationRequest
from laas.daemon.errors import InvalidArgument, ModelLoadError


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"the model's chat template does not parse: {e}") from e
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[ChatMessage]) -> GenerationRequest:
        """The prompt (special tokens written by the template itself) and the template's stop string."""
        try:
            prompt = self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                bos_token=self.bos_token, eos_token=self.eos_token, add_generation_prompt=True,
            )
        except (_TemplateRaised, jinja2.TemplateError, TypeError, ValueError) as e:
            raise InvalidArgument(f"messages: the model's chat template refused them: {e}", field="messages") from e
        stops = (self.eos_token,) if self.eos_token else ()
        return GenerationRequest(prompt=prompt, template_stops=stops, add_special=False)
