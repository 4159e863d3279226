"""The status table over a real gRPC connection, without a model or a daemon process.

An in-process `grpc.aio` server on a loopback port 0 serves a fake Runtime servicer whose engine is
tests/fakes.FakeEngine; the servicer answers errors with the daemon's own mapping
(laas.daemon.request_log's RequestLogInterceptor, which every method of the daemon goes through). Every
LaasError subclass, raised by the engine in a unary call, before a stream's first message and in the
middle of a stream, reaches a real grpc client with its status code, its message and the field at fault
in the `laas-field` trailing metadata; the client SDK's error_from_rpc turns it back into a laas error.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest

from laas.client.types import error_from_rpc
from laas.core import errors
from laas.core.errors import FIELD_METADATA_KEY, LaasError, status_for
from laas.core.types import Completion, GenerationRequest, SamplingParams, TextDelta
from laas.daemon.request_log import RequestLogInterceptor  # the daemon's one error mapping
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.fakes import Fail, FakeEngine

# The documented codes (errors.py's docstring), written out rather than read from STATUS_TABLE.
CORE_CODES: dict[type[LaasError], grpc.StatusCode] = {
    errors.LaasError: grpc.StatusCode.INTERNAL,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.MemoryBudgetExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ModelLoading: grpc.StatusCode.UNAVAILABLE,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.TargetFailed: grpc.StatusCode.UNAVAILABLE,
    errors.Unsupported: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Modules that define LaasError subclasses of their own (found by `grep -rn "^class .*Error\b"`); importing
# them makes their classes part of the walk below.
OTHER_ERROR_MODULES = ("laas.daemon.settings", "laas.daemon.tokens", "laas.daemon.liveness", "laas.exporters.errors")


def _subclasses(cls: type[LaasError]) -> Iterator[type[LaasError]]:
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def every_error_class() -> list[type[LaasError]]:
    for name in OTHER_ERROR_MODULES:
        importlib.import_module(name)
    return sorted(set(_subclasses(LaasError)), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def expected_code(cls: type[LaasError]) -> grpc.StatusCode:
    """The code of the nearest class in CORE_CODES along the class's own ancestry."""
    return next(CORE_CODES[base] for base in cls.__mro__ if base in CORE_CODES)


class FakeRuntime(pb_grpc.RuntimeServicer):
    """Tokenize and Generate over a FakeEngine; errors raised as the daemon's servicer raises them, answered
    by the daemon's interceptor."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
                       ) -> pb.TokenizeResponse:
        tokens = await self.engine.tokenize(request.text, add_special=request.add_special)
        return pb.TokenizeResponse(tokens=list(tokens), count=len(tokens))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        sampling = SamplingParams(max_tokens=request.sampling.max_tokens, temperature=0.0, ignore_eos=True)
        async for chunk in self.engine.generate(GenerationRequest(request.prompt, sampling)):
            if isinstance(chunk, TextDelta):
                yield pb.GenerateResponse(text=chunk.text)
            elif isinstance(chunk, Completion):
                yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH,
                                          usage=pb.Usage(completion_tokens=chunk.usage.completion_tokens))


@asynccontextmanager
async def serving(engine: FakeEngine) -> AsyncIterator[pb_grpc.RuntimeStub]:
    """A real grpc.aio server on 127.0.0.1:0 and a real client channel to it."""
    server = grpc.aio.server(interceptors=[RequestLogInterceptor()])
    # Only Tokenize and Generate: the other methods are the generated base's (UNIMPLEMENTED).
    pb_grpc.add_RuntimeServicer_to_server(FakeRuntime(engine), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.RuntimeStub(channel)
    finally:
        await server.stop(grace=None)


def _field(e: grpc.aio.AioRpcError) -> str | None:
    return next((str(v) for k, v in e.trailing_metadata() or () if k == FIELD_METADATA_KEY), None)


def _generate(max_tokens: int = 6) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="Once upon a time", sampling=pb.SamplingParams(max_tokens=max_tokens))


def test_the_walk_finds_every_class_and_the_table_agrees() -> None:
    found = every_error_class()
    assert set(CORE_CODES) <= set(found)
    assert {c for c in found if c.__module__ == errors.__name__} == set(CORE_CODES), \
        "a new error class in laas.core.errors: give it its documented code in CORE_CODES"
    assert {"SettingsError", "TokenFileError", "EngineStuck", "ExportError"} <= {c.__name__ for c in found}
    for cls in found:
        assert status_for(cls("x")) == expected_code(cls), cls


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
async def test_every_error_reaches_a_real_client_with_its_code_and_field(cls: type[LaasError]) -> None:
    code = expected_code(cls)
    error = cls(f"{cls.__name__} says no", field="sampling.top_p")
    async with serving(FakeEngine(fail=Fail(error, at_token=None))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Tokenize(pb.TokenizeRequest(text="hi"))
    async with serving(FakeEngine(fail=Fail(error, at_token=0))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as first:
            async for _ in stub.Generate(_generate()):
                raise AssertionError("no message comes before an error raised before the first token")
    got: list[str] = []
    async with serving(FakeEngine(fail=Fail(error, at_token=3))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as middle:
            async for msg in stub.Generate(_generate()):
                got.append(msg.text)
    assert len(got) == 3 and all(got), "the three deltas before the error arrive"
    for e in (unary.value, first.value, middle.value):
        assert e.code() == code
        assert e.details() == f"{cls.__name__} says no"
        assert _field(e) == "sampling.top_p"
        back = error_from_rpc(e)  # the client SDK's mapping back
        assert status_for(back) == code and back.field == "sampling.top_p"
        assert back.message.endswith(f"{cls.__name__} says no")


async def test_an_error_without_a_field_sends_no_field_metadata() -> None:
    async with serving(FakeEngine(fail=Fail(errors.NotFound("no such model"), at_token=1))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in stub.Generate(_generate()):
                pass
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert _field(e.value) is None
    assert error_from_rpc(e.value).field is None


@pytest.mark.parametrize("at_token", [None, 0, 2], ids=["unary", "stream-start", "stream-middle"])
async def test_any_other_exception_is_internal_without_its_text(at_token: int | None) -> None:
    bug = RuntimeError("secret internals: /home/someone/.key")
    async with serving(FakeEngine(fail=Fail(bug, at_token=at_token))) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            if at_token is None:
                await stub.Tokenize(pb.TokenizeRequest(text="hi"))
            else:
                async for _ in stub.Generate(_generate()):
                    pass
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (e.value.details() or "")
    assert _field(e.value) is None


async def test_a_healthy_stream_ends_with_its_final_message() -> None:
    engine = FakeEngine()
    async with serving(engine) as stub:
        messages = [m async for m in stub.Generate(_generate(max_tokens=5))]
        tokens = await stub.Tokenize(pb.TokenizeRequest(text="Hello world", add_special=False))
    assert [m.finish_reason for m in messages][-1] == pb.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 5 and "".join(m.text for m in messages)
    assert list(tokens.tokens) == list(await engine.tokenize("Hello world", add_special=False))
    assert engine.streams == 0
