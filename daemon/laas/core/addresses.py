"""Where a daemon listens unless told otherwise: the address both sides agree on.

Layer: core. The daemon's settings listen here by default and the client connects here by default, so
the number lives below both.
"""

from __future__ import annotations

DEFAULT_PORT = 7734
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"

# The OpenAI-compatible HTTP API (daemon/http), beside gRPC.
DEFAULT_HTTP_PORT = 7735
DEFAULT_HTTP_LISTEN = f"127.0.0.1:{DEFAULT_HTTP_PORT}"
