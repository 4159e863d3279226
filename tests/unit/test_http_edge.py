"""The HTTP edge's pure parts: the HTTP column of the error table, OpenAI's error body, body validation
errors, the OpenAI -> domain conversion (what is refused, naming the param), and the http_listen setting."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from laas.core import errors
from laas.core.errors import (
    STATUS_TABLE,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LaasError,
    MemoryBudgetExceeded,
    ModelLoadError,
    ModelLoading,
    NotFound,
    OutOfRange,
    PermissionDenied,
    RequestTooLarge,
    ResourceExhausted,
    ShuttingDown,
    TargetFailed,
    Unauthenticated,
    Unavailable,
    Unprocessable,
    Unsupported,
    error_for_status,
    http_status_for,
    status_for,
)
from laas.core.types import (
    ChatMessage,
    Constraint,
    ConstraintKind,
    Embedding,
    EmbeddingResult,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from laas.daemon.app.values import EmbedReply, RouteInfo
from laas.daemon.http.convert import chat_request, completion_request, embed_request
from laas.daemon.http.errors import error_body, error_response, validation_error
from laas.daemon.http.replies import embeddings_json
from laas.daemon.http.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingsRequest
from laas.daemon.security import listen_refusal
from laas.daemon.settings import Settings, SettingsError, load_settings
from laas.router.policy import Policy, TargetKind

# The documented statuses (errors.py's docstring), written out rather than read from the table.
HTTP = [
    (RequestTooLarge, 413), (Unprocessable, 422), (InvalidArgument, 400), (NotFound, 404), (OutOfRange, 400),
    (MemoryBudgetExceeded, 429), (ResourceExhausted, 429), (ModelLoading, 503), (ShuttingDown, 503),
    (TargetFailed, 503), (Unavailable, 503), (Unsupported, 400), (ModelLoadError, 409), (Unauthenticated, 401),
    (PermissionDenied, 403),
    (Cancelled, 499), (DeadlineExceeded, 504), (LaasError, 500),
]


@pytest.mark.parametrize(("cls", "status"), HTTP)
def test_http_status_of_each_class(cls: type[LaasError], status: int) -> None:
    assert http_status_for(cls("x")) == status


def test_every_class_has_an_http_status_and_the_new_ones_keep_grpc_invalid_argument() -> None:
    assert {cls for cls, _ in HTTP} == {cls for cls, *_ in STATUS_TABLE}
    assert {obj for obj in vars(errors).values() if isinstance(obj, type) and issubclass(obj, LaasError)} == {
        cls for cls, _ in HTTP}
    for cls in (RequestTooLarge, Unprocessable):
        assert status_for(cls("x")).name == "INVALID_ARGUMENT"
    assert type(error_for_status(status_for(RequestTooLarge("x")), "x")) is InvalidArgument


def test_error_body_names_the_param_as_the_http_body_does() -> None:
    body = error_body(InvalidArgument("sampling.top_p must be in (0, 1]", field="sampling.top_p"))
    assert body == {"error": {"message": "sampling.top_p must be in (0, 1]", "type": "invalid_request_error",
                              "param": "top_p", "code": "invalid_argument"}}
    assert error_body(InvalidArgument("x", field="keep_alive_s"))["error"]["param"] == "keep_alive"
    assert error_body(NotFound("x", field="model"))["error"] | {"message": ""} == {
        "message": "", "type": "not_found_error", "param": "model", "code": "not_found"}
    assert error_body(Unauthenticated("x"))["error"]["type"] == "authentication_error"
    assert error_body(ResourceExhausted("x"))["error"]["type"] == "rate_limit_error"
    assert error_body(ShuttingDown("x"))["error"]["type"] == "server_error"


def test_error_responses_carry_retry_after_and_hide_bugs() -> None:
    limited = error_response(ResourceExhausted("busy"))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert error_response(ModelLoading("loading")).headers["retry-after"] == "1"
    assert "retry-after" not in error_response(InvalidArgument("x")).headers
    assert error_response(Unauthenticated("x")).headers["www-authenticate"] == "Bearer"
    bug = error_response(ZeroDivisionError("secret internals"))
    assert bug.status_code == 500 and b"secret" not in bytes(bug.body)


def _errors(model: type[ChatCompletionRequest | CompletionRequest], body: object) -> list[object]:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return list(e.value.errors())


@pytest.mark.parametrize(("body", "cls", "field"), [
    ({"messages": [], "frobnicate": 1}, InvalidArgument, "frobnicate"),
    ({}, Unprocessable, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, Unprocessable, "messages[0].content"),
    ({"messages": [], "temperature": "hot"}, Unprocessable, "temperature"),
    ({"messages": [], "stream_options": {"include_usage": "yes please"}}, Unprocessable,
     "stream_options.include_usage"),
])
def test_body_validation_errors_name_the_field(body: object, cls: type[LaasError], field: str) -> None:
    error = validation_error(_errors(ChatCompletionRequest, body))
    assert type(error) is cls and error.field == field, error


def _chat(**body: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]} | body)


def test_chat_request_in_domain_values() -> None:
    text = chat_request(_chat(
        model="m", messages=[{"role": "developer", "content": "be brief"},
                             {"role": "user", "content": [{"type": "text", "text": "a"},
                                                          {"type": "text", "text": "b"}]},
                             {"role": "assistant", "content": "c", "name": "bot"}],
        max_completion_tokens=9, temperature=0.5, top_p=0.9, stop="\n", seed=3, top_k=7, min_p=0.2,
        repeat_penalty=1.2, ignore_eos=True, routing_policy="local_only", latency_budget_ms=500.0, keep_alive=-1,
        n=1, response_format={"type": "text"}, tool_choice="none", user="u", service_tier="auto"))
    assert text.model == "m" and text.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "ab"),
                                                   ChatMessage("assistant", "c", name="bot"))
    s = text.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.stop, s.seed, s.top_k, s.min_p, s.repeat_penalty,
            s.ignore_eos) == (9, 0.5, 0.9, ("\n",), 3, 7, 0.2, 1.2, True)
    assert text.routing.policy is Policy.LOCAL_ONLY and text.routing.latency_budget_ms == 500.0
    assert text.keep_alive_s == -1


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 3}, "n"), ({"logprobs": 3}, "logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"), ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "sometimes"}, "tool_choice"), ({"tool_choice": {"type": "function"}}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"audio": {"voice": "x"}}, "audio"), ({"modalities": ["audio"]}, "modalities"),
    ({"functions": [{}]}, "functions"), ({"prediction": {"type": "content"}}, "prediction"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"max_tokens": 1, "max_completion_tokens": 2}, "max_completion_tokens"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "code"}]}]},
     "messages[0].tool_calls[0].type"),
    ({"messages": [{"role": "assistant"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages[0].content[0].type"),
])
def test_what_laas_does_not_serve_is_refused_naming_the_param(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        chat_request(_chat(**body))
    assert e.value.field == param


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "z"}, "suffix"), ({"prompt": "a", "best_of": 2}, "best_of"),
    ({"prompt": "a", "logprobs": True}, "logprobs"),
])
def test_text_completion_refusals(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        completion_request(CompletionRequest.model_validate(body))
    assert e.value.field == param
    ok = completion_request(CompletionRequest.model_validate({"prompt": ["a"], "best_of": 1, "max_tokens": 3}))
    assert ok.prompt == "a" and ok.messages is None and ok.sampling.max_tokens == 3


def test_http_listen_setting_and_the_bind_refusal(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).http_listen == ("127.0.0.1:7735",)
    env = load_settings(environ={"LAAS_HOME": str(tmp_path), "LAAS_HTTP_LISTEN": "127.0.0.1:0, unix:/run/x.sock"})
    assert env.http_listen == ("127.0.0.1:0", "unix:/run/x.sock")
    assert load_settings(environ={"LAAS_HOME": str(tmp_path)}, overrides={"http_listen": []}).http_listen == ()
    for bad in ("unix:", "localhost"):
        with pytest.raises(SettingsError) as e:
            load_settings(environ={"LAAS_HOME": str(tmp_path)}, overrides={"http_listen": [bad]})
        assert e.value.field == "http_listen"
    open_http = Settings(home=tmp_path, http_listen=("0.0.0.0:7735",))
    refusal = listen_refusal(open_http, tokens=False)
    assert refusal is not None and "0.0.0.0:7735" in refusal and "TLS" in refusal
    assert listen_refusal(Settings(home=tmp_path, http_listen=("0.0.0.0:7735",), tls_cert="c", tls_key="k"),
                          tokens=True) is None
    assert listen_refusal(Settings(home=tmp_path, http_listen=("unix:/run/x.sock", "[::1]:1")), tokens=False) is None


def test_structured_output_tools_and_logprobs_in_domain_values() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    text = chat_request(_chat(
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        logprobs=True, top_logprobs=3, parallel_tool_calls=True,
        tools=[{"type": "function", "function": {"name": "weather", "description": "the weather",
                                                 "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        messages=[{"role": "user", "content": "weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]))
    assert text.constraint == Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))
    assert text.sampling.logprobs and text.sampling.top_logprobs == 3
    assert text.tools == (Tool("weather", "the weather", '{"type": "object"}'),)
    assert text.tool_choice == ToolChoice(ToolChoiceMode.FUNCTION, "weather")
    assert text.messages is not None
    assert text.messages[1] == ChatMessage("assistant", "", (ToolCall("call_1", "weather", "{}"),))
    assert text.messages[2] == ChatMessage("tool", "sunny", tool_call_id="call_1")
    assert chat_request(_chat(response_format={"type": "json_object"})).constraint == Constraint(
        ConstraintKind.JSON_OBJECT)
    assert chat_request(_chat()).tool_choice.mode is ToolChoiceMode.NONE
    assert chat_request(_chat(tools=[{"type": "function", "function": {"name": "f"}}])).tool_choice.mode is \
        ToolChoiceMode.AUTO
    legacy = completion_request(CompletionRequest.model_validate({"prompt": "a", "logprobs": 2}))
    assert legacy.sampling.logprobs and legacy.sampling.top_logprobs == 2


def test_embeddings_request_and_base64() -> None:
    assert embed_request(EmbeddingsRequest.model_validate({"input": "a"})).inputs == ("a",)
    assert embed_request(EmbeddingsRequest.model_validate({"input": [1, 2]})).inputs == ((1, 2),)
    many = embed_request(EmbeddingsRequest.model_validate({"input": [[1], [2, 3]], "dimensions": 8}))
    assert many.inputs == ((1,), (2, 3)) and many.dimensions == 8
    reply = EmbedReply("m", EmbeddingResult((Embedding((1.0, -0.5), 3),)), RouteInfo("m", TargetKind.LOCAL))
    out = embeddings_json(reply, "base64")
    assert struct.unpack("<2f", base64.b64decode(out["data"][0]["embedding"])) == (1.0, -0.5)
    assert embeddings_json(reply, "float")["data"][0]["embedding"] == [1.0, -0.5]
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
