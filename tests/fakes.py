"""A fake engine for the fast test tier: behaves like a real one (the contract suite runs it), needs no model.

Layer: tests (imports only laas.core). FakeEngine streams TextDelta items and then one Completion; honours
max_tokens, stop strings (the request's and the template's), the end-of-sequence token unless ignore_eos,
and the context window; tokenizes deterministically with three control tokens (<|endoftext|>, <|im_start|>,
<|im_end|>) that are parsed except inside literal spans (the \\ufdd0...\\ufdd1 markers message contents get);
renders chat with a ChatML template. Each token is one decode step (`step_s`, off the loop's other work
only in the sense that it awaits), so closing or cancelling the stream stops decoding within a step.

What it "generates" is a pure function of the prompt: after a count ("1, 2, 3,") it counts on (" 4", ",",
" 5", ...); after an assistant turn's header it answers one sentence and then the end-of-sequence token;
otherwise it tells an endless story. Errors can be injected: `fail` raises at a chosen point of a stream or
from tokenize, so the gRPC edge's status table can be checked without a model.
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass

from laas.core.engine import Engine
from laas.core.errors import LaasError, OutOfRange
from laas.core.types import (
    ChatMessage,
    Completion,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelFormat,
    ModelInfo,
    TextDelta,
    Timings,
    Tool,
    Usage,
)

BOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CONTROL = {BOS: 0, IM_START: 1, IM_END: 2}
EOS_ID = CONTROL[IM_END]
OPEN, CLOSE = "\ufdd0", "\ufdd1"  # a literal span's markers (laas.daemon.backends.literal_text's)
VOCAB = 49152
_CONTROL = re.compile("|".join(re.escape(t) for t in CONTROL))
_PIECE = re.compile(r"\s?\w+|\s?[^\w\s]|\s+")
_COUNT = re.compile(r"(\d+),\s*$")
ANSWER = (" Hello", "!", " I", " am", " a", " fake", " model", ".")
STORY = (" there", " was", " a", " small", " fake", " model", " that", " counted", " its", " steps", ".")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "<|im_start|>assistant\n")


@dataclass(frozen=True, slots=True)
class Fail:
    """An error to raise: in tokenize (`at_token` None), or in a stream before its `at_token`-th text delta
    (a LaasError, or any other exception for a bug)."""

    error: Exception
    at_token: int | None = 0


def _piece_id(piece: str) -> int:
    return len(CONTROL) + zlib.crc32(piece.encode("utf-8")) % (VOCAB - len(CONTROL))


def _spans(text: str) -> Iterator[tuple[str, bool]]:
    """`text` as (piece, literal) pieces: markers removed, stray markers dropped (as the real engines do)."""
    pos = 0
    for match in re.finditer(f"{OPEN}([^{OPEN}{CLOSE}]*){CLOSE}", text):
        yield re.sub(f"[{OPEN}{CLOSE}]", "", text[pos:match.start()]), False
        yield match.group(1), True
        pos = match.end()
    yield re.sub(f"[{OPEN}{CLOSE}]", "", text[pos:]), False


def tokenize(text: str, add_special: bool = True) -> list[int]:
    """Deterministic ids: control tokens parsed outside literal spans, other text in word-sized pieces."""
    ids = [CONTROL[BOS]] if add_special else []
    for part, literal in _spans(text):
        pos = 0
        matches = [] if literal else list(_CONTROL.finditer(part))
        for match in matches:
            ids += [_piece_id(p) for p in _PIECE.findall(part[pos:match.start()])]
            ids.append(CONTROL[match.group(0)])
            pos = match.end()
        ids += [_piece_id(p) for p in _PIECE.findall(part[pos:])]
    return ids


def _mark(content: str) -> str:
    """A message's content with its control-token texts made literal (and no markers of its own)."""
    content = re.sub(f"[{OPEN}{CLOSE}]", "\ufffd", content)
    return _CONTROL.sub(lambda m: f"{OPEN}{m.group(0)}{CLOSE}", content)


