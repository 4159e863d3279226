"""How a call ended is computed once (app/calls.py), and the audit record is filled from domain values."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from laas.core.errors import InvalidArgument, MemoryBudgetExceeded, ModelLoading, NotFound, Unauthenticated
from laas.core.types import ChatMessage, Usage
from laas.daemon.app.calls import Call, status_of
from laas.daemon.audit import AuditLog, AuditRecord

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("error", "status"), [
    (None, "OK"),
    (asyncio.CancelledError(), "CANCELLED"),
    (GeneratorExit(), "CANCELLED"),
    (InvalidArgument("x", field="prompt"), "INVALID_ARGUMENT"),
    (NotFound("x"), "NOT_FOUND"),
    (MemoryBudgetExceeded("x"), "RESOURCE_EXHAUSTED"),
    (ModelLoading("x"), "UNAVAILABLE"),
    (Unauthenticated("x"), "UNAUTHENTICATED"),
    (RuntimeError("a bug"), "INTERNAL"),
])
def test_status_of_an_ending(error: BaseException | None, status: str) -> None:
    assert status_of(error) == status


def test_the_first_to_see_the_end_settles_it_and_the_others_read_it() -> None:
    call = Call()
    assert call.settle(NotFound("no such model")) == "NOT_FOUND"
    # an edge that sees the same call end later (say, as the abort that answered it) reads the same status
    assert call.settle(None) == "NOT_FOUND"
    assert call.settle(RuntimeError()) == "NOT_FOUND"


def test_the_audit_record_is_filled_from_domain_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", with_prompts=True)
    record = AuditRecord("Chat", "ab12 (app)", "ipv4:127.0.0.1:1", "rid-1")
    call = Call(audit=record, audit_log=log)
    call.begin("m", (ChatMessage("system", "be brief"), ChatMessage("user", "hi")))
    record.saw_route("m", "local", True, 0)
    record.saw_route("cloud-a", "cloud", False, 2)
    record.saw_usage(Usage(7, 3))
    record.status = call.settle(None)
    log.write(record)
    log.close()
    started, ended = (json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines())
    assert started["status"] == "STARTED" and started["model"] == "m" and started["routes"] == []
    assert started["prompt"] == [["system", "be brief"], ["user", "hi"]]
    assert ended["status"] == "OK" and ended["routes"] == ["m:local", "cloud-a:cloud"]
    assert ended["local_only"] is True and ended["redacted"] == 2
    assert (ended["prompt_tokens"], ended["completion_tokens"]) == (7, 3)


def test_a_call_without_an_audit_record_writes_nothing(tmp_path: Path) -> None:
    call = Call()
    call.begin("m", "a prompt")  # health checks, callers refused before they were known: nothing to fill
    assert call.audit is None and not list(tmp_path.iterdir())
