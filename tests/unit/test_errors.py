"""The error table: most specific class first, status codes both ways, and the field an error names."""

from __future__ import annotations

import grpc
import pytest

from laas.core import errors
from laas.core.errors import (
    STATUS_TABLE,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    LaasError,
    ModelLoadError,
    ModelLoading,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ShuttingDown,
    Unauthenticated,
    Unavailable,
    error_for_status,
    status_for,
)

EXPECTED = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelLoading, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (LaasError, grpc.StatusCode.INTERNAL),
]


@pytest.mark.parametrize(("cls", "code"), EXPECTED)
def test_status_for_each_class(cls: type[LaasError], code: grpc.StatusCode) -> None:
    err = cls("boom")
    assert status_for(err) == code
    assert err.code == code


def test_table_is_ordered_most_specific_first() -> None:
    classes = [cls for cls, *_ in STATUS_TABLE]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls) or later is cls, f"{later.__name__} comes after its base {cls.__name__}"
    assert classes[-1] is LaasError


def test_every_error_class_in_the_module_is_in_the_table() -> None:
    in_module = {obj for obj in vars(errors).values()
                 if isinstance(obj, type) and issubclass(obj, LaasError)}
    assert in_module == {cls for cls, *_ in STATUS_TABLE}


def test_subclasses_of_unavailable_keep_unavailable_code() -> None:
    assert issubclass(ModelLoading, Unavailable) and issubclass(ShuttingDown, Unavailable)
    assert status_for(ModelLoading("x")) == grpc.StatusCode.UNAVAILABLE


def test_unmapped_subclass_gets_its_bases_code() -> None:
    class Custom(LaasError):
        pass

    class CustomNotFound(NotFound):
        pass

    assert status_for(Custom("x")) == grpc.StatusCode.INTERNAL
    assert status_for(CustomNotFound("x")) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("cls", "code"), EXPECTED)
def test_round_trip_keeps_the_code(cls: type[LaasError], code: grpc.StatusCode) -> None:
    back = error_for_status(status_for(cls("the message")), "the message")
    assert isinstance(back, LaasError)
    assert status_for(back) == code
    assert "the message" in str(back)
    assert back.field is None


@pytest.mark.parametrize(("cls", "code"), [row for row in EXPECTED if row[0] is not LaasError])
def test_error_for_status_gives_the_most_general_class(cls: type[LaasError], code: grpc.StatusCode) -> None:
    back = error_for_status(code, "m")
    general = Unavailable if code == grpc.StatusCode.UNAVAILABLE else cls
    assert type(back) is general
    assert str(back) == "m"
    assert back.message == "m"


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.ALREADY_EXISTS])
def test_unmapped_codes_become_plain_laas_error_naming_the_code(code: grpc.StatusCode) -> None:
    back = error_for_status(code, "details")
    assert type(back) is LaasError
    assert str(back) == f"{code.name}: details"
    assert status_for(back) == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(("cls", "_code"), EXPECTED)
def test_field_and_message_kept(cls: type[LaasError], _code: grpc.StatusCode) -> None:
    err = cls("bad value", field="sampling.top_p")
    assert err.field == "sampling.top_p"
    assert err.message == "bad value"
    assert str(err) == "bad value"
    assert err.args == ("bad value",)
    assert cls("no field").field is None


class _FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    """What a failed call raises on the client: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, object], ...]) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, object], ...]:
        return self._trailers


@pytest.mark.parametrize(("cls", "code"), EXPECTED)
def test_field_survives_the_wire_round_trip(cls: type[LaasError], code: grpc.StatusCode) -> None:
    from laas.client.types import error_from_rpc

    err = cls("bad value", field="sampling.top_p")
    # what the daemon sends (service.py): the code, the message, the field as trailing metadata
    wire = _FakeRpcError(status_for(err), err.message, ((errors.FIELD_METADATA_KEY, err.field),))
    back = error_from_rpc(wire)
    assert back.field == "sampling.top_p"
    assert back.code == code
    assert "bad value" in str(back)
    as_bytes = _FakeRpcError(code, "m", (("other", "x"), (errors.FIELD_METADATA_KEY, b"messages[2].role")))
    assert error_from_rpc(as_bytes).field == "messages[2].role"
    assert error_from_rpc(_FakeRpcError(code, "m", ())).field is None


def test_field_metadata_key() -> None:
    assert errors.FIELD_METADATA_KEY == "laas-field"
