"""Constrained decoding, logprobs and tool calls over real gRPC against the real daemon and default model."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import jsonschema
import pytest

from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.daemon_process import DaemonProcess
from tests.structured_cases import SCHEMAS

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 12}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [pb.Tool(name="get_weather", description="The weather in a city now", parameters=json.dumps(WEATHER)),
         pb.Tool(name="get_time", description="The time in a time zone", parameters=json.dumps(TIME))]


@pytest.fixture(scope="module")
def stub(daemon: DaemonProcess) -> Iterator[pb_grpc.RuntimeStub]:
    with grpc.insecure_channel(daemon.target) as channel:
        yield pb_grpc.RuntimeStub(channel)


def _chat(stub: pb_grpc.RuntimeStub, request: pb.ChatRequest) -> list[pb.GenerateResponse]:
    return list(stub.Chat(request, timeout=300))


def _text(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


@pytest.mark.parametrize(("name", "prompt", "schema"), SCHEMAS, ids=[s[0] for s in SCHEMAS])
def test_every_schema_yields_json_that_validates(stub: pb_grpc.RuntimeStub, name: str, prompt: str,
                                                 schema: dict[str, Any]) -> None:
    request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=prompt)],
                             sampling=pb.SamplingParams(max_tokens=120, temperature=0.7, seed=7),
                             constraint=pb.Constraint(json_schema=json.dumps(schema)))
    responses = _chat(stub, request)
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP, _text(responses)
    jsonschema.validate(json.loads(_text(responses)), schema)


def test_enough_schemas() -> None:
    assert len(SCHEMAS) >= 20


def test_any_json_object_regex_and_grammars(stub: pb_grpc.RuntimeStub) -> None:
    def generate(constraint: pb.Constraint, prompt: str = "Answer: ") -> str:
        responses = list(stub.Generate(pb.GenerateRequest(
            prompt=prompt, sampling=pb.SamplingParams(max_tokens=60, temperature=0), constraint=constraint),
            timeout=300))
        assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
        return _text(responses)

    assert isinstance(json.loads(generate(pb.Constraint(json_object=True), "A JSON object: ")), dict)
    assert generate(pb.Constraint(regex=r"(yes|no), [0-9]{3}")) in {f"{w}, {n:03d}" for w in ("yes", "no")
                                                                    for n in range(1000)}
    assert generate(pb.Constraint(lark='start: "Paris" | "London" | "Rome"'), "The capital of France is ") in {
        "Paris", "London", "Rome"}
    assert generate(pb.Constraint(gbnf='root ::= "Monday" | "Friday"')) in {"Monday", "Friday"}


@pytest.mark.parametrize(("constraint", "field"), [
    (pb.Constraint(json_schema="{not json"), "constraint.json_schema"),
    (pb.Constraint(json_schema='{"type": "bogus"}'), "constraint.json_schema"),
    (pb.Constraint(json_schema='{"type": "integer", "minimum": 5, "maximum": 3}'), "constraint.json_schema"),
    (pb.Constraint(json_schema='{"type": "array", "uniqueItems": true}'), "constraint.json_schema"),  # unsupported
    (pb.Constraint(regex="a(b"), "constraint.regex"),
    (pb.Constraint(regex=r"[^\s\S]"), "constraint.regex"),  # an empty language
    (pb.Constraint(lark="start: missing"), "constraint.lark"),
    (pb.Constraint(gbnf="root ::= ("), "constraint.gbnf"),
])
def test_bad_constraints_are_invalid_argument_naming_the_field(stub: pb_grpc.RuntimeStub,
                                                               constraint: pb.Constraint, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="x", constraint=constraint), timeout=60))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert field in str(info.value.details())


def test_logprobs_are_log_probabilities_and_greedy_takes_the_top(stub: pb_grpc.RuntimeStub) -> None:
    request = pb.GenerateRequest(prompt="The capital of France is", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=5))
    responses = list(stub.Generate(request, timeout=120))
    entries = [e for r in responses for e in r.logprobs]
    assert len(entries) == responses[-1].usage.completion_tokens
    assert "".join(e.token for e in entries) == _text(responses)
    for e in entries:
        assert e.logprob <= 0
        assert len(e.top_logprobs) == 5
        assert e.top_logprobs[0].token_id == e.token_id  # greedy: the most likely one
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
    plain = list(stub.Generate(pb.GenerateRequest(prompt="The capital of France is", sampling=pb.SamplingParams(
        max_tokens=12, temperature=0)), timeout=120))
    assert not any(r.logprobs for r in plain)
    assert _text(plain) == _text(responses)


def test_logprobs_of_sampling_follow_its_transforms(stub: pb_grpc.RuntimeStub) -> None:
    request = pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(
        max_tokens=16, temperature=0.8, top_k=3, seed=3, logprobs=True, top_logprobs=20))
    entries = [e for r in stub.Generate(request, timeout=120) for e in r.logprobs]
    assert entries
    for e in entries:
        assert len(e.top_logprobs) <= 3  # top_k keeps 3: nothing else can be drawn
        assert e.token_id in {t.token_id for t in e.top_logprobs}
        assert math.isclose(sum(math.exp(t.logprob) for t in e.top_logprobs), 1.0, rel_tol=1e-6)


def _calls(responses: list[pb.GenerateResponse]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for r in responses:
        for d in r.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            if d.name:
                assert not call["name"], "the name comes once, first"
                assert not call["arguments"]
                call["id"], call["name"] = d.id, d.name
            call["arguments"] += d.arguments
    return calls


@pytest.mark.parametrize("choice", [pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
                                    pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_time")])
def test_required_and_named_tool_choice_always_yield_a_valid_call(stub: pb_grpc.RuntimeStub,
                                                                  choice: pb.ToolChoice) -> None:
    for seed in (1, 2):
        responses = _chat(stub, pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="What is the weather in Paris?")], tools=TOOLS,
            tool_choice=choice, sampling=pb.SamplingParams(max_tokens=80, temperature=0.7, seed=seed)))
        assert responses[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert _text(responses) == ""  # the call is never raw text
        calls = _calls(responses)
        assert len(calls) == 1
        call = calls[0]
        assert call["id"].startswith("call_")
        if choice.function:
            assert call["name"] == "get_time"
        schema = WEATHER if call["name"] == "get_weather" else TIME
        jsonschema.validate(json.loads(call["arguments"]), schema)
        # the name arrives in a message of its own, before the arguments' fragments
        first = next(i for i, r in enumerate(responses) if r.tool_calls)
        assert responses[first].tool_calls[0].name and not responses[first].tool_calls[0].arguments


def test_a_conversation_with_a_tool_result_continues(stub: pb_grpc.RuntimeStub) -> None:
    history = [
        pb.ChatMessage(role="user", content="What is the weather in Paris?"),
        pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(
            id="call_1", name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}')]),
        pb.ChatMessage(role="tool", tool_call_id="call_1", name="get_weather", content='{"celsius": 21}'),
    ]
    responses = _chat(stub, pb.ChatRequest(messages=history, tools=TOOLS, tool_choice=pb.ToolChoice(
        mode=pb.TOOL_CHOICE_MODE_NONE), sampling=pb.SamplingParams(max_tokens=24, temperature=0)))
    assert responses[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert _text(responses).strip()
    assert not _calls(responses)


def test_bad_tools_are_invalid_argument(stub: pb_grpc.RuntimeStub) -> None:
    cases = [
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                        tools=[pb.Tool(name="f", parameters="[1]")]), "tools[0].parameters"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], tools=TOOLS,
                        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="nope")),
         "tool_choice.function"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)), "tool_choice"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], tools=TOOLS,
                        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
                        constraint=pb.Constraint(json_object=True)), "constraint"),
        (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                        sampling=pb.SamplingParams(top_logprobs=3)), "sampling.top_logprobs"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            _chat(stub, request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in str(info.value.details())