def continuation(prompt: str) -> Iterator[str | None]:
    """The fake model's greedy continuation of `prompt`: text pieces, None for the end-of-sequence token
    (after which it goes on with the story, as a model asked to ignore it would)."""
    visible = re.sub(f"[{OPEN}{CLOSE}]", "", prompt)
    if visible.endswith(f"{IM_START}assistant\n"):
        yield from ANSWER
        yield None
    elif (count := _COUNT.search(visible)) is not None:
        n = int(count.group(1))
        while True:
            n += 1
            yield f" {n}"
            yield ","
    while True:
        yield from STORY


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (not sent yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class FakeEngine(Engine):
    """An Engine without a model: see the module docstring. `decoded_tokens` counts decode steps."""

    def __init__(self, *, context_length: int = 2048, step_s: float = 0.001, fail: Fail | None = None,
                 chat_template: str | None = CHAT_TEMPLATE) -> None:
        self._info = ModelInfo(ModelFormat.GGUF, "Q4_1", context_length, max(context_length, 8192), 91_700_000,
                               "fake", chat_template)
        self.step_s = step_s
        self.fail = fail
        self.closed = False
        self.streams = 0  # streams running now

    @property
    def info(self) -> ModelInfo:
        return self._info

    async def tokenize(self, text: str, *, add_special: bool = True) -> Sequence[int]:
        if self.fail is not None and self.fail.at_token is None:
            raise self.fail.error
        return tokenize(text, add_special)

    async def render_chat(self, messages: Sequence[ChatMessage], tools: Sequence[Tool] = ()) -> GenerationRequest:
        prompt = "".join(f"{IM_START}{m.role}\n{_mark(m.content)}{IM_END}\n" for m in messages)
        return GenerationRequest(prompt=prompt + f"{IM_START}assistant\n", template_stops=(IM_END,),
                                 add_special=False, messages=tuple(messages))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        start = time.perf_counter()
        prompt = list(request.prompt_tokens or tokenize(request.prompt, request.add_special))
        if len(prompt) >= self._info.context_length:
            raise OutOfRange(f"prompt: {len(prompt)} tokens leave no room in the context of "
                             f"{self._info.context_length}", field="prompt")
        s = request.sampling
        room = self._info.context_length - len(prompt)
        limit = room if s.max_tokens is None else min(s.max_tokens, room)
        stops = tuple(t for t in (*s.stop, *request.template_stops) if t)
        self.streams += 1
        try:
            await asyncio.sleep(self.step_s)  # the prompt's evaluation
            evaluated = last = time.perf_counter()
            sent = 0  # text deltas sent
            generated = 0
            text = ""  # generated, not sent yet (it may be the start of a stop string)
            finish = FinishReason.LENGTH
            for piece in continuation(request.prompt):
                if generated == limit:
                    break
                if self.fail is not None and self.fail.at_token == sent:
                    raise self.fail.error
                await asyncio.sleep(self.step_s)  # one decode step
                generated += 1
                self.decoded_tokens += 1
                last = time.perf_counter()
                if piece is None and not s.ignore_eos:
                    finish = FinishReason.STOP
                    break
                text += piece or ""
                hit = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=-1)
                if hit >= 0:
                    text, finish = text[:hit], FinishReason.STOP
                    break
                ready = len(text) - _held_back(text, stops)
                if ready > 0:
                    sent += 1
                    yield TextDelta(text[:ready])
                    text = text[ready:]
            if text:
                yield TextDelta(text)
            yield Completion(finish, Usage(len(prompt), generated),
                             Timings(prompt_ms=(evaluated - start) * 1000, decode_ms=(last - evaluated) * 1000))
        finally:
            self.streams -= 1

    async def check_health(self) -> None:
        if self.closed:
            raise LaasError("the fake engine is closed")

    async def aclose(self) -> None:
        self.closed = True
