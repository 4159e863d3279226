"""What quantization cost: perplexity on a held-out text, top-1 agreement, size and decode speed.

Layer: exporters (numpy; onnxruntime or llama-cpp-python through the daemon's own engines, no torch).
The held-out text ships with laas (data/heldout.txt, written for the project, Apache-2.0). It is cut
into windows of `window` tokens, each scored from an empty cache; perplexity is exp(mean negative log
likelihood of every next token). Top-1 agreement is the share of positions where the model's most
likely next token equals the unquantized reference's. Decode speed is a greedy generation through the
engine the daemon would serve the model with.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import math
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from laas.core.engine import Engine
from laas.core.types import Completion, GenerationRequest, SamplingParams

T = TypeVar("T")
WINDOW = 256
SPEED_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
SPEED_TOKENS = 64


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs a coroutine to completion from synchronous code, even when the caller's thread already runs
    an event loop (then in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def heldout_text() -> str:
    return importlib.resources.files("laas.exporters").joinpath("data/heldout.txt").read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-position results of one model on one token sequence."""

    nll: npt.NDArray[np.float64]  # negative log likelihood of each next token
    top1: npt.NDArray[np.int64]  # the most likely next token at each position

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.mean()))


@dataclass(frozen=True, slots=True)
class Evaluation:
    perplexity: float
    tokens: int
    size_bytes: int
    decode_tokens_per_second: float
    time_to_first_token_ms: float
    reference: str | None = None
    reference_perplexity: float | None = None
    top1_agreement: float | None = None

    @property
    def perplexity_increase(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity - 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"perplexity_increase": self.perplexity_increase, "text": "laas heldout.txt",
                               "window": WINDOW}


class ScoresLogits(Protocol):
    def __call__(self, tokens: Sequence[int]) -> npt.NDArray[np.float32]: ...


def score(logits_of: ScoresLogits, tokens: Sequence[int], window: int = WINDOW) -> Scores:
    nll: list[npt.NDArray[np.float64]] = []
    top1: list[npt.NDArray[np.int64]] = []
    for start in range(0, len(tokens) - 1, window):
        chunk = list(tokens[start:start + window])
        if len(chunk) < 2:
            break
        logits = np.asarray(logits_of(chunk), dtype=np.float64)[:-1]
        targets = np.asarray(chunk[1:])
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(shifted).sum(axis=1))
        nll.append(log_z - shifted[np.arange(len(targets)), targets])
        top1.append(logits.argmax(axis=1).astype(np.int64))
    if not nll:
        raise ValueError("the evaluation text is shorter than two tokens")
    return Scores(np.concatenate(nll), np.concatenate(top1))


def agreement(a: Scores, b: Scores) -> float:
    n = min(len(a.top1), len(b.top1))
    return float((a.top1[:n] == b.top1[:n]).mean())


def decode_speed(engine: Engine, tokens: int = SPEED_TOKENS) -> tuple[float, float]:
    """(decode tokens/s, time to first token ms) of one greedy generation of `tokens` tokens."""

    async def run() -> Completion:
        request = GenerationRequest(SPEED_PROMPT, SamplingParams(max_tokens=tokens, temperature=0.0,
                                                                 ignore_eos=True))
        async for _ in engine.generate(request):  # warm-up: first-run allocations
            pass
        done = None
        async for chunk in engine.generate(request):
            if isinstance(chunk, Completion):
                done = chunk
        assert done is not None  # every stream ends with a Completion (the engine contract)
        return done

    done = run_sync(run)
    t = done.timings
    return (max(done.usage.completion_tokens - 1, 0) * 1000.0 / t.decode_ms if t.decode_ms else 0.0), t.prompt_ms


def evaluate_onnx(folder: Path, *, threads: int, tokens: int | None = None,
                  reference: tuple[str, Scores] | None = None) -> tuple[Evaluation, Scores]:
    from laas.daemon.backends.onnx import OnnxEngine

    engine = run_sync(lambda: OnnxEngine.load(folder, context_length=max(WINDOW, 512), threads=threads))
    try:
        ids = engine.text_tokens(heldout_text())[: tokens or None]
        scores = score(engine.decoder_logits, ids)
        speed, ttft = decode_speed(engine)
        return _evaluation(scores, len(ids), engine.info.size_bytes, speed, ttft, reference), scores
    finally:
        run_sync(engine.aclose)


def evaluate_gguf(path: Path, *, threads: int, tokens: int | None = None,
                  reference: tuple[str, Scores] | None = None) -> tuple[Evaluation, Scores]:
    import llama_cpp

    from laas.daemon.backends.gguf import GgufEngine
    from laas.daemon.backends.llama_lib import init_backends
    from laas.daemon.gguf_header import read_gguf_header

    init_backends()

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)
    try:
        ids = list(llm.tokenize(heldout_text().encode(), add_bos=False, special=False))[: tokens or None]

        def logits_of(tokens: Sequence[int]) -> npt.NDArray[np.float32]:
            llm.reset()  # type: ignore[no-untyped-call]
            llm.eval(list(tokens))
            return np.array(llm.scores[: len(tokens)], dtype=np.float32)

        scores = score(logits_of, ids)
    finally:
        llm.close()
    header = read_gguf_header(path)
    gguf = run_sync(lambda: GgufEngine.load(path, header, context_length=512, threads=threads))
    try:
        speed, ttft = decode_speed(gguf)
    finally:
        run_sync(gguf.aclose)
    return _evaluation(scores, len(ids), header.size_bytes, speed, ttft, reference), scores


def _evaluation(scores: Scores, n: int, size: int, speed: float, ttft: float,
                reference: tuple[str, Scores] | None) -> Evaluation:
    return Evaluation(
        perplexity=scores.perplexity, tokens=n, size_bytes=size, decode_tokens_per_second=speed,
        time_to_first_token_ms=ttft,
        reference=reference[0] if reference else None,
        reference_perplexity=reference[1].perplexity if reference else None,
        top1_agreement=agreement(scores, reference[1]) if reference else None,
    )


def format_table(rows: Sequence[tuple[str, str, Evaluation]]) -> str:
    """rows: (model name, quantization, evaluation)."""
    head = (f"{'model':34} {'quant':9} {'perplexity':>10} {'vs ref':>8} {'top-1':>7} {'size MB':>8} "
            f"{'tok/s':>7} {'TTFT ms':>8}")
    lines = [head, "-" * len(head)]
    for name, quant, e in rows:
        rise = f"{e.perplexity_increase:+.1%}" if e.perplexity_increase is not None else "-"
        top1 = f"{e.top1_agreement:.1%}" if e.top1_agreement is not None else "-"
        lines.append(f"{name:34} {quant:9} {e.perplexity:10.3f} {rise:>8} {top1:>7} {e.size_bytes / 1e6:8.1f} "
                     f"{e.decode_tokens_per_second:7.1f} {e.time_to_first_token_ms:8.0f}")
    return "\n".join(lines)
