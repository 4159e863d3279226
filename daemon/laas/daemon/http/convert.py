"""OpenAI JSON requests -> the application layer's domain values (replies.py: the way back).

Layer: edge (HTTP). Requests become :class:`~laas.daemon.app.values.TextRequest` and
:class:`~laas.daemon.app.values.EmbedRequest` with the fields as the client set them (the use case
validates them, as for gRPC). What laas does not serve is refused here with InvalidArgument naming
the param (400), never ignored: `n` > 1, audio and other modalities,
logit_bias, functions, predicted outputs, web search, echo/best_of/suffix, token-id prompts, images.
response_format becomes the domain's Constraint (json_object, json_schema), tools and tool_choice its
Tool and ToolChoice, logprobs/top_logprobs the sampling's.
"""

from __future__ import annotations

import json
from typing import Any

from laas.core.errors import InvalidArgument
from laas.core.types import (
    ChatMessage,
    Constraint,
    ConstraintKind,
    Tool,
    ToolCall,
    ToolChoice,
    ToolChoiceMode,
)
from laas.daemon.app.values import (
    EmbedRequest,
    Routing,
    SamplingFields,
    TextRequest,
)
from laas.daemon.http.schemas import (
    ChatCompletionRequest,
    ChatMessageIn,
    CompletionRequest,
    ContentPart,
    EmbeddingsRequest,
    _Sampling,
)
from laas.router.policy import Policy

Json = dict[str, Any]
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _refuse(param: str, what: str) -> InvalidArgument:
    return InvalidArgument(f"{param}: {what} is not supported by laas", field=param)


def _unsupported_common(body: _Sampling) -> None:
    if body.n is not None and body.n != 1:
        raise _refuse("n", f"n = {body.n} (more than one choice)")
    if body.logit_bias:
        raise _refuse("logit_bias", "logit_bias")
    if body.service_tier not in (None, "auto", "default"):
        raise _refuse("service_tier", f"service_tier {body.service_tier!r}")


def _unsupported_chat(body: ChatCompletionRequest) -> None:
    _unsupported_common(body)
    for param in ("functions", "function_call", "audio", "prediction", "web_search_options"):
        if getattr(body, param) is not None:
            raise _refuse(param, param)
    if body.parallel_tool_calls is False:
        raise _refuse("parallel_tool_calls", "parallel_tool_calls = false")
    if body.modalities is not None and body.modalities != ["text"]:
        raise _refuse("modalities", f"modalities {body.modalities}")


def _sampling(body: _Sampling, max_tokens: int | None, logprobs: bool = False,
              top_logprobs: int | None = None) -> SamplingFields:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingFields(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          min_p=body.min_p, seed=body.seed, repeat_penalty=body.repeat_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          top_logprobs=top_logprobs, stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs)


def _json_text(value: Any, param: str) -> str:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{param} must be a JSON object", field=param)
    return json.dumps(value)


def _constraint(response_format: dict[str, Any] | None) -> Constraint | None:
    kind = None if response_format is None else response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    if kind == "json_schema":
        assert response_format is not None
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidArgument("response_format.json_schema.schema is required", field="response_format.json_schema")
        return Constraint(ConstraintKind.JSON_SCHEMA, _json_text(spec["schema"], "response_format.json_schema.schema"))
    raise InvalidArgument(f"response_format.type must be text, json_object or json_schema; got {kind!r}",
                          field="response_format.type")


def _tools(given: list[dict[str, Any]] | None) -> tuple[Tool, ...]:
    out = []
    for i, tool in enumerate(given or ()):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise _refuse(f"tools[{i}].type", f"a tool of type {tool.get('type')!r}")
        parameters = function.get("parameters")
        out.append(Tool(str(function.get("name", "")), str(function.get("description") or ""),
                        "" if parameters is None else _json_text(parameters, f"tools[{i}].function.parameters")))
    return tuple(out)


