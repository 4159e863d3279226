"""Bad input gets the right status code and names its field; the daemon keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from laas.client import Client
from laas.core.errors import LaasError
from laas.v1 import runtime_pb2 as pb
from laas.v1 import runtime_pb2_grpc as pb_grpc
from tests.daemon_process import DaemonProcess


def _error(call: Callable[[], Any]) -> LaasError:
    with pytest.raises(LaasError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    return info.value


@pytest.mark.parametrize(("sampling", "field"), [
    ({"max_tokens": -1}, "sampling.max_tokens"),
    ({"max_tokens": 0}, "sampling.max_tokens"),
    ({"temperature": -0.5}, "sampling.temperature"),
    ({"temperature": float("nan")}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_k": -3}, "sampling.top_k"),
    ({"min_p": 2.0}, "sampling.min_p"),
    ({"repeat_penalty": 0.0}, "sampling.repeat_penalty"),
    ({"presence_penalty": 3.0}, "sampling.presence_penalty"),
    ({"frequency_penalty": -2.5}, "sampling.frequency_penalty"),
    ({"stop": [""]}, "sampling.stop[0]"),
    ({"stop": ["x"] * 17}, "sampling.stop"),
])
def test_invalid_sampling_is_invalid_argument_naming_the_field(
        client: Client, sampling: dict[str, Any], field: str) -> None:
    for call in (lambda: client.generate("Hi", **sampling), lambda: client.chat([("user", "Hi")], **sampling)):
        error = _error(call)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.field == field
        assert field.split("[")[0] in str(error)


def test_unknown_model_is_not_found(client: Client) -> None:
    for call in (lambda: client.generate("Hi", model="no-such-model"),
                 lambda: client.chat([("user", "Hi")], model="no-such-model"),
                 lambda: client.tokenize("Hi", model="no-such-model"),
                 lambda: client.model("no-such-model")):
        error = _error(call)
        assert error.code == grpc.StatusCode.NOT_FOUND
        assert "no-such-model" in str(error)


def test_oversized_requests_are_out_of_range(client: Client) -> None:
    error = _error(lambda: client.generate("Hi", max_tokens=5000))
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.field == "sampling.max_tokens"
    assert "4096" in str(error)
    long_prompt = "lorem ipsum dolor sit amet " * 1200  # about 6,000 tokens for a 4,096-token window
    error = _error(lambda: client.generate(long_prompt))
    assert error.code == grpc.StatusCode.OUT_OF_RANGE
    assert error.field == "prompt"


def test_bad_chat_messages_are_invalid_argument(client: Client) -> None:
    error = _error(lambda: client.chat([]))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "messages")
    error = _error(lambda: client.chat([("user", "Hi"), ("wizard", "Hello")]))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role")


def test_oversized_prompt_is_invalid_argument(client: Client) -> None:
    error = _error(lambda: client.generate("x" * (1 << 20 | 1)))
    assert (error.code, error.field) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt")


def test_no_bad_input_gives_unknown_or_internal(daemon: DaemonProcess, client: Client) -> None:
    """Raw protobuf requests with odd values, sent without the client's help."""
    odd = [
        pb.GenerateRequest(),
        pb.GenerateRequest(prompt="\x00\ud7ff\U0010ffff"),
        pb.GenerateRequest(model="../../etc/passwd", prompt="Hi"),
        pb.GenerateRequest(model="x" * 10_000, prompt="Hi"),
        pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(max_tokens=2**31 - 1)),
        pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(temperature=float("inf"))),
        pb.GenerateRequest(prompt="Hi", sampling=pb.SamplingParams(seed=2**32 - 1, max_tokens=2, top_k=10**9)),
    ]
    with grpc.insecure_channel(daemon.target) as channel:
        stub = pb_grpc.RuntimeStub(channel)
        for request in odd:
            try:
                for _ in stub.Generate(request, timeout=60):
                    pass
            except grpc.RpcError as e:
                assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (request, e)
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(pb.TokenizeRequest(text="x" * (2 << 20)), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # ...and it still serves.
    assert client.complete("Hello", max_tokens=4, temperature=0).completion_tokens == 4


def test_a_corrupt_model_file_is_refused_and_the_others_serve(start_daemon: Callable[..., DaemonProcess],
                                                               make_home: Callable[..., Any]) -> None:
    home = make_home()
    (home / "models" / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    (home / "models" / "notgguf.gguf").write_bytes(b"<html>not a model</html>" * 10)
    daemon = start_daemon(
        '[[models]]\nname = "broken"\npath = "broken.gguf"\n\n'
        '[[models]]\nname = "notgguf"\npath = "notgguf.gguf"\n\n'
        '[[models]]\nname = "escape"\npath = "../../../../etc/passwd"\n',
        home=home)
    with Client(daemon.target) as client:
        models = {m.name: m for m in client.models()}
        for name in ("broken", "notgguf", "escape"):
            assert models[name].state == "failed", models[name]
        assert "not a valid GGUF file" in models["broken"].error
        assert "bad magic" in models["notgguf"].error
        assert "outside the model store" in models["escape"].error
        error = _error(lambda: client.generate("Hi", model="broken"))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.complete("Hello", max_tokens=3).completion_tokens == 3
