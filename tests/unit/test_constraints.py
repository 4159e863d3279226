"""constraints.check: every constraint kind compiles or is refused naming its field, before any model runs."""

from __future__ import annotations

import pytest

from laas.core.errors import InvalidArgument
from laas.core.types import Constraint, ConstraintKind
from laas.daemon import constraints

K = ConstraintKind


@pytest.mark.parametrize(("kind", "text"), [
    (K.JSON_SCHEMA, '{"type": "object", "properties": {"a": {"type": "integer"}}}'), (K.JSON_OBJECT, ""),
    (K.REGEX, "[a-z]+"), (K.LARK, 'start: "a" | "b"'), (K.GBNF, 'root ::= "a" | "b"')])
def test_good_constraints_pass(kind: ConstraintKind, text: str) -> None:
    constraints.check(Constraint(kind, text))


@pytest.mark.parametrize(("kind", "text"), [
    (K.JSON_SCHEMA, "{"), (K.JSON_SCHEMA, '{"type": "nope"}'), (K.JSON_SCHEMA, '{"enum": []}'),
    (K.REGEX, "("), (K.REGEX, r"[^\s\S]"), (K.LARK, "start: nothing"), (K.GBNF, "root ::= ("),
    (K.REGEX, ""), (K.JSON_SCHEMA, "x" * (constraints.MAX_CONSTRAINT_BYTES + 1))])
def test_bad_constraints_name_their_field(kind: ConstraintKind, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        constraints.check(Constraint(kind, text))
    assert info.value.field == f"constraint.{kind.value}"
    assert info.value.field in str(info.value)


def test_a_failover_prefix_must_fit_the_constraint() -> None:
    constraints.check(Constraint(K.REGEX, "ab+c", prefix="abb"))
    with pytest.raises(InvalidArgument):
        constraints.check(Constraint(K.REGEX, "ab+c", prefix="x"))
