"""TLS, mutual TLS, tokens and scopes, streams per token, limits, the audit log and the bind refusal,
against the real daemon with certificates made by the test (tests/certs.py)."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from laas.client import Client, InvalidArgument, ResourceExhausted, Tls, Unavailable
from laas.client.channels import open_channel
from laas.client.types import ModelDescription
from laas.core.errors import LaasError, ModelLoadError, NotFound, PermissionDenied, Unauthenticated
from laas.v1 import runtime_pb2 as pb
from tests.certs import CertificateAuthority
from tests.cloud_server import free_port
from tests.daemon_process import DaemonProcess

MODEL = "smollm2-135m-instruct"
SECRET_PROMPT = "The launch code is swordfish-7731"


def _laasd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "laas.daemon.cli", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def _token(file: Path, name: str, scopes: str, *extra: str) -> str:
    done = _laasd("--home", str(file.parent), "token", "--file", str(file), "create", name, "--scopes", scopes, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def secured(make_home: Callable[..., Path], ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    """TLS and tokens from systemd credentials ($CREDENTIALS_DIRECTORY), listening on every interface."""
    creds = tmp_path_factory.mktemp("credentials")
    server = ca.issue("laasd", server=True)
    (creds / "laas.tls-cert").write_bytes(server.cert)
    (creds / "laas.tls-key").write_bytes(server.key)
    tokens = {name: _token(creds / "laas.tokens", name, scopes) for name, scopes in (
        ("gen", "generate"), ("reader", "models:read"), ("admin", "models:admin"), ("nobody", ""),
        ("all", "generate,models:read,models:admin,offload"))}
    config = tmp_path_factory.mktemp("secured") / "laasd.toml"
    config.write_text("max_streams_per_token = 1\nmax_tokens_limit = 64\n")
    proc = DaemonProcess(make_home(), config, env={"CREDENTIALS_DIRECTORY": str(creds)}, listen="0.0.0.0:0",
                         tls=Tls(ca=ca.pem.cert)).start()
    yield proc, tokens
    assert proc.stop() == 0, proc.log


def _client(daemon: DaemonProcess, ca: CertificateAuthority, token: str | None) -> Client:
    return Client(daemon.target, tls=Tls(ca=ca.pem.cert), token=token)


def _audit(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (daemon.home / "audit.log").read_text().splitlines()]


def test_tls_serves_and_a_plaintext_client_is_refused(secured: tuple[DaemonProcess, dict[str, str]],
                                                      ca: CertificateAuthority) -> None:
    daemon, tokens = secured
    assert "with TLS" in daemon.log
    with _client(daemon, ca, tokens["gen"]) as client:
        assert client.complete("Hello", max_tokens=2, temperature=0).completion_tokens == 2
    with _client(daemon, ca, None) as client:
        assert client.health() == "SERVING"  # health stays open
    with Client(daemon.target) as plain, pytest.raises(Unavailable):
        plain.health(timeout=3)
    other = CertificateAuthority("another CA")
    with Client(daemon.target, tls=Tls(ca=other.pem.cert)) as wrong_ca, pytest.raises(Unavailable):
        wrong_ca.health(timeout=3)


def test_missing_or_wrong_tokens_are_unauthenticated(secured: tuple[DaemonProcess, dict[str, str]],
                                                     ca: CertificateAuthority) -> None:
    daemon, tokens = secured
    forged = tokens["all"][:-4] + ("AAAA" if not tokens["all"].endswith("AAAA") else "BBBB")  # right id, wrong secret
    for token in (None, "", "laas_00000000_nothing", forged, "Bearer"):
        with _client(daemon, ca, token) as client, pytest.raises(Unauthenticated):
            client.models()
    with _client(daemon, ca, tokens["all"]) as client:
        assert [m.name for m in client.models()] == [MODEL]


def _embed_refused_by_the_model(client: Client) -> None:
    """Past the scope check, the generative default model refuses to embed (FAILED_PRECONDITION)."""
    with pytest.raises(ModelLoadError, match="cannot embed"):
        client.embed("Hi")


CALLS: dict[str, tuple[str, Callable[[Client], object]]] = {
    "Generate": ("generate", lambda c: c.complete("Hi", max_tokens=1)),
    "Chat": ("generate", lambda c: list(c.chat([{"role": "user", "content": "Hi"}], max_tokens=1))),
    "Tokenize": ("generate", lambda c: c.tokenize("Hi")),
    "Embed": ("generate", lambda c: _embed_refused_by_the_model(c)),
    "ExplainRoute": ("generate", lambda c: c.explain("Hi", max_tokens=1)),
    "ListModels": ("models:read", lambda c: c.models()),
    "GetModel": ("models:read", lambda c: c.model(MODEL)),
    "LoadModel": ("models:admin", lambda c: c.load_model(MODEL)),
    "UnloadModel": ("models:admin", lambda c: c.unload_model(MODEL)),
}


@pytest.mark.parametrize("token_name", ["gen", "reader", "admin", "nobody", "all"])
def test_every_scope_allowed_and_denied(secured: tuple[DaemonProcess, dict[str, str]], ca: CertificateAuthority,
                                        token_name: str) -> None:
    daemon, tokens = secured
    granted = {"gen": {"generate"}, "reader": {"models:read"}, "admin": {"models:admin"}, "nobody": set(),
               "all": {"generate", "models:read", "models:admin", "offload"}}[token_name]
    with _client(daemon, ca, tokens[token_name]) as client:
        for method, (scope, call) in CALLS.items():
            if scope in granted:
                call(client)
            else:
                with pytest.raises(PermissionDenied, match=scope):
                    call(client)
                assert method  # (named in the parametrized failure)


def test_reflection_needs_a_token(secured: tuple[DaemonProcess, dict[str, str]], ca: CertificateAuthority) -> None:
    daemon, tokens = secured
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def services(token: str | None) -> list[str]:
        with open_channel(daemon.target, Tls(ca=ca.pem.cert)) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            metadata = [("authorization", f"Bearer {token}")] if token else None
            replies = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5)
            return [s.name for r in replies for s in r.list_services_response.service]

    assert "laas.v1.Runtime" in services(tokens["nobody"])
    with pytest.raises(grpc.RpcError) as denied:
        services(None)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_token_stops_working_at_once(secured: tuple[DaemonProcess, dict[str, str]],
                                             ca: CertificateAuthority) -> None:
    daemon, _ = secured
    file = Path(daemon.env["CREDENTIALS_DIRECTORY"]) / "laas.tokens"
    token = _token(file, "temp", "models:read")
    with _client(daemon, ca, token) as client:
        assert client.models()
        listed = _laasd("--home", str(file.parent), "token", "--file", str(file), "list").stdout
        assert "temp\tmodels:read" in listed and token not in listed and token not in file.read_text()
        assert _laasd("--home", str(file.parent), "token", "--file", str(file), "revoke", "temp").returncode == 0
        with pytest.raises(Unauthenticated):
            client.models()
        # A token file that cannot be read fails closed (UNAVAILABLE), never open and never UNKNOWN.
        saved = file.read_bytes()
        file.unlink()
        try:
            with pytest.raises(Unavailable, match="tokens cannot be checked"):
                client.models()
        finally:
            file.write_bytes(saved)


def test_streams_per_token_and_max_tokens_are_limited(secured: tuple[DaemonProcess, dict[str, str]],
                                                      ca: CertificateAuthority) -> None:
    daemon, tokens = secured
    with _client(daemon, ca, tokens["gen"]) as first, _client(daemon, ca, tokens["gen"]) as second, \
            _client(daemon, ca, tokens["all"]) as other:
        with pytest.raises(InvalidArgument, match="max_tokens_limit") as too_many:
            second.complete("Hi", max_tokens=65)
        assert too_many.value.field == "sampling.max_tokens"
        stream = first.generate("Once upon a time", max_tokens=64, ignore_eos=True)
        next(stream)  # one stream in flight for "gen"
        with pytest.raises(ResourceExhausted, match="max_streams_per_token"):
            second.complete("Hi", max_tokens=1)
        assert other.complete("Hi", max_tokens=1).completion_tokens == 1  # another token is not held back
        stream.close()
        for _ in range(50):  # the cancelled stream leaves the count as soon as the daemon sees it
            try:
                assert second.complete("Hi", max_tokens=1).completion_tokens == 1
                break
            except ResourceExhausted:
                continue


def test_audit_log_says_who_what_where_but_not_the_prompt(secured: tuple[DaemonProcess, dict[str, str]],
                                                          ca: CertificateAuthority) -> None:
    daemon, tokens = secured
    with _client(daemon, ca, tokens["all"]) as client:
        result = client.complete(SECRET_PROMPT, max_tokens=3, temperature=0, ignore_eos=True)
    with _client(daemon, ca, tokens["reader"]) as client, pytest.raises(PermissionDenied):
        client.complete(SECRET_PROMPT, max_tokens=3)
    lines = _audit(daemon)
    text = (daemon.home / "audit.log").read_text()
    assert "swordfish" not in text and "swordfish" not in daemon.log
    all_id = tokens["all"].split("_")[1]
    ok = [x for x in lines if x["method"] == "Generate" and x["who"] == f"{all_id} (all)" and x["status"] == "OK"]
    assert ok and ok[-1]["model"] == MODEL and ok[-1]["routes"] == [f"{MODEL}:local"]
    assert ok[-1]["completion_tokens"] == result.completion_tokens == 3 and ok[-1]["prompt_tokens"] > 3
    assert ok[-1]["peer"].startswith("ipv4:127.0.0.1:") and ok[-1]["request_id"]
    assert "prompt" not in ok[-1]
    assert any(x["method"] == "Generate" and x["who"].endswith("(reader)") and x["status"] == "PERMISSION_DENIED"
               for x in lines)
    assert any(x["who"] == "?" and x["status"] == "UNAUTHENTICATED" for x in lines)
    assert (daemon.home / "audit.log").stat().st_mode & 0o777 == 0o600


def test_mutual_tls_checks_client_certificates(start_daemon: Callable[..., DaemonProcess], ca: CertificateAuthority,
                                               tmp_path: Path) -> None:
    server_cert, server_key = ca.issue("laasd", server=True).write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem.cert)
    alice = ca.issue("alice", server=False)
    daemon = start_daemon(f'tls_cert = "{server_cert}"\ntls_key = "{server_key}"\ntls_client_ca = "{ca_file}"\n'
                          "audit_prompts = true\n", tls=Tls(ca=ca.pem.cert, cert=alice.cert, key=alice.key))
    with Client(daemon.target, tls=Tls(ca=ca.pem.cert)) as no_cert, pytest.raises(Unavailable):
        no_cert.health(timeout=3)
    mallory = CertificateAuthority("mallory CA").issue("mallory", server=False)
    with Client(daemon.target, tls=Tls(ca=ca.pem.cert, cert=mallory.cert, key=mallory.key)) as forged, \
            pytest.raises(Unavailable):
        forged.health(timeout=3)
    with Client(daemon.target, tls=Tls(ca=ca_file, cert=alice.cert, key=alice.key)) as client:
        assert client.complete(SECRET_PROMPT, max_tokens=2).completion_tokens == 2
    line = [x for x in _audit(daemon) if x["method"] == "Generate"][-1]
    assert line["who"] == "alice" and line["prompt"] == SECRET_PROMPT  # audit_prompts: the operator asked


def _serve(home: Path, listen: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return _laasd("--home", str(home), *(["--config", str(config)] if config else []), "serve", "--listen", listen)


def test_refuses_a_network_address_without_tls_and_tokens(make_home: Callable[..., Path], ca: CertificateAuthority,
                                                          tmp_path: Path) -> None:
    home = make_home()
    for listen in ("0.0.0.0:0", "127.0.0.1:0,[::]:0", ":0"):
        done = _serve(home, listen)
        assert done.returncode != 0 and "refusing to listen" in done.stderr, done.stderr
        assert "TLS" in done.stderr and "tokens" in done.stderr
    cert, key = ca.issue("laasd", server=True).write(tmp_path, "server")
    config = tmp_path / "tls-only.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{key}"\n')
    done = _serve(home, "0.0.0.0:0", config)
    assert done.returncode != 0 and "without tokens" in done.stderr, done.stderr


def test_the_loud_override_listens_anyway(start_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = start_daemon("dangerously_listen_without_tls_or_tokens = true\n", listen="0.0.0.0:0", wait_serving=False)
    assert daemon.port > 0
    daemon.wait_health("SERVING")
    with Client(daemon.target) as client:
        assert client.models()


def test_laasd_token_refuses_unknown_scopes(tmp_path: Path) -> None:
    done = _laasd("--home", str(tmp_path), "token", "create", "x", "--scopes", "generate,root")
    assert done.returncode == 2 and "unknown scope" in done.stderr
    assert not (tmp_path / "tokens").exists()


def test_errors_map_to_documented_codes() -> None:
    assert Unauthenticated("x").code == grpc.StatusCode.UNAUTHENTICATED
    assert isinstance(PermissionDenied("x"), LaasError)


def test_a_peer_reaches_a_secured_laasd_with_tls_and_its_token(secured: tuple[DaemonProcess, dict[str, str]],
                                                               ca: CertificateAuthority, tmp_path: Path,
                                                               start_daemon: Callable[..., DaemonProcess]) -> None:
    big, tokens = secured
    (tmp_path / "ca.crt").write_bytes(ca.pem.cert)
    (tmp_path / "peer.token").write_text(tokens["gen"] + "\n")
    small = start_daemon(f"""
