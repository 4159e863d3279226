"""The HTTP API's structured output, tool calls, logprobs and embeddings, with the official openai SDK against
the real daemon: a JSON-schema response, a tool call round trip (streamed and whole), log-probabilities,
/v1/embeddings in float and base64 against gRPC's Embed."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from laas.client import Client
from tests.conftest import OnnxExport, copy_package
from tests.daemon_process import DaemonProcess

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS: list[ChatCompletionToolParam] = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now", "parameters": WEATHER}}]
ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]


def _sdk(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.http_url, api_key="none", max_retries=0, timeout=300)


def test_a_json_schema_response_validates(daemon: DaemonProcess) -> None:
    reply = _sdk(daemon).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Invent a person: name and age."}], max_tokens=60,
        temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    content = reply.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), PERSON)
    whole = _sdk(daemon).chat.completions.create(model=MODEL, messages=ASK, max_tokens=40, temperature=0,
                                                 response_format={"type": "json_object"})
    assert isinstance(json.loads(whole.choices[0].message.content or ""), dict)


def test_a_tool_call_round_trip(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    reply = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=80, temperature=0.7, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id.startswith("call_")
    call = calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)

    # streamed: the same call in OpenAI's tool_calls deltas (id and name first, then the arguments' pieces)
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=80, seed=1,
                                              temperature=0.7, stream=True,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    streamed = "".join(d.function.arguments or "" for d in deltas if d.function)
    jsonschema.validate(json.loads(streamed), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the tool's answer goes back, and the model answers in text
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": call.id, "type": "function",
            "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})},
    ]
    answer = sdk.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                         max_tokens=24, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and (answer.choices[0].message.content or "").strip()
    assert not answer.choices[0].message.tool_calls


def test_logprobs_chat_and_completions(daemon: DaemonProcess) -> None:
    sdk = _sdk(daemon)
    reply = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = reply.choices[0].logprobs and reply.choices[0].logprobs.content
    assert content and len(content) == 5
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert math.isclose(t.logprob, max(a.logprob for a in t.top_logprobs), abs_tol=1e-4)  # greedy: the top
    text = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=2)
    legacy = text.choices[0].logprobs
    assert legacy is not None and legacy.tokens and len(legacy.tokens) == 4
    assert legacy.token_logprobs and all(lp <= 0 for lp in legacy.token_logprobs)
    assert legacy.top_logprobs and all(len(top) == 2 for top in legacy.top_logprobs)
    assert legacy.text_offset == [sum(len(t) for t in legacy.tokens[:i]) for i in range(4)]


@pytest.fixture(scope="module")
def embed_daemon(make_home: Callable[..., Path], embedding_export: OnnxExport) -> Iterator[DaemonProcess]:
    home = make_home()
    copy_package(embedding_export.package("fp32"), home / "models")
    proc = DaemonProcess(home).start()
    yield proc
    assert proc.stop() == 0, proc.log


def test_embeddings_float_and_base64_match_grpc(embed_daemon: DaemonProcess) -> None:
    texts = ["A cat sits on the mat.", "The stock market fell today."]
    sdk = _sdk(embed_daemon)
    floats = sdk.embeddings.create(model="minilm-fp32", input=texts)
    assert floats.model == "minilm-fp32" and [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == 384 for d in floats.data) and floats.usage.prompt_tokens > 6
    with Client(embed_daemon.target) as client:
        grpc_vectors = client.embed(texts, model="minilm-fp32").vectors
    for d, g in zip(floats.data, grpc_vectors, strict=True):
        assert max(abs(a - b) for a, b in zip(d.embedding, g, strict=True)) < 1e-6
    raw: Any = sdk.embeddings.with_raw_response.create(model="minilm-fp32", input=texts, encoding_format="base64")
    body = json.loads(raw.text)
    assert raw.headers["x-laas-route"].startswith("minilm-fp32; kind=local")
    decoded = [struct.unpack("<384f", base64.b64decode(d["embedding"])) for d in body["data"]]
    for d, v in zip(floats.data, decoded, strict=True):
        assert max(abs(a - b) for a, b in zip(d.embedding, v, strict=True)) < 1e-6
    # the SDK's default asks for base64 and decodes it itself
    assert len(sdk.embeddings.create(model="minilm-fp32", input="hello").data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as e:
        sdk.embeddings.create(model=MODEL, input="hello")  # a generative model cannot embed
    assert e.value.param == "model"
