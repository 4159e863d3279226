"""The cloud endpoint's OpenAI mapping of constraints, tools and logprobs (both ways), and the policy's rule
that a remote lacking a capability is not eligible (pure; the real server is in tests/integration)."""

from __future__ import annotations

import json

import pytest

from laas.core.errors import InvalidArgument
from laas.core.types import (
    ChatMessage,
    Constraint,
    ConstraintKind,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolChoiceMode,
)
from laas.router.cloud import CloudConfig, CloudEngine, _tool_deltas
from laas.router.policy import Estimate, Policy, Query, TargetKind, choose

ENGINE = CloudEngine(CloudConfig("c", "http://127.0.0.1:1/v1", "m", 4096))


def test_schema_tools_history_and_logprobs_take_openais_form() -> None:
    schema = {"type": "object"}
    request = GenerationRequest(
        prompt="", sampling=SamplingParams(constraint=Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema)),
                                           logprobs=True, top_logprobs=3),
        messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "", (ToolCall("call_1", "f", "{}"),)),
                  ChatMessage("tool", "ok", tool_call_id="call_1", name="f")),
        tools=(Tool("f", "does f", '{"type": "object"}'),), tool_choice=ToolChoice(ToolChoiceMode.FUNCTION, "f"))
    path, body = ENGINE._body(request)
    assert path == "/chat/completions"
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "output", "schema": schema,
                                                                              "strict": True}}
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "description": "does f",
                                                               "parameters": {"type": "object"}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["messages"][1]["tool_calls"] == [{"id": "call_1", "type": "function",
                                                  "function": {"name": "f", "arguments": "{}"}}]
    assert body["messages"][2] == {"role": "tool", "content": "ok", "tool_call_id": "call_1", "name": "f"}
    _, plain = ENGINE._body(GenerationRequest(prompt="x", sampling=SamplingParams(
        constraint=Constraint(ConstraintKind.JSON_OBJECT))))
    assert plain["response_format"] == {"type": "json_object"} and "tools" not in plain


def test_streamed_tool_calls_and_logprobs_come_back() -> None:
    event = {"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "x", "function": {
        "name": "f", "arguments": "{"}}]}, "finish_reason": None}]}
    items, reason, _ = ENGINE._parse_event(json.dumps(event))
    named: set[int] = set()
    assert _tool_deltas(items, named) == [ToolCallDelta(0, "x", "f"), ToolCallDelta(0, arguments="{")]
    again, _, _ = ENGINE._parse_event(json.dumps(event))  # some servers repeat the name: sent once
    assert _tool_deltas(again, named) == [ToolCallDelta(0, arguments="{")]
    done, reason, _ = ENGINE._parse_event(json.dumps({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}))
    assert (done, reason) == ([], "tool_calls")
    text, _, _ = ENGINE._parse_event(json.dumps({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [
        {"token": "a", "logprob": -0.1, "top_logprobs": [{"token": "a", "logprob": -0.1}]}]}}]}))
    assert isinstance(text[0], TextDelta) and text[0].logprobs[0].logprob == -0.1
    assert text[0].logprobs[0].top[0].text == "a"


def test_a_remote_lacking_a_capability_is_not_eligible() -> None:
    query = Query(10, 10, 10, Policy.CLOUD_ONLY)
    estimates = [Estimate("plain", TargetKind.CLOUD, 4096, True, 1.0, missing=("regex",)),
                 Estimate("full", TargetKind.CLOUD, 4096, True, 50.0)]
    decision = choose(query, estimates)
    assert decision.chosen.target == "full"
    assert decision.judged[0].note == "lacks regex (its declared capabilities)"
    with pytest.raises(InvalidArgument) as info:
        choose(query, estimates[:1])
    assert info.value.field == "constraint.regex"


def test_a_failover_continuation_keeps_the_constraint_from_where_the_text_left_it() -> None:
    from laas.router.targets import RoutedRequest

    schema = Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object"}')
    request = RoutedRequest(SamplingParams(max_tokens=50, constraint=schema), messages=(ChatMessage("user", "x"),),
                            tools=(Tool("f"),), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED))
    resumed = request.continued('{"a": ', 40).continued("1", 39)
    assert resumed.sampling.constraint == Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object"}', '{"a": 1')
    assert resumed.tools == request.tools and resumed.needs() == {"json_schema", "tools"}