[[models]]
name = "{MODEL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = 512

[[remotes]]
name = "big"
kind = "peer"
url = "127.0.0.1:{big.port}"
tls_ca = "{tmp_path / 'ca.crt'}"
api_key_file = "{tmp_path / 'peer.token'}"
""")
    with Client(small.target) as client:
        result = client.complete("Tides and moons. " * 150, max_tokens=4, temperature=0)
    assert [(r.target, r.kind) for r in result.routes] == [("big", "peer")] and result.completion_tokens == 4
    gen_id = tokens["gen"].split("_")[1]
    assert any(x["who"] == f"{gen_id} (gen)" and x["status"] == "OK" and x["local_only"] for x in _audit(big))


def test_streams_are_counted_per_client_certificate(start_daemon: Callable[..., DaemonProcess],
                                                    ca: CertificateAuthority, tmp_path: Path) -> None:
    """Under mutual TLS, one client's streams do not lock the others out (red-team item 7)."""
    server_cert, server_key = ca.issue("laasd", server=True).write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem.cert)
    alice, bob = ca.issue("alice", server=False), ca.issue("bob", server=False)
    daemon = start_daemon(f'tls_cert = "{server_cert}"\ntls_key = "{server_key}"\ntls_client_ca = "{ca_file}"\n'
                          "max_streams_per_token = 1\nparallel = 2\n",
                          tls=Tls(ca=ca.pem.cert, cert=alice.cert, key=alice.key))

    def as_(who: Any) -> Client:
        return Client(daemon.target, tls=Tls(ca=ca.pem.cert, cert=who.cert, key=who.key))

    with as_(alice) as first, as_(alice) as second, as_(bob) as other:
        stream = first.generate("Once upon a time", max_tokens=2000, ignore_eos=True)
        next(stream)  # alice has one stream in flight
        with pytest.raises(ResourceExhausted, match="alice already has 1 stream"):
            second.complete("Hi", max_tokens=1)
        assert other.complete("Hi", max_tokens=1).completion_tokens == 1  # bob is not held back
        stream.close()


