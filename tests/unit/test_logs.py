"""Log formats: journald priority prefixes, JSON lines, request ids, and detecting the journal stream."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from laas.daemon.logs import configure_logging, request_id, stream_is_journal


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(log_format: str, environ: dict[str, str] | None = None) -> list[str]:
    out = io.StringIO()
    configure_logging("debug", log_format, environ or {}, out)
    log = logging.getLogger("laas.test")
    log.info("plain line")
    token = request_id.set("req-42")
    try:
        log.warning("inside a call")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        request_id.reset(token)
    return out.getvalue().splitlines()


@pytest.mark.usefixtures("restore_root_logger")
def test_journal_format_prefixes_every_line_with_its_priority() -> None:
    lines = _emit("journal")
    assert lines[0] == "<6>laas.test: plain line"
    assert lines[1] == "<4>laas.test: [req-42] inside a call"
    assert lines[2] == "<3>laas.test: [req-42] failed"
    assert all(line.startswith("<3>") for line in lines[3:])  # the traceback keeps the error priority
    assert any("ValueError: boom" in line for line in lines[3:])


@pytest.mark.usefixtures("restore_root_logger")
def test_json_format_is_one_object_a_line() -> None:
    records = [json.loads(line) for line in _emit("json")]
    assert len(records) == 3
    assert records[0]["level"] == "info" and records[0]["priority"] == 6 and "request_id" not in records[0]
    assert records[1] == records[1] | {"level": "warning", "msg": "inside a call", "request_id": "req-42",
                                       "logger": "laas.test"}
    assert "ValueError: boom" in records[2]["exc"]
    assert records[0]["ts"].endswith("Z")


@pytest.mark.usefixtures("restore_root_logger")
def test_text_format_has_time_and_level() -> None:
    lines = _emit("text")
    assert " INFO laas.test: plain line" in lines[0]
    assert " WARNING laas.test: [req-42] inside a call" in lines[1]


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert stream_is_journal(stream, environ)
        assert not stream_is_journal(other, environ)  # e.g. stderr redirected by a child's parent
        assert not stream_is_journal(stream, {})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": "garbage"})


@pytest.mark.usefixtures("restore_root_logger")
def test_auto_picks_the_journal_format_only_on_the_journal_stream(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        configure_logging("info", "auto", {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        logging.getLogger("laas.test").info("hello")
        stream.seek(0)
        assert stream.read() == "<6>laas.test: hello\n"
