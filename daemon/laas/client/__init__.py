"""laas.client: a typed Python client of laasd, sync (:class:`Client`) and asyncio (:class:`AsyncClient`).

Layer: edge (client side). Streams are plain iterators of :class:`Chunk`; every call takes `timeout`
(seconds, sent as the gRPC deadline); failures raise the laas error for the status code
(NotFound, InvalidArgument with `.field`, OutOfRange, ResourceExhausted, Unavailable, ...).

    with Client() as laas:
        for chunk in laas.generate("The capital of France is", max_tokens=16, temperature=0):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

from laas.client.api import AsyncClient, Client
from laas.client.channels import Tls
from laas.client.types import Chunk, Embeddings, ModelDescription, Result
from laas.core.errors import (
    DeadlineExceeded,
    InvalidArgument,
    LaasError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "DeadlineExceeded",
    "Embeddings",
    "InvalidArgument",
    "LaasError",
    "ModelDescription",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Result",
    "Tls",
    "Unauthenticated",
    "Unavailable",
]
