"""The tool-call parser (streamed model output -> structured calls), the generic prompt format and the
forcing constraint (pure logic; the real model's calls are tested in tests/integration)."""

from __future__ import annotations

import json

import pytest

from laas.core.types import (
    ChatMessage,
    Completion,
    ConstraintKind,
    FinishReason,
    GenerationChunk,
    TextDelta,
    Timings,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
    Usage,
)
from laas.daemon import constraints
from laas.daemon.tool_calls import ToolCallParser, forced_call, generic_messages, template_uses_tools

END = Completion(FinishReason.STOP, Usage(1, 1), Timings())


def _parse(pieces: list[str]) -> list[GenerationChunk]:
    parser = ToolCallParser()
    out: list[GenerationChunk] = []
    for piece in pieces:
        out += parser.feed(TextDelta(piece))
    return out + parser.feed(END)


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_calls_in_any_split_become_structured_name_first(size: int) -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"a": 1}}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    out = _parse(_pieces(text, size))
    assert "".join(c.text for c in out if isinstance(c, TextDelta)).strip() == "Let me check."
    deltas = [c for c in out if isinstance(c, ToolCallDelta)]
    calls: dict[int, list[ToolCallDelta]] = {}
    for d in deltas:
        calls.setdefault(d.index, []).append(d)
    assert sorted(calls) == [0, 1]
    for index, name, arguments in ((0, "get_weather", {"city": "Paris", "n": {"a": 1}}), (1, "get_time", {})):
        first, *rest = calls[index]
        assert (first.name, first.arguments) == (name, "") and first.id.startswith("call_")
        assert all(not d.name and not d.id for d in rest)
        assert json.loads("".join(d.arguments for d in rest)) == arguments
    assert isinstance(out[-1], Completion) and out[-1].finish_reason is FinishReason.TOOL_CALLS


def test_arguments_first_is_parsed_whole_and_broken_blocks_stay_text() -> None:
    out = _parse(['<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>'])
    assert [(d.name, d.arguments) for d in out if isinstance(d, ToolCallDelta)] == [("f", ""), ("", '{"x": 1}')]
    broken = _parse(["<tool_call>not json</tool_call> and text"])
    assert "".join(c.text for c in broken if isinstance(c, TextDelta)) == "<tool_call>not json</tool_call> and text"
    assert isinstance(broken[-1], Completion) and broken[-1].finish_reason is FinishReason.STOP


def test_plain_text_passes_and_a_partial_marker_is_held_then_released() -> None:
    out = _parse(["a < b and <tool", "s are fine"])
    assert "".join(c.text for c in out if isinstance(c, TextDelta)) == "a < b and <tools are fine"
    assert not any(isinstance(c, ToolCallDelta) for c in out)


def test_logprobs_travel_with_the_text() -> None:
    parser = ToolCallParser()
    entry = TokenLogprob(5, "hi", -0.5)
    out = parser.feed(TextDelta("hi", (entry,)))
    assert out == [TextDelta("hi", (entry,))]


def test_generic_format_lists_tools_and_renders_calls_and_results() -> None:
    tools = [Tool("f", "does f", '{"type": "object"}')]
    history = [ChatMessage("system", "Be brief."), ChatMessage("user", "hi"),
               ChatMessage("assistant", "", (ToolCall("call_1", "f", '{"a": 1}'),)),
               ChatMessage("tool", "42", tool_call_id="call_1", name="f")]
    out = generic_messages(history, tools)
    assert out[0].role == "system" and out[0].content.startswith("Be brief.") and '"name": "f"' in out[0].content
    assert out[2] == ChatMessage("assistant", '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert out[3] == ChatMessage("user", "<tool_response>\n42\n</tool_response>")
    assert template_uses_tools("{% if tools %}x{% endif %}") and not template_uses_tools("{{ messages }}")


def test_forced_call_is_a_grammar_that_compiles_and_auto_is_none() -> None:
    tools = [Tool("f", "", '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'),
             Tool("g", "", "{}")]
    for choice in (ToolChoice(ToolChoiceMode.REQUIRED), ToolChoice(ToolChoiceMode.FUNCTION, "g")):
        forced = forced_call(tools, choice)
        assert forced is not None and forced.kind is ConstraintKind.LARK
        constraints.check(forced, "tools")
    assert forced_call(tools, ToolChoice()) is None
