"""The chat-template worker process: compiles and renders one model's template in jinja2's sandbox.

Layer: infrastructure (the child side; template_process.py is the daemon's side). Templates ship inside
model files, so they are untrusted code, and jinja2's sandbox stops attribute escapes but not a loop of
10^8 steps, a 10 GB string or a recursion: those run here, in a process of their own that the daemon kills
when it overruns its time or memory budget. The environment matches Hugging Face's and llama-cpp-python's
(trim_blocks, lstrip_blocks, loopcontrols, `{% generation %}`, `raise_exception`, `tojson`, `strftime_now`),
so a template means the same prompt here as there.

Protocol: one JSON object per line each way. The worker writes {"ready": true} once started, then answers
{"compile": source} and {"render": {messages, bos_token, eos_token}, "limit": bytes} requests with
{"ok": prompt-or-null}, {"refused": message} (the template's raise_exception) or {"error": message}.
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from datetime import datetime
from typing import Any

MEMORY_LIMIT = 1 << 30  # address space of the worker (where setrlimit is allowed; the daemon also polls RSS)


class TemplateRaised(Exception):
    """The template called raise_exception: it refuses these messages."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class IgnoreGenerationTags(jinja2.ext.Extension):
        """Hugging Face's `{% generation %}` tag renders its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja2's own attribute)

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                                        extensions=[IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render(template: Any, context: dict[str, Any], limit: int) -> str:
    """Renders piece by piece, stopping as soon as the output passes `limit` bytes."""
    parts, size = [], 0
    for part in template.generate(**context, add_generation_prompt=True):
        size += len(part.encode("utf-8"))  # strict: a lone surrogate is an error
        if size > limit:
            raise ValueError(f"the rendered prompt exceeds {limit} bytes")
        parts.append(part)
    return "".join(parts)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text[:500]}" if text else type(error).__name__


def serve(lines: Any, out: Any) -> None:
    env = environment()
    template = None

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")  # ASCII: nothing the template writes can break the line
        out.flush()

    reply({"ready": True})
    for line in lines:
        try:
            request = json.loads(line)
            if "compile" in request:
                template = env.from_string(request["compile"])
                reply({"ok": None})
            elif template is None:
                reply({"error": "no template compiled"})
            else:
                reply({"ok": render(template, request["render"], int(request["limit"]))})
        except TemplateRaised as e:
            reply({"refused": str(e)[:1000]})
        except MemoryError:
            reply({"error": f"it needs more than {MEMORY_LIMIT >> 20} MiB of memory"})
        except Exception as e:  # any failure of the template's code is the template's
            reply({"error": _describe(e)})


def main() -> None:
    # A seccomp filter (the unit's SystemCallFilter=~@resources) may forbid it: the daemon polls RSS too.
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    sys.setrecursionlimit(500)
    serve(sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
