"""A model's own (Hugging Face style) chat template, compiled at load and rendered with a time and size budget.

Layer: infrastructure. Templates ship with models, so they are untrusted code: they compile and render in
jinja2's sandbox inside a worker process of their own (template_worker.py, template_process.py), which is
killed when a render overruns its time or memory budget, so a hostile template costs its own requests a
bounded wait and nothing else. Every engine renders chat through :func:`render_chat` (the one renderer), so
one template means the same prompt on each; an engine supplies the template's source and its BOS/EOS texts.

Errors: a template that does not compile fails its model at load (ModelLoadError, before any native object
exists); a template that refuses the messages (`raise_exception`) is the caller's error (InvalidArgument on
`messages`); any other failure of the template (an exception in its code, the time or size budget, the
worker dying) is the model's (ModelLoadError: FAILED_PRECONDITION, naming the model).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from laas.core.errors import InvalidArgument, ModelLoadError
from laas.core.types import ChatMessage, GenerationRequest, Tool
from laas.daemon.backends.literal_text import SpecialTexts
from laas.daemon.template_process import TemplateFailed, TemplateProcess, TemplateRefused
from laas.daemon.tool_calls import generic_messages, openai_tools, template_messages, template_uses_tools
from laas.daemon.validation import MAX_PROMPT_BYTES

MAX_TEMPLATE_BYTES = 1 << 20  # real templates are a few KiB (tool-calling ones ~20 KiB)
RENDER_TIMEOUT_S = 2.0  # real templates render in milliseconds
COMPILE_TIMEOUT_S = 10.0
MAX_RENDERED_BYTES = MAX_PROMPT_BYTES + (64 << 10)  # the messages' limit plus the template's own text


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str, eos_token: str, model: str = "",
                 timeout_s: float = RENDER_TIMEOUT_S) -> None:
        """Compiles `source` (blocking: call off the event loop); raises ModelLoadError if it does not."""
        self.model = model
        self._what = f"model {model!r}: its chat template" if model else "the model's chat template"
        size = len(source.encode("utf-8", "surrogatepass"))
        if size > MAX_TEMPLATE_BYTES:
            raise ModelLoadError(f"{self._what} is {size} bytes, more than {MAX_TEMPLATE_BYTES}")
        self.source = source
        self.uses_tools = template_uses_tools(source)  # else tools take the generic format (tool_calls.py)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._timeout_s = timeout_s
        self._waiting = asyncio.Lock()  # renders are one at a time per template (one worker)
        self._process = TemplateProcess(source, compile_timeout_s=COMPILE_TIMEOUT_S)
        try:
            self._process.compile()
        except TemplateFailed as e:
            raise ModelLoadError(f"{self._what} does not parse: {e}") from e

    def bind(self, *, bos_token: str, eos_token: str) -> None:
        """Names the BOS/EOS texts once the model's vocabulary is known (a GGUF model's, after llama.cpp loads)."""
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        """The prompt (special tokens written by the template itself) and the template's stop string.
        Tools (and the history's calls and results) go to a template that reads `tools`, else they take
        the generic format. Blocks up to the time budget: call off the event loop (or use :meth:`arender`)."""
        context: dict[str, object] = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        if self.uses_tools:
            context["messages"] = template_messages(messages)
            if tools:
                context["tools"] = openai_tools(tools)
        else:
            context["messages"] = template_messages(generic_messages(messages, tools))
        try:
            prompt = self._process.render(context, limit=MAX_RENDERED_BYTES, timeout_s=self._timeout_s)
        except TemplateRefused as e:
            raise InvalidArgument(f"messages: the model's chat template refused them: {e}", field="messages") from e
        except TemplateFailed as e:
            raise ModelLoadError(f"{self._what} failed: {e}") from e
        stops = (self.eos_token,) if self.eos_token else ()
        return GenerationRequest(prompt=prompt, template_stops=stops, add_special=False)

    async def arender(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        """:meth:`render` in a thread; callers wait here, not in threads, so a slow template holds one thread."""
        async with self._waiting:
            return await asyncio.to_thread(self.render, messages, tools)

    def close(self) -> None:
        """Stops the worker process (a later render starts another)."""
        self._process.close()


def compile_template(source: str | None, *, model: str, bos_token: str = "", eos_token: str = ""
                     ) -> ChatTemplate | None:
    """The model's template compiled (blocking), None when it ships none; ModelLoadError if it does not compile,
    so that a broken template fails the model before any native object exists."""
    return ChatTemplate(source, bos_token=bos_token, eos_token=eos_token, model=model) if source else None


async def render_chat(template: ChatTemplate | None, messages: Sequence[ChatMessage], specials: SpecialTexts,
                      model: str, tools: Sequence[Tool] = ()) -> GenerationRequest:
    """An engine's render_chat: message contents' special-token texts stay text (literal_text.py), the
    template renders off the event loop within its time budget."""
    if template is None:
        raise ModelLoadError(f"model {model!r} has no chat template")
    return await template.arender(specials.mark_messages(messages), tools)
