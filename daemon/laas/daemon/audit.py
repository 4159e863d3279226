"""The audit log: one JSON line per API call, in its own file, apart from the daemon's log.

Layer: infrastructure. Who called (token id and name, or the client certificate's subject, and the
peer address), which method, which model, where it was routed, whether it stayed local-only, how
many items were redacted, how many tokens, the status and the time taken. Never the prompt or the
answer, unless the operator sets `audit_prompts` (then the prompt or the chat messages, not the answer).
The file is created mode 0600 and opened for appending; logrotate's copytruncate suits it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO


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

    def observe(self, response: Any) -> None:
        """Takes the model, route and usage from a laas.v1 response message as it goes by."""
        if getattr(response, "model", ""):
            self.model = response.model
        if hasattr(response, "HasField") and "route" in type(response).DESCRIPTOR.fields_by_name \
                and response.HasField("route"):
            route = response.route
            kind = {1: "local", 2: "peer", 3: "cloud"}.get(route.kind, "?")
            self.routes.append(f"{route.target}:{kind}")
            self.local_only = self.local_only or route.local_only
            self.redacted += route.redacted
        usage = getattr(response, "usage", None)
        if usage is not None and hasattr(response, "HasField") and response.HasField("usage"):
            self.prompt_tokens, self.completion_tokens = usage.prompt_tokens, usage.completion_tokens


class AuditLog:
    def __init__(self, path: Path | None, with_prompts: bool = False) -> None:
        self.with_prompts = with_prompts
        self._file: TextIO | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def write(self, record: AuditRecord) -> None:
        if self._file is None:
            return
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                **asdict(record)}
        if not self.with_prompts:
            del line["prompt"]
        line["ms"] = round(record.ms, 1)
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
