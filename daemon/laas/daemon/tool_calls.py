"""Tool calls on the device: how tools reach a model's prompt, the constraint that forces a call, and
the parser that turns the model's output back into structured calls.

Layer: daemon (pure logic over domain types; json only).

Prompt. A chat template that uses the Jinja `tools` variable gets the tools (OpenAI's shape:
{"type": "function", "function": {name, description, parameters}}) and the history's calls and results
as it expects them (assistant `tool_calls`, `tool` messages with `tool_call_id`). Any other template
gets the generic format (the Hermes/Qwen one, which small models trained on tool use know):

- a system message listing the functions, one JSON object a line, and the instruction to call one as
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (merged into the first system
  message when there is one);
- an assistant message's calls as such blocks after its text;
- a `tool` message as a user message ``<tool_response>\\n...\\n</tool_response>``.

Constraint. tool_choice `required` (any of the tools) or a named function is a Lark grammar: one call
block whose JSON validates against {"name": <const>, "arguments": <the parameters' schema>}, name
first, so the call always parses and its arguments validate.

Parsing. With `auto` (and under the constraint) the output goes through :class:`ToolCallParser`: text
outside call blocks stays text; each ``<tool_call>`` block becomes a call: a ToolCallDelta with its id
and name as soon as the name is known, then fragments of its arguments as they are decoded; several
blocks are parallel calls. The finish reason becomes TOOL_CALLS when a call was made.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from laas.core.types import (
    ChatMessage,
    Completion,
    Constraint,
    ConstraintKind,
    FinishReason,
    GenerationChunk,
    TextDelta,
    Tool,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME_FIRST = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')

GENERIC_INTRO = ("You may call functions to answer. These are the functions, with the JSON schema of their "
                 "arguments:\n")
GENERIC_HOWTO = (f"\nTo call a function, answer with\n{OPEN}\n"
                 '{"name": "<function name>", "arguments": <the arguments as a JSON object>}\n'
                 f"{CLOSE}\n(one such block for each call).")


def template_uses_tools(source: str) -> bool:
    """Whether a chat template reads the `tools` variable (then it renders tools its own way)."""
    return re.search(r"\btools\b", source) is not None


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def openai_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": json.loads(t.parameters or "{}")}} for t in tools]


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as a tool-aware template reads them (arguments as objects, as Hugging Face's do)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                  for c in m.tool_calls]
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.name:
            item["name"] = m.name
        out.append(item)
    return out


def call_block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments or "{}"}}}\n{CLOSE}'


def generic_messages(messages: Sequence[ChatMessage], tools: Sequence[Tool]) -> list[ChatMessage]:
    """The conversation in the generic format, for a template that knows no tools (see the module doc)."""
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "tool":
            out.append(ChatMessage("user", f"<tool_response>\n{m.content}\n</tool_response>"))
        elif m.tool_calls:
            blocks = "\n".join(call_block(c.name, c.arguments) for c in m.tool_calls)
            out.append(ChatMessage("assistant", f"{m.content}\n{blocks}" if m.content else blocks))
        else:
            out.append(ChatMessage(m.role, m.content))
    if tools:
        listing = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                        "parameters": json.loads(t.parameters or "{}")}) for t in tools)
        system = GENERIC_INTRO + listing + GENERIC_HOWTO
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{system}")
        else:
            out.insert(0, ChatMessage("system", system))
    return out


def forced_call(tools: Sequence[Tool], choice: ToolChoice) -> Constraint | None:
    """The constraint that makes the output one call block (required, or the named function), else None."""
    if choice.mode is ToolChoiceMode.REQUIRED:
        chosen = list(tools)
    elif choice.mode is ToolChoiceMode.FUNCTION:
        chosen = [t for t in tools if t.name == choice.name]
    else:
        return None
    schemas = [{"type": "object", "properties": {"name": {"const": t.name},
                                                  "arguments": json.loads(t.parameters or "{}")},
                "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema: dict[str, Any] = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
    lark = f'start: "{OPEN}\\n" body "\\n{CLOSE}"\nbody: %json {json.dumps(schema)}\n'
    return Constraint(ConstraintKind.LARK, lark)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Turns a stream's text into text and tool calls (see the module doc). Feed it every chunk in order."""

    def __init__(self) -> None:
        self._buffer = ""  # text not yet released: a possible start of a block, or a block's body
        self._in_call = False
        self._calls = 0
        self._name_sent = False
        self._sent_arguments = 0  # characters of the body's arguments released as fragments
        self._arguments_start = 0

    @property
    def calls(self) -> int:
        return self._calls

    def feed(self, chunk: GenerationChunk) -> list[GenerationChunk]:
        if isinstance(chunk, Completion):
            out = self._flush()
            if self._calls and chunk.finish_reason is FinishReason.STOP:
                chunk = replace(chunk, finish_reason=FinishReason.TOOL_CALLS)
            return [*out, chunk]
        if not isinstance(chunk, TextDelta):
            return [chunk]
        self._buffer += chunk.text
        out = self._scan()
        if chunk.logprobs:  # the tokens' figures travel with whatever this text became
            if out and isinstance(out[0], TextDelta):
                out[0] = replace(out[0], logprobs=chunk.logprobs + out[0].logprobs)
            else:
                out.insert(0, TextDelta("", chunk.logprobs))
        return out

    def _scan(self) -> list[GenerationChunk]:
        out: list[GenerationChunk] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(OPEN)
                if at < 0:
                    cut = len(self._buffer) - _partial_suffix(self._buffer, OPEN)
                    text, self._buffer = self._buffer[:cut], self._buffer[cut:]
                    if text:
                        out.append(TextDelta(text))
                    return out
                if at and self._buffer[:at].strip():
                    out.append(TextDelta(self._buffer[:at].rstrip("\n")))
                self._buffer = self._buffer[at + len(OPEN):]
                self._in_call, self._name_sent, self._sent_arguments = True, False, 0
                continue
            end = self._buffer.find(CLOSE)
            body = self._buffer if end < 0 else self._buffer[:end]
            out += self._body(body, final=end >= 0)
            if end < 0:
                return out
            self._buffer = self._buffer[end + len(CLOSE):].lstrip("\n")
            self._in_call = False
            self._calls += 1

    def _body(self, body: str, final: bool) -> list[GenerationChunk]:
        out: list[GenerationChunk] = []
        if not self._name_sent:
            match = _NAME_FIRST.match(body)
            if match is not None:
                out.append(ToolCallDelta(self._calls, new_call_id(), json.loads(f'"{match.group(1)}"')))
                self._name_sent, self._arguments_start = True, match.end()
            elif final:  # not name first: the whole body, parsed at once
                return self._whole(body)
            else:
                return out
        arguments = body[self._arguments_start:]
        if final:
            arguments = arguments.rstrip()
            arguments = arguments[:-1].rstrip() if arguments.endswith("}") else arguments  # the call's own brace
            releasable = len(arguments)
        else:
            releasable = max(arguments.rfind("}"), 0)  # the last brace may be the call's own
        if releasable > self._sent_arguments:
            out.append(ToolCallDelta(self._calls, arguments=arguments[self._sent_arguments:releasable]))
            self._sent_arguments = releasable
        return out

    def _whole(self, body: str) -> list[GenerationChunk]:
        try:
            call = json.loads(body)
            name = call["name"]
            arguments = call.get("arguments", call.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError("name")
        except (ValueError, KeyError, TypeError, AttributeError):
            self._calls -= 1  # not a call after all: the model's text, as it wrote it
            return [TextDelta(f"{OPEN}{body}{CLOSE}")]
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return [ToolCallDelta(self._calls, new_call_id(), name), ToolCallDelta(self._calls, arguments=text)]

    def _flush(self) -> list[GenerationChunk]:
        """At the end: a block cut off (max_tokens) is text, as are held-back characters."""
        if self._in_call and not self._name_sent:
            text, self._buffer, self._in_call = OPEN + self._buffer, "", False
            return [TextDelta(text)]
        if self._in_call:
            out = self._body(self._buffer, final=True)
            self._buffer, self._in_call = "", False
            self._calls += 1
            return out
        text, self._buffer = self._buffer, ""
        return [TextDelta(text)] if text else []


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
