"""Privacy on the way to the cloud, end to end: local-only requests (asked by the client, set per token
and per model) never reach the cloud server, and personal data is redacted before it leaves the device
and restored in the answer. The cloud is a real llama_cpp.server behind a proxy that counts requests
and records their bodies (tests/fault_proxy.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from laas.client import Client, OutOfRange, Result
from laas.daemon import tokens
from tests.cloud_server import CLOUD_MODEL, CloudServer
from tests.daemon_process import DaemonProcess
from tests.fault_proxy import FaultProxy

LOCAL = "smollm2-135m-instruct"
OVERSIZED = "The history of lighthouses. " * 120  # beyond the device's 512-token window
EMAIL = "alice.martin@example.org"
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def proxy(model_file: Path) -> Iterator[FaultProxy]:
    cloud = CloudServer(model_file).wait_ready()
    p = FaultProxy(cloud.url).start()
    yield p
    p.stop()
    cloud.stop()


@pytest.fixture(scope="module")
def setup(make_home: Callable[..., Path], proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    home = make_home()
    issued = {name: tokens.create(home / "tokens", name, frozenset(scopes.split(",")), local_only)[0]
              for name, scopes, local_only in (("offloader", "generate,offload", False),
                                               ("homebody", "generate,offload", True),
                                               ("no-offload", "generate", False))}
    config = tmp_path_factory.mktemp("privacy") / "laasd.toml"
    config.write_text(f"""
local_only_models = ["private"]
redact_patterns = ["ACME-[0-9]{{6}}"]

[aliases]
private = "{LOCAL}"

[[models]]
name = "{LOCAL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = 512

