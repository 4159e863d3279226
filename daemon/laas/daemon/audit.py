"""The audit log: one JSON line per API call, in its own file, apart from the daemon's log.

Layer: infrastructure. The record of a call is filled from domain values: who called by the access
check (access.py), the rest by the application layer (app/runtime.py), which says when the use case
begins. A line with status STARTED when an authorized call begins (so a call cut by a
crash or SIGKILL leaves a trace; both lines carry its request_id), and one when it ends: who called
(token id and name, or the client certificate's subject, and the peer address), which method, which
model, where it was routed, whether it stayed local-only, how many items were redacted, how many tokens,
the status and the time taken. Never the prompt or the answer, unless the operator sets `audit_prompts`
(then the prompt or the chat messages, not the answer). The file is created mode 0600 and opened for
appending, one write per line (no buffer a crash loses); logrotate's copytruncate suits it. Every field
is bounded, whatever the client sent: a string beyond MAX_FIELD_CHARS (a prompt: MAX_PROMPT_CHARS) is
cut and ends with a marker that says how much was cut.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from laas.core.types import ChatMessage, Usage

MAX_FIELD_CHARS = 256  # a model name's limit (validation.MAX_MODEL_NAME)
MAX_PROMPT_CHARS = 1 << 20  # the prompt's limit (validation.MAX_PROMPT_BYTES)
MAX_ITEMS = 1024  # chat messages (validation.MAX_MESSAGES), routes


def bounded(value: Any, limit: int = MAX_FIELD_CHARS) -> Any:
    """The value with every string cut to `limit` characters and every list to MAX_ITEMS items, marked."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}...[{len(value) - limit} more chars]"
    if isinstance(value, list | tuple):
        items = [bounded(v, limit) for v in value[:MAX_ITEMS]]
        return [*items, f"...[{len(value) - MAX_ITEMS} more items]"] if len(value) > MAX_ITEMS else items
    return value


@dataclass
class AuditRecord:
    method: str
    who: str
    peer: str
    request_id: str
    status: str = "OK"
    model: str = ""
    routes: list[str] = field(default_factory=list)
    local_only: bool = False
    redacted: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ms: float = 0.0
    prompt: Any = None

    def saw_route(self, target: str, kind: str, local_only: bool, redacted: int) -> None:
        """A route the call took (a failover adds another), as the application layer sends it on."""
        self.routes.append(f"{target}:{kind}")
        self.local_only = self.local_only or local_only
        self.redacted += redacted

    def saw_usage(self, usage: Usage) -> None:
        self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens


def _plain(prompt: Any) -> Any:
    """A prompt as JSON: the text, or the chat messages as [role, content] pairs."""
    if isinstance(prompt, tuple | list):
        return [[m.role, m.content] if isinstance(m, ChatMessage) else m for m in prompt]
    return prompt


class AuditLog:
    def __init__(self, path: Path | None, with_prompts: bool = False) -> None:
        self.with_prompts = with_prompts
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def start(self, record: AuditRecord) -> None:
        """The line that says a call began (its end writes another, with the same request_id)."""
        self.write(replace(record, status="STARTED", routes=[]))

    def write(self, record: AuditRecord) -> None:
        if self._file is None:
            return
        fields = {k: bounded(v) for k, v in asdict(record).items() if k != "prompt"}
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                **fields}
        if self.with_prompts:
            line["prompt"] = bounded(_plain(record.prompt), MAX_PROMPT_CHARS)
        line["ms"] = round(record.ms, 1)
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
