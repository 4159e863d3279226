"""Another laasd as a target, over laas.v1: what LAN peers do. Two real daemons on loopback."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from laas.client import Client, LaasError
from tests.cloud_server import free_port
from tests.daemon_process import DaemonProcess

LOCAL = "smollm2-135m-instruct"
LONG_PROMPT = "Notes on tides and moons. " * 120  # about 720 tokens


def _config(context_length: int, peer_port: int) -> str:
    return f"""
[[models]]
name = "{LOCAL}"
path = "SmolLM2-135M-Instruct.Q4_1.gguf"
context_length = {context_length}

[[remotes]]
name = "peer"
kind = "peer"
url = "127.0.0.1:{peer_port}"
context_length = 4096
ttft_ms = 100
inter_token_ms = 15
"""


def test_an_oversized_request_goes_to_a_peer_that_never_forwards_it(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    small_port = free_port()
    # The big daemon lists the small one as its own peer: a loop, if peers forwarded.
    big = start_daemon(_config(4096, small_port))
    small = start_daemon(_config(512, big.port), listen=f"127.0.0.1:{small_port}")
    assert small.port == small_port
    with Client(small.target) as client:
        chunks = list(client.generate(LONG_PROMPT, max_tokens=12, temperature=0, ignore_eos=True))
        route = chunks[0].route
        assert route is not None and (route.target, route.kind) == ("peer", "peer")
        assert chunks[-1].completion_tokens == 12
        chat = list(client.chat([("user", LONG_PROMPT)], max_tokens=8))
        assert chat[0].route is not None and chat[0].route.kind == "peer"
        # Too big for both: the peer refuses (its request is LOCAL_ONLY) and nothing loops back.
        with pytest.raises(LaasError):
            list(client.generate(LONG_PROMPT * 8, max_tokens=8))
    assert big.health() == "SERVING" and small.health() == "SERVING"