[[remotes]]
name = "cloud"
url = "{proxy.url}"
model = "{CLOUD_MODEL}"
models = ["{LOCAL}", "private"]
read_timeout_s = 120  # the test cloud shares two busy cores: its first token can take a minute
ttft_ms = 50
inter_token_ms = 2
""")
    proc = DaemonProcess(home, config).start()
    yield proc, issued
    assert proc.stop() == 0, proc.log


@pytest.fixture
def client(setup: tuple[DaemonProcess, dict[str, str]], proxy: FaultProxy) -> Iterator[Callable[[str], Client]]:
    daemon, issued = setup
    proxy.reset()
    opened: list[Client] = []

    def make(token: str) -> Client:
        opened.append(Client(daemon.target, token=issued[token]))
        return opened[-1]

    yield make
    for c in opened:
        c.close()


def test_the_offload_scope_lets_an_oversized_request_reach_the_cloud(client: Callable[[str], Client],
                                                                     proxy: FaultProxy) -> None:
    result = client("offloader").complete(OVERSIZED, max_tokens=4)
    assert [(r.target, r.local_only) for r in result.routes] == [("cloud", False)]
    assert proxy.requests == 1


@pytest.mark.parametrize(("token", "model", "policy"), [
    ("offloader", "", "local_only"),       # the client asks
    ("homebody", "", "auto"),              # the operator, for this token
    ("no-offload", "", "auto"),            # the token lacks the offload scope
    ("offloader", "private", "auto"),      # the operator, for this model
])
def test_local_only_requests_never_reach_the_cloud(client: Callable[[str], Client], proxy: FaultProxy, token: str,
                                                   model: str, policy: str) -> None:
    c = client(token)
    with pytest.raises(OutOfRange):  # too big for the device, and it may not leave it
        c.complete(OVERSIZED, model=model, max_tokens=4, policy=policy)
    result = c.complete("Hello", model=model, max_tokens=4, policy="cloud_only" if policy == "auto" else policy)
    assert [(r.kind, r.local_only) for r in result.routes] == [("local", True)]  # the response says so
    assert c.explain("Hello", model=model, max_tokens=4, policy=policy).chosen.local_only
    assert proxy.requests == 0


def test_redaction_round_trip_through_a_real_cloud(client: Callable[[str], Client], proxy: FaultProxy) -> None:
    prompt = (f"Customer record.\nEmail: {EMAIL}\nCard: {CARD}\nTicket: ACME-123456\n"
              f"Email: {EMAIL}\nEmail: {EMAIL}\nEmail:")
    chunks = list(client("offloader").generate(prompt, max_tokens=12, temperature=0, policy="cloud_only"))
    result = Result.join(chunks)
    route = result.routes[0]
    assert (route.target, route.redacted) == ("cloud", 5)  # three e-mails, the card, the ticket
    body = json.loads(proxy.bodies[0])
    sent = body.get("prompt") or json.dumps(body)
    assert EMAIL not in sent and "4111" not in sent and "ACME-123456" not in sent
    assert "[EMAIL_1]" in sent and "[CARD_1]" in sent and "[CUSTOM_1]" in sent
    assert EMAIL in result.text, (result.text, [c.text for c in chunks])  # the cloud wrote [EMAIL_1]; we restored it
    assert "[EMAIL_1]" not in result.text  # (the model may invent [EMAIL_2]: unknown placeholders stay as written)
    # The cloud streams "[EMAIL_1]" as several tokens; the placeholder was held back until whole, then restored.
    assert any(EMAIL in c.text for c in chunks)


def test_stop_strings_leave_redacted_and_keep_stopping(client: Callable[[str], Client], proxy: FaultProxy) -> None:
    """Issue 13 item 14: sampling.stop went to the cloud verbatim."""
    prompt = f"Contacts.\nEmail: {EMAIL}\nEmail: {EMAIL}\nEmail: {EMAIL}\nEmail:"
    result = client("offloader").complete(prompt, max_tokens=12, temperature=0, policy="cloud_only",
                                          stop=[EMAIL, "\n"])
    body = json.loads(proxy.bodies[0])
    assert body["stop"] == ["[EMAIL_1]", "\n"] and EMAIL not in proxy.bodies[0].decode()
    assert result.routes[0].redacted == 4  # three in the prompt, one stop string
    assert EMAIL not in result.text and "[EMAIL_1]" not in result.text  # it stopped where it would write it


def test_chat_is_redacted_too_and_the_device_sees_the_raw_text(client: Callable[[str], Client],
                                                              proxy: FaultProxy) -> None:
    c = client("offloader")
    messages = [{"role": "user", "content": f"My server is 192.168.10.24 and my phone is +44 20 7946 0958. "
                 f"Repeat my email: {EMAIL}"}]
    result = Result.join(c.chat(messages, max_tokens=8, temperature=0, policy="cloud_only"))
    assert result.routes[0].redacted == 3
    sent = proxy.bodies[0].decode()
    assert "192.168.10.24" not in sent and "7946" not in sent and EMAIL not in sent and "[IP_1]" in sent
    local = Result.join(c.chat(messages, max_tokens=4, temperature=0, policy="local_only"))
    assert local.routes[0].redacted == 0 and proxy.requests == 1  # the device gets the request as it is


def test_an_alias_of_a_local_only_model_stays_local(make_home: Callable[..., Path], proxy: FaultProxy,
                                                    tmp_path: Path) -> None:
    """local_only_models names the model; a request for its alias (which a remote also serves) is held to
    the same rule (red-team item 5: the cloud answered it)."""
    config = tmp_path / "laasd.toml"
    config.write_text(f"""
local_only_models = ["{LOCAL}"]

[aliases]
assistant = "{LOCAL}"

[[models]]
name = "{LOCAL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = 512

[[remotes]]
name = "cloud"
url = "{proxy.url}"
model = "{CLOUD_MODEL}"
models = ["assistant"]
""")
    proxy.reset()
    daemon = DaemonProcess(make_home(), config).start()
    try:
        with Client(daemon.target) as c:
            result = c.complete("Hello", model="assistant", max_tokens=4, policy="cloud_only")
            assert [(r.kind, r.local_only) for r in result.routes] == [("local", True)]
            with pytest.raises(OutOfRange):  # too big for the device, and it may not leave it
                c.complete(OVERSIZED, model="assistant", max_tokens=4)
            assert c.explain("Hello", model="assistant", max_tokens=4, policy="cloud_only").chosen.local_only
        assert proxy.requests == 0
    finally:
        assert daemon.stop() == 0, daemon.log
