"""Logging set-up: plain text for a terminal, syslog-priority prefixes for journald, or JSON lines;
each record carries the id of the request it belongs to.

Layer: composition (configured once by cli.py). Logs go to stderr. Under systemd, stderr is a journal
stream (JOURNAL_STREAM names its device and inode); journald stamps the time itself and reads a
leading "<N>" as the priority (SyslogLevelPrefix=, on by default), so `journalctl -p warning` works.
Request ids come from request_log.py through a context variable, so any log line written while a
call is served names it without passing it around. Prompts, generated text and metadata other than
the request id are never logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO

LOG_FORMATS = ("auto", "text", "journal", "json")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("laas_request_id", default="")

# syslog priorities (sd-daemon(3)) for Python's levels.
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def _priority(levelno: int) -> int:
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = request_id.get()
        record.request_id = rid
        record.rid = f" [{rid}]" if rid else ""
        return True


class JournalFormatter(logging.Formatter):
    """`<6>laas.daemon.server: message [request id]`: no time stamp (journald adds it)."""

    def __init__(self) -> None:
        super().__init__("%(name)s:%(rid)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines())  # a traceback keeps its priority


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, priority, logger, msg, request_id (when any), exc (when any)."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "priority": _priority(record.levelno),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False)
        return f"<{out['priority']}>{line}" if self._journal else line


def stream_is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal stream systemd connected (JOURNAL_STREAM is "device:inode")."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def formatter_for(log_format: str, journal: bool) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(journal=journal)
    if log_format == "journal" or (log_format == "auto" and journal):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s:%(rid)s %(message)s")


def configure_logging(level: str, log_format: str, environ: Mapping[str, str],
                      stream: TextIO | None = None) -> None:
    """Sends every log record to `stream` (stderr) in the chosen format; replaces earlier handlers."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(formatter_for(log_format, stream_is_journal(stream, environ)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
