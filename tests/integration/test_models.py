"""Tokenize, the model catalogue, health and reflection over real gRPC."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from laas.client import Client
from laas.daemon.store import DEFAULT_MODEL
from tests.daemon_process import DaemonProcess


def test_tokenize_counts_tokens(client: Client) -> None:
    tokens = client.tokenize("Hello world, hello world.")
    assert len(tokens) >= 4
    assert all(isinstance(t, int) and t >= 0 for t in tokens)
    assert client.tokenize("Hello world, hello world.") == tokens
    assert len(client.tokenize("Hello world, hello world. " * 10)) > len(tokens) * 5


def test_list_and_get_model(client: Client) -> None:
    models = client.models()
    assert [m.name for m in models] == ["smollm2-135m-instruct"]
    m = client.model("smollm2-135m-instruct")
    assert m == models[0] or (m.name, m.state) == (models[0].name, models[0].state)
    assert m.format == "gguf"
    assert m.quantization == "Q4_1"
    assert m.architecture == "llama"
    assert m.context_length == 4096
    assert m.trained_context_length == 8192
    assert m.size_bytes == 98362432
    assert m.loaded and m.state == "ready" and m.is_default
    assert client.model("").name == m.name  # empty name: the default model
    assert DEFAULT_MODEL.filename.endswith(".gguf")


def test_health_service(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "laas.v1.Runtime"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
            raise AssertionError("unknown service must be NOT_FOUND")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api(daemon: DaemonProcess) -> None:
    with grpc.insecure_channel(daemon.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"laas.v1.Runtime", "grpc.health.v1.Health"} <= services
        runtime = db.FindFileContainingSymbol("laas.v1.Runtime")
        assert runtime.package == "laas.v1"
        methods = {m.name for m in runtime.service[0].method}
        assert {"Generate", "Chat", "Tokenize", "ListModels", "GetModel"} <= methods
