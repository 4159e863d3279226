"""llama-cpp-python's OpenAI-compatible server, speaking today's OpenAI request shapes it does not know yet.

Run as a script (tests/cloud_server.py starts it): the same `llama_cpp.server` with its own arguments, its
app wrapped in a small ASGI layer that rewrites a chat request's body before the server reads it:

- `response_format: {"type": "json_schema", "json_schema": {"schema": S}}` (OpenAI's structured outputs)
  becomes the server's own `{"type": "json_object", "schema": S}`, which it enforces with a grammar;
- `tool_choice: "required"` with a single tool becomes that function by name, which the server forces
  (with a grammar over its parameters) and streams back as `tool_calls` deltas.

Everything else (sampling, logprobs, tools with a named choice, streaming) is the server's own behaviour.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]


def rewrite(body: dict[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        body["response_format"] = {"type": "json_object", "schema": (fmt.get("json_schema") or {}).get("schema", {})}
    tools = body.get("tools") or []
    if body.get("tool_choice") == "required" and len(tools) == 1:
        body["tool_choice"] = {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
    return body


class OpenAIShapes:
    """ASGI middleware: buffers a POST to /chat/completions, rewrites its JSON, hands it on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].endswith("/chat/completions"):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = json.dumps(rewrite(json.loads(b"".join(chunks)))).encode()
        except ValueError:
            body = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return dict(await receive())
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app({**scope, "headers": headers}, replay, send)


def main() -> None:
    import llama_cpp.server.__main__ as server

    create = server.create_app  # type: ignore[attr-defined]
    server.create_app = lambda **kwargs: OpenAIShapes(create(**kwargs))  # type: ignore[attr-defined]
    server.main()  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    main()
