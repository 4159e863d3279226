"""Constraints, tools and logprobs on the remote routes: the real daemon sends them in OpenAI's form to a real
OpenAI-compatible server (llama_cpp.server, tests/openai_server.py) and maps its answers back, and over
laas.v1 to a LAN peer (another real laasd); a remote declared without a capability is not eligible, and
ExplainRoute says so."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest

from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.cloud_server import CLOUD_MODEL, CloudServer
from tests.daemon_process import DaemonProcess
from tests.structured_cases import SCHEMAS

LOCAL = "smollm2-135m-instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
           "additionalProperties": False}
CLOUD_ONLY = pb.Routing(policy=pb.ROUTING_POLICY_CLOUD_ONLY)


@pytest.fixture(scope="module")
def stub(cloud: CloudServer, daemon: DaemonProcess, make_home: Callable[..., Path],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.RuntimeStub]:
    config = tmp_path_factory.mktemp("structured-cloud") / "laasd.toml"
    config.write_text(f"""
[[models]]
name = "{LOCAL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = 1024

[[remotes]]
name = "cloud"
url = "{cloud.url}"
model = "{CLOUD_MODEL}"
models = ["{LOCAL}"]
read_timeout_s = 120

[[remotes]]
name = "plain-cloud"
url = "{cloud.url}"
model = "{CLOUD_MODEL}"
models = ["{LOCAL}"]
capabilities = ["json_object"]
ttft_ms = 1
inter_token_ms = 1

[[remotes]]
name = "peer"
kind = "peer"
url = "{daemon.target}"
models = ["peer-model"]
""")
    front = DaemonProcess(make_home(), config=config).start()
    try:
        with grpc.insecure_channel(front.target) as channel:
            yield pb_grpc.RuntimeStub(channel)
    finally:
        assert front.stop() == 0, front.log


def _chat(stub: pb_grpc.RuntimeStub, request: pb.ChatRequest) -> list[pb.GenerateResponse]:
    return list(stub.Chat(request, timeout=300))


# Shapes llama.cpp's own schema-to-grammar converter enforces (it ignores numeric bounds: not ours to test).
CLOUD_SCHEMAS = [s for s in SCHEMAS if s[0] in ("bool", "enum", "array", "deep nesting")]


@pytest.mark.parametrize(("name", "prompt", "schema"), CLOUD_SCHEMAS, ids=[s[0] for s in CLOUD_SCHEMAS])
def test_a_schema_goes_to_the_cloud_and_the_answer_validates(stub: pb_grpc.RuntimeStub, name: str, prompt: str,
                                                             schema: dict[str, object]) -> None:
    responses = _chat(stub, pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content=prompt)], routing=CLOUD_ONLY,
        sampling=pb.SamplingParams(max_tokens=120, temperature=0), constraint=pb.Constraint(
            json_schema=json.dumps(schema))))
    assert responses[0].route.target == "cloud"  # plain-cloud lacks json_schema, though it is faster
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    jsonschema.validate(json.loads("".join(r.text for r in responses)), schema)


def test_a_named_tool_call_streams_back_from_the_cloud(stub: pb_grpc.RuntimeStub) -> None:
    tools = [pb.Tool(name="get_weather", description="The weather now", parameters=json.dumps(WEATHER))]
    for choice in (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function="get_weather"),
                   pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)):
        responses = _chat(stub, pb.ChatRequest(
            messages=[pb.ChatMessage(role="user", content="Weather in Oslo?")], tools=tools, tool_choice=choice,
            routing=CLOUD_ONLY, sampling=pb.SamplingParams(max_tokens=60, temperature=0)))
        assert responses[0].route.target == "cloud"
        deltas = [d for r in responses for d in r.tool_calls]
        assert deltas and deltas[0].name == "get_weather" and deltas[0].id
        jsonschema.validate(json.loads("".join(d.arguments for d in deltas)), WEATHER)
        assert responses[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS


def test_a_tool_result_goes_to_the_cloud_and_the_conversation_continues(stub: pb_grpc.RuntimeStub) -> None:
    history = [
        pb.ChatMessage(role="user", content="Weather in Oslo?"),
        pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_7", name="get_weather",
                                                                 arguments='{"city": "Oslo"}')]),
        pb.ChatMessage(role="tool", tool_call_id="call_7", name="get_weather", content='{"celsius": 4}'),
    ]
    tools = [pb.Tool(name="get_weather", parameters=json.dumps(WEATHER))]
    responses = _chat(stub, pb.ChatRequest(messages=history, tools=tools, routing=CLOUD_ONLY,
                                           tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE),
                                           sampling=pb.SamplingParams(max_tokens=20, temperature=0)))
    assert "".join(r.text for r in responses).strip()
    assert responses[-1].finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)


def test_logprobs_come_back_from_the_cloud(stub: pb_grpc.RuntimeStub) -> None:
    responses = _chat(stub, pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="Say hi.")], routing=CLOUD_ONLY,
        sampling=pb.SamplingParams(max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)))
    entries = [e for r in responses for e in r.logprobs]
    assert entries
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)


def test_a_remote_lacking_a_capability_is_not_eligible_and_explain_says_so(stub: pb_grpc.RuntimeStub) -> None:
    request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], routing=CLOUD_ONLY,
                             constraint=pb.Constraint(regex="[a-z]+"))
    with pytest.raises(grpc.RpcError) as info:
        _chat(stub, request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "constraint.regex" in str(info.value.details())
    explained = stub.ExplainRoute(pb.ExplainRouteRequest(chat=pb.ChatRequest(
        messages=[pb.ChatMessage(role="user", content="x")], constraint=pb.Constraint(
            json_schema=json.dumps(WEATHER)))), timeout=60)
    notes = {c.route.target: (c.eligible, c.note) for c in explained.candidates}
    assert notes["plain-cloud"] == (False, "lacks json_schema (its declared capabilities)")
    assert notes["cloud"][0] and notes[LOCAL][0]


def test_a_peer_gets_the_constraint_tools_and_logprobs_over_laas_v1(stub: pb_grpc.RuntimeStub) -> None:
    schema = SCHEMAS[3][2]  # with numeric bounds: the peer's llguidance enforces them
    responses = _chat(stub, pb.ChatRequest(
        model="peer-model", messages=[pb.ChatMessage(role="user", content="Describe a person as JSON.")],
        sampling=pb.SamplingParams(max_tokens=80, temperature=0, logprobs=True, top_logprobs=1),
        constraint=pb.Constraint(json_schema=json.dumps(schema))))
    assert responses[0].route.target == "peer"
    jsonschema.validate(json.loads("".join(r.text for r in responses)), schema)
    assert sum(len(r.logprobs) for r in responses) == responses[-1].usage.completion_tokens
    tools = [pb.Tool(name="get_weather", parameters=json.dumps(WEATHER))]
    responses = _chat(stub, pb.ChatRequest(
        model="peer-model", messages=[pb.ChatMessage(role="user", content="Weather in Oslo?")], tools=tools,
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        sampling=pb.SamplingParams(max_tokens=60, temperature=0)))
    deltas = [d for r in responses for d in r.tool_calls]
    assert deltas[0].name == "get_weather"
    jsonschema.validate(json.loads("".join(d.arguments for d in deltas)), WEATHER)
    assert responses[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