def _raw(channel: grpc.Channel, method: str, streaming: bool = False) -> Any:
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    make = channel.unary_stream if streaming else channel.unary_unary
    return make(method, request_serializer=identity, response_deserializer=identity)


def test_undecodable_requests_are_invalid_argument_after_authentication(
        secured: tuple[DaemonProcess, dict[str, str]], ca: CertificateAuthority) -> None:
    """Invalid UTF-8 in a string field or bad wire bytes: INVALID_ARGUMENT, no traceback, one log line per
    interval (red-team item 10)."""
    daemon, tokens = secured
    bad = [b"\x0a\x01\xff", b"\xff\xff\xff", b"\x0a\x02\xc3\x28"]  # field 1 = 0xff; garbage; field 1 = "\xc3("
    auth = [("authorization", f"Bearer {tokens['all']}")]
    seen = len(daemon.lines)
    with open_channel(daemon.target, Tls(ca=ca.pem.cert)) as channel:
        tokenize = _raw(channel, "/laas.v1.Runtime/Tokenize")
        generate = _raw(channel, "/laas.v1.Runtime/Generate", streaming=True)
        check = _raw(channel, "/grpc.health.v1.Health/Check")
        for _ in range(70):
            for data in bad:
                for call in (lambda d: tokenize(d, metadata=auth, timeout=10),
                             lambda d: list(generate(d, metadata=auth, timeout=10)), lambda d: check(d, timeout=10)):
                    with pytest.raises(grpc.RpcError) as info:
                        call(data)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        with pytest.raises(grpc.RpcError) as info:  # authentication comes first
            tokenize(bad[0], timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = pb.TokenizeRequest(text="Hi").SerializeToString()
        tokenize(good, metadata=[*auth, ("x-request-id", "after-undecodable")], timeout=10)
    daemon.wait_for_line("[after-undecodable]", "Tokenize OK")  # every earlier line has been read
    new = daemon.lines[seen:]
    assert not [line for line in new if "Traceback" in line or "Unexpected" in line], "".join(new)
    assert 1 <= len([line for line in new if "undecodable" in line]) <= 2, "".join(new)
    assert any(x["status"] == "INVALID_ARGUMENT" and x["method"] == "Tokenize" for x in _audit(daemon))


def test_keep_alive_needs_models_admin_to_unload_or_pin(secured: tuple[DaemonProcess, dict[str, str]],
                                                        ca: CertificateAuthority) -> None:
    """A generate-only token can neither unload a model for everyone (0) nor pin it (1e300 or < 0): its
    keep_alive_s is clamped to [the model's 300 s, 3600 s] (red-team item 15)."""
    daemon, tokens = secured
    with _client(daemon, ca, tokens["gen"]) as gen, _client(daemon, ca, tokens["all"]) as admin:

        def settles_at(expected: float) -> ModelDescription:
            deadline = time.monotonic() + 10  # the keep-alive is set when the stream's model is released
            while (model := admin.model(MODEL)).keep_alive_s != expected and time.monotonic() < deadline:
                continue
            assert model.keep_alive_s == expected, model
            return model

        for asked, granted in ((1e300, 3600.0), (0.0, 300.0), (-1.0, 3600.0), (10.0, 300.0), (1000.0, 1000.0),
                               (0.0, 300.0)):
            assert gen.complete("Hi", max_tokens=1, keep_alive_s=asked).completion_tokens == 1
            assert settles_at(granted).loaded, (asked, granted)
        admin.complete("Hi", max_tokens=1, keep_alive_s=-1.0)  # models:admin may pin
        settles_at(-1.0)
        admin.complete("Hi", max_tokens=1, keep_alive_s=300.0)
        settles_at(300.0)


def test_not_found_lists_models_only_to_readers(secured: tuple[DaemonProcess, dict[str, str]],
                                                ca: CertificateAuthority) -> None:
    """Red-team item 19: a caller without models:read learns no model names from NOT_FOUND."""
    daemon, tokens = secured
    with _client(daemon, ca, tokens["gen"]) as gen, _client(daemon, ca, tokens["all"]) as reader:
        calls: list[Callable[[Client], object]] = [lambda c: c.complete("Hi", model="no-such-model", max_tokens=1),
                                                   lambda c: c.tokenize("Hi", model="no-such-model")]
        for call in calls:
            with pytest.raises(NotFound) as hidden:
                call(gen)
            assert "no-such-model" in str(hidden.value) and MODEL not in str(hidden.value)
            with pytest.raises(NotFound) as listed:
                call(reader)
            assert MODEL in str(listed.value)


def test_audit_log_has_a_start_line_that_survives_sigkill(start_daemon: Callable[..., DaemonProcess]) -> None:
    """A call cut by SIGKILL leaves its STARTED line (red-team item 19)."""
    daemon = start_daemon()
    with Client(daemon.target) as client:
        stream = client.generate("Once upon a time", max_tokens=256, ignore_eos=True)
        next(stream)
        daemon.kill()
        with pytest.raises(LaasError):
            list(stream)
    lines = _audit(daemon)
    started = [x for x in lines if x["method"] == "Generate" and x["status"] == "STARTED"]
    assert started and started[0]["request_id"] and started[0]["who"] == "anonymous"
    assert not [x for x in lines if x["request_id"] == started[0]["request_id"] and x["status"] != "STARTED"]


def test_model_names_in_the_audit_log_are_bounded(secured: tuple[DaemonProcess, dict[str, str]],
                                                  ca: CertificateAuthority) -> None:
    """Red-team item 2: a client-chosen 1 MiB model name costs the audit log at most a bounded line."""
    daemon, tokens = secured
    with _client(daemon, ca, tokens["all"]) as client:
        for i in range(5):
            with pytest.raises(InvalidArgument):
                client.complete("Hi", model=f"{i}" + "m" * (1 << 20), max_tokens=1)
    lines = [x for x in _audit(daemon) if x["model"].startswith(tuple("01234")) and x["model"].endswith("chars]")]
    assert len([x for x in lines if x["status"] == "STARTED"]) == 5  # (written before the call runs)
    assert all(len(json.dumps(x)) < 2048 for x in lines), [len(json.dumps(x)) for x in lines]
    assert lines[0]["model"] == "0" + "m" * 255 + f"...[{(1 << 20) + 1 - 256} more chars]"


def test_a_first_token_protects_a_running_open_daemon_at_once(start_daemon: Callable[..., DaemonProcess]) -> None:
    """`laasd token create` beside a daemon started without tokens: token checks turn on at once, and the
    command says so (red-team item 18)."""
    daemon = start_daemon()
    with Client(daemon.target) as anonymous:
        assert anonymous.models()
        done = _laasd("--home", str(daemon.home), "token", "create", "first", "--scopes", "models:read")
        assert done.returncode == 0 and "uses it at once" in done.stderr, done.stderr
        with pytest.raises(Unauthenticated):
            anonymous.models()
    with Client(daemon.target, token=done.stdout.strip()) as client:
        assert [m.name for m in client.models()] == [MODEL]
    daemon.wait_for_line("appeared: every call needs a token")


def test_metrics_endpoint_follows_the_listen_rule_and_needs_a_token(
        start_daemon: Callable[..., DaemonProcess], make_home: Callable[..., Path], ca: CertificateAuthority,
        tmp_path: Path) -> None:
    """metrics_listen beyond loopback is refused without TLS and tokens; with them, /metrics is HTTPS and needs
    a token with models:read (red-team item 20)."""
    config = tmp_path / "open-metrics.toml"
    config.write_text(f'metrics_listen = "0.0.0.0:{free_port()}"\n')
    done = _serve(make_home(), "127.0.0.1:0", config)
    assert done.returncode != 0 and "refusing to serve metrics" in done.stderr, done.stderr
    home = make_home()
    reader, gen = _token(home / "tokens", "scraper", "models:read"), _token(home / "tokens", "gen", "generate")
    cert, key = ca.issue("laasd", server=True).write(tmp_path, "server")
    port = free_port()
    daemon = start_daemon(f'tls_cert = "{cert}"\ntls_key = "{key}"\nmetrics_listen = "0.0.0.0:{port}"\n', home=home,
                          tls=Tls(ca=ca.pem.cert))
    (tmp_path / "ca.pem").write_bytes(ca.pem.cert)
    verify = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    url = f"https://localhost:{port}/metrics"
    assert httpx.get(url, verify=verify, timeout=10).status_code == 401
    assert httpx.get(url, verify=verify, timeout=10, headers={"Authorization": f"Bearer {gen}"}).status_code == 403
    ok = httpx.get(url, verify=verify, timeout=10, headers={"Authorization": f"Bearer {reader}"})
    assert ok.status_code == 200 and "laas_model_ready" in ok.text
    assert daemon.health() == "SERVING"