def _tool_choice(choice: str | dict[str, Any] | None, tools: bool) -> ToolChoice:
    if choice is None:
        return ToolChoice(ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE)
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidArgument(f"tool_choice must be none, auto, required or a function; got {choice!r}",
                                  field="tool_choice")
        return ToolChoice(ToolChoiceMode(choice))
    function = choice.get("function")
    if choice.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
        raise InvalidArgument("tool_choice must be {type: function, function: {name}}", field="tool_choice")
    return ToolChoice(ToolChoiceMode.FUNCTION, str(function["name"]))


def _calls(m: ChatMessageIn, i: int) -> tuple[ToolCall, ...]:
    out = []
    for j, call in enumerate(m.tool_calls or ()):
        function = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(function, dict):
            raise _refuse(f"messages[{i}].tool_calls[{j}].type", f"a tool call of type {call.get('type')!r}")
        out.append(ToolCall(str(call.get("id", "")), str(function.get("name", "")),
                            str(function.get("arguments", "{}"))))
    return tuple(out)


def _routing(body: _Sampling) -> Routing:
    return Routing(policy=Policy(body.routing_policy), latency_budget_ms=body.latency_budget_ms)


def _text_of(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None:
        raise InvalidArgument(f"{where}.content is required", field=f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _refuse(f"{where}.content[{j}].type", f"content of type {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def chat_request(body: ChatCompletionRequest) -> TextRequest:
    _unsupported_chat(body)
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidArgument("set max_tokens or max_completion_tokens, not both", field="max_completion_tokens")
    messages = []
    for i, m in enumerate(body.messages):
        role = _ROLES.get(m.role, m.role)
        if role not in (*_ROLES.values(), "tool"):
            raise InvalidArgument(f"messages[{i}].role must be one of system, developer, user, assistant, tool; "
                                  f"got {m.role!r}", field=f"messages[{i}].role")
        calls = _calls(m, i)
        content = "" if calls and m.content is None else _text_of(m.content, f"messages[{i}]")
        messages.append(ChatMessage(role, content, calls, m.tool_call_id or "", m.name or ""))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.logprobs not in (None, True, False):
        raise InvalidArgument("logprobs must be true or false", field="logprobs")
    tools = _tools(body.tools)
    return TextRequest(body.model, messages=tuple(messages),
                       sampling=_sampling(body, max_tokens, bool(body.logprobs), body.top_logprobs),
                       keep_alive_s=body.keep_alive, routing=_routing(body),
                       constraint=_constraint(body.response_format), tools=tools,
                       tool_choice=_tool_choice(body.tool_choice, bool(tools)))


def completion_request(body: CompletionRequest) -> TextRequest:
    _unsupported_common(body)
    for param in ("best_of", "suffix"):
        if getattr(body, param) is not None and not (param == "best_of" and body.best_of == 1):
            raise _refuse(param, param)
    if body.echo:
        raise _refuse("echo", "echo")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise _refuse("prompt", "a prompt of token ids or several prompts")
        prompt = prompt[0]
    assert isinstance(prompt, str)  # narrowed above: the schema allows str or lists only
    top = body.logprobs if isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) else None
    if isinstance(body.logprobs, bool):
        raise InvalidArgument("logprobs of a completion is a number of alternatives (0..20)", field="logprobs")
    sampling = _sampling(body, body.max_tokens, top is not None, top)
    return TextRequest(body.model, prompt=prompt, sampling=sampling, keep_alive_s=body.keep_alive,
                       routing=_routing(body))


def embed_request(body: EmbeddingsRequest) -> EmbedRequest:
    given = body.input
    inputs: tuple[str | tuple[int, ...], ...]
    if isinstance(given, str):
        inputs = (given,)
    elif given and all(isinstance(x, int) for x in given):
        inputs = (tuple(int(x) for x in given if isinstance(x, int)),)
    else:
        inputs = tuple(x if isinstance(x, str) else tuple(x) for x in given if not isinstance(x, int))
    return EmbedRequest(body.model, inputs, body.dimensions, body.normalize, body.truncate, body.keep_alive,
                        Routing(policy=Policy(body.routing_policy)))
