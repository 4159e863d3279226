"""The fuzz suite: hypothesis over every RPC's fields (and the token metadata) against one real daemon.

Only documented status codes come back (README, Errors), the daemon never dies, and its memory stays
bounded. Sized for CI on 2 cores: LAAS_FUZZ_EXAMPLES cases per RPC (default 300, about 2,100 in all,
a minute or two); set it higher for a longer run, e.g. LAAS_FUZZ_EXAMPLES=20000.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from laas.daemon import tokens
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.daemon_process import DaemonProcess

EXAMPLES = int(os.environ.get("LAAS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
MODEL = "smollm2-135m-instruct"
RSS_GROWTH_LIMIT_KB = 300 * 1024


@pytest.fixture(scope="module")
def fuzzed(make_home: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    home = make_home()
    full, _ = tokens.create(home / "tokens", "fuzzer", frozenset(tokens.SCOPES))
    reader, _ = tokens.create(home / "tokens", "reader", frozenset({"models:read"}))
    config = tmp_path_factory.mktemp("fuzz") / "laasd.toml"
    config.write_text('[aliases]\nother = "smollm2-135m-instruct"\n')
    daemon = DaemonProcess(home, config).start()
    channel = grpc.insecure_channel(daemon.target)
    assert daemon.proc is not None
    yield daemon, pb_grpc.RuntimeStub(channel), health_pb2_grpc.HealthStub(channel), full, reader
    channel.close()
    assert daemon.stop() == 0, daemon.log


def _rss_kb(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def check(fuzzed: tuple[Any, ...]) -> Iterator[Callable[[Callable[[], Any]], None]]:
    """Runs one call, asserts a documented status; after the test: alive, serving, memory bounded."""
    daemon = fuzzed[0]
    seen: set[grpc.StatusCode] = set()

    def run(call: Callable[[], Any]) -> None:
        try:
            call()
            seen.add(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            assert e.code() in DOCUMENTED, (e.code(), e.details())
            seen.add(e.code())

    before = _rss_kb(daemon)
    yield run
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log
    assert daemon.health() == "SERVING"
    assert _rss_kb(daemon) - before < RSS_GROWTH_LIMIT_KB, (before, _rss_kb(daemon))
    assert grpc.StatusCode.INTERNAL not in seen and grpc.StatusCode.UNKNOWN not in seen


texts = st.one_of(st.text(max_size=64), st.sampled_from(["", MODEL, "other", "../../etc/passwd", "/etc/passwd",
                                                           "a\x00b", "\u202e", "x" * 300]))
prompts = st.one_of(st.text(max_size=200), st.sampled_from(["Hello", "{{ 7*7 }}", "<|im_start|>system\n", "\ud7ff"]),
                    st.integers(1 << 18, 1 << 21).map(lambda n: "x" * n))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
int32 = st.integers(-(1 << 31), (1 << 31) - 1)


@st.composite
def sampling(draw: st.DrawFn) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=draw(st.lists(st.text(max_size=300), max_size=20)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        msg.max_tokens = draw(st.one_of(st.integers(-4, 8), int32))
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(msg, name, draw(floats))
    if draw(st.booleans()):
        msg.top_k = draw(int32)
    if draw(st.booleans()):
        msg.seed = draw(st.integers(0, (1 << 32) - 1))
    return msg


@st.composite
def routing(draw: st.DrawFn) -> pb.Routing:
    msg = pb.Routing(policy=draw(st.one_of(st.integers(0, 4), int32)))  # type: ignore[arg-type]
    if draw(st.booleans()):
        msg.latency_budget_ms = draw(st.floats(allow_nan=True, allow_infinity=True))
    return msg


messages = st.lists(st.builds(pb.ChatMessage, role=st.one_of(st.sampled_from(["system", "user", "assistant"]), texts),
                              content=st.text(max_size=100)), max_size=6)
generate_requests = st.builds(pb.GenerateRequest, model=texts, prompt=prompts, sampling=sampling(), routing=routing())
chat_requests = st.builds(pb.ChatRequest, model=texts, messages=messages, sampling=sampling(), routing=routing())
token_ids = st.lists(int32, max_size=40)
embed_inputs = st.one_of(st.builds(pb.EmbedInput, text=prompts),
                         st.builds(lambda ids: pb.EmbedInput(tokens=pb.TokenIds(ids=ids)), token_ids),
                         st.just(pb.EmbedInput()))
embed_requests = st.builds(pb.EmbedRequest, model=texts, inputs=st.lists(embed_inputs, max_size=6),
                           dimensions=st.one_of(st.none(), st.integers(0, (1 << 32) - 1)),
                           normalize=st.one_of(st.none(), st.booleans()), truncate=st.booleans(), routing=routing())


def metadata(full: str, reader: str) -> st.SearchStrategy[list[tuple[str, str]]]:
    good = [("authorization", f"Bearer {full}")]
    printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)
    junk = st.lists(st.tuples(st.sampled_from(["authorization", "x-request-id"]), printable), max_size=3)
    return st.one_of(st.just(good), st.just(good), st.just(good), st.just([("authorization", f"Bearer {reader}")]),
                     st.just([]), junk)


def _stream(call: Any) -> None:
    try:
        for i, _ in enumerate(call):
            if i >= 1:
                break
    finally:
        call.cancel()


def _tokens(fuzzed: tuple[Any, ...]) -> st.SearchStrategy[list[tuple[str, str]]]:
    return metadata(fuzzed[3], fuzzed[4])


@FUZZ
@given(data=st.data())
def test_fuzz_generate(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None],
                       data: st.DataObject) -> None:
    stub, request, meta = fuzzed[1], data.draw(generate_requests), data.draw(_tokens(fuzzed))
    check(lambda: _stream(stub.Generate(request, metadata=meta, timeout=10)))


@FUZZ
@given(data=st.data())
def test_fuzz_chat(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None], data: st.DataObject) -> None:
    stub, request, meta = fuzzed[1], data.draw(chat_requests), data.draw(_tokens(fuzzed))
    check(lambda: _stream(stub.Chat(request, metadata=meta, timeout=10)))


@FUZZ
@given(data=st.data())
def test_fuzz_explain_route(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None],
                            data: st.DataObject) -> None:
    which = data.draw(st.sampled_from(["generate", "chat", "none"]))
    request = pb.ExplainRouteRequest(generate=data.draw(generate_requests)) if which == "generate" else \
        pb.ExplainRouteRequest(chat=data.draw(chat_requests)) if which == "chat" else pb.ExplainRouteRequest()
    meta = data.draw(_tokens(fuzzed))
    check(lambda: fuzzed[1].ExplainRoute(request, metadata=meta, timeout=10))


@FUZZ
@given(data=st.data())
def test_fuzz_embed(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None], data: st.DataObject) -> None:
    request, meta = data.draw(embed_requests), data.draw(_tokens(fuzzed))
    check(lambda: fuzzed[1].Embed(request, metadata=meta, timeout=10))


@FUZZ
@given(data=st.data())
def test_fuzz_tokenize(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None],
                       data: st.DataObject) -> None:
    request = pb.TokenizeRequest(model=data.draw(texts), text=data.draw(prompts), add_special=data.draw(st.booleans()))
    meta = data.draw(_tokens(fuzzed))
    check(lambda: fuzzed[1].Tokenize(request, metadata=meta, timeout=10))


@FUZZ
@given(data=st.data())
def test_fuzz_models(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None], data: st.DataObject) -> None:
    meta = data.draw(_tokens(fuzzed))
    name = data.draw(texts)
    check(lambda: fuzzed[1].GetModel(pb.GetModelRequest(name=name), metadata=meta, timeout=10))
    check(lambda: fuzzed[1].ListModels(pb.ListModelsRequest(), metadata=meta, timeout=10))


@FUZZ
@given(service=texts)
def test_fuzz_health(fuzzed: tuple[Any, ...], check: Callable[[Callable[[], Any]], None], service: str) -> None:
    check(lambda: fuzzed[2].Check(health_pb2.HealthCheckRequest(service=service), timeout=10))
