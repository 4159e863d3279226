"""Request checks: ranges of sampling values, chat roles and limits, prompt size; each names its field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from laas.core.errors import InvalidArgument
from laas.core.types import ChatMessage, SamplingParams
from laas.daemon.validation import (
    MAX_MESSAGES,
    MAX_MODEL_NAME,
    MAX_PROMPT_BYTES,
    MAX_STOP_BYTES,
    MAX_STOP_STRINGS,
    chat_messages,
    model_name,
    prompt,
    sampling_from,
)


def field_of(fn: Any, *args: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn(*args)
    assert info.value.field
    assert info.value.field in str(info.value)
    return info.value


# --- sampling_from -----------------------------------------------------------------------------------


def test_nothing_set_gives_engine_defaults() -> None:
    assert sampling_from({}, (), False) == SamplingParams()


def test_all_fields_set() -> None:
    fields = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.1,
              "presence_penalty": -2.0, "frequency_penalty": 2.0, "top_k": 0, "seed": -1}
    p = sampling_from(fields, ["\n", "User:"], True)
    assert p == SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0, min_p=0.0, repeat_penalty=1.1,
                               presence_penalty=-2.0, frequency_penalty=2.0, top_k=0, seed=-1,
                               stop=("\n", "User:"), ignore_eos=True)
    assert isinstance(p.stop, tuple)
    assert isinstance(p.temperature, float) and isinstance(p.max_tokens, int)


def test_only_set_fields_change() -> None:
    p = sampling_from({"temperature": 0.2}, (), False)
    assert p.temperature == 0.2
    assert p.top_p == SamplingParams().top_p
    assert p.max_tokens is None
    assert p.seed is None


@pytest.mark.parametrize(("name", "value"), [
    ("max_tokens", 0), ("max_tokens", -5),
    ("temperature", -0.01),
    ("top_p", 0.0), ("top_p", 1.0001), ("top_p", -1.0),
    ("min_p", -0.1), ("min_p", 1.5),
    ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
    ("presence_penalty", -2.01), ("presence_penalty", 2.01),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.5),
    ("top_k", -1),
])
def test_out_of_range_names_the_field(name: str, value: float) -> None:
    err = field_of(sampling_from, {name: value}, (), False)
    assert err.field == f"sampling.{name}"
    assert repr(value) in str(err) or str(value) in str(err)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repeat_penalty",
                                  "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_refused(name: str, value: float) -> None:
    err = field_of(sampling_from, {name: value}, (), False)
    assert err.field == f"sampling.{name}"
    assert "finite" in str(err)


@pytest.mark.parametrize(("name", "value"), [
    ("max_tokens", 1), ("temperature", 0.0), ("temperature", 5.0), ("top_p", 1e-9), ("top_p", 1.0),
    ("min_p", 0.0), ("min_p", 1.0), ("repeat_penalty", 1e-9), ("presence_penalty", -2.0),
    ("presence_penalty", 2.0), ("frequency_penalty", 0.0), ("top_k", 0), ("seed", 0), ("seed", 2**63 - 1),
])
def test_boundary_values_accepted(name: str, value: float) -> None:
    p = sampling_from({name: value}, (), False)
    assert getattr(p, name) == value


def test_first_bad_field_in_check_order_is_reported() -> None:
    err = field_of(sampling_from, {"max_tokens": 0, "top_p": 5.0}, (), False)
    assert err.field == "sampling.max_tokens"


def test_stop_strings_limits() -> None:
    ok = ["x"] * MAX_STOP_STRINGS
    assert sampling_from({}, ok, False).stop == tuple(ok)
    err = field_of(sampling_from, {}, ["x"] * (MAX_STOP_STRINGS + 1), False)
    assert err.field == "sampling.stop"


def test_empty_stop_string_names_its_index() -> None:
    assert field_of(sampling_from, {}, ["a", "", "b"], False).field == "sampling.stop[1]"


def test_stop_string_byte_limit_counts_bytes_not_characters() -> None:
    assert sampling_from({}, ["a" * MAX_STOP_BYTES], False).stop == ("a" * MAX_STOP_BYTES,)
    assert field_of(sampling_from, {}, ["ok", "a" * (MAX_STOP_BYTES + 1)], False).field == "sampling.stop[1]"
    # 86 three-byte characters = 258 bytes, though only 86 characters
    assert field_of(sampling_from, {}, ["€" * 86], False).field == "sampling.stop[0]"


# --- prompt / model name ---------------------------------------------------------------------------


def test_prompt_limit_in_bytes() -> None:
    assert prompt("") == ""
    text = "a" * MAX_PROMPT_BYTES
    assert prompt(text) is text
    err = field_of(prompt, "a" * (MAX_PROMPT_BYTES + 1))
    assert err.field == "prompt"
    assert f"{MAX_PROMPT_BYTES + 1} bytes" in str(err)
    # characters that take several bytes count by their bytes
    assert field_of(prompt, "é" * (MAX_PROMPT_BYTES // 2 + 1)).field == "prompt"


def test_prompt_custom_field_name() -> None:
    assert field_of(prompt, "x" * (MAX_PROMPT_BYTES + 1), "system_prompt").field == "system_prompt"


def test_model_name_limit() -> None:
    assert model_name("m" * MAX_MODEL_NAME) == "m" * MAX_MODEL_NAME
    err = field_of(model_name, "m" * (MAX_MODEL_NAME + 1))
    assert err.field == "model"
    assert "m" * 41 not in str(err)  # the echoed value is cut short


# --- chat_messages -----------------------------------------------------------------------------------


def test_chat_messages_built() -> None:
    out = chat_messages([("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "")])
    assert out == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"),
                   ChatMessage("assistant", "hello"), ChatMessage("user", ""))
    assert isinstance(out, tuple)


def test_chat_messages_empty_refused() -> None:
    assert field_of(chat_messages, []).field == "messages"


def test_chat_messages_count_limit() -> None:
    assert len(chat_messages([("user", "x")] * MAX_MESSAGES)) == MAX_MESSAGES
    assert field_of(chat_messages, [("user", "x")] * (MAX_MESSAGES + 1)).field == "messages"


@pytest.mark.parametrize("role", ["developer", "User", "", "function", "system "])
def test_chat_messages_bad_role_names_its_index(role: str) -> None:
    err = field_of(chat_messages, [("system", "s"), ("user", "u"), (role, "x")])
    assert err.field == "messages[2].role"
    assert repr(role) in str(err)


def test_chat_messages_total_size_limit() -> None:
    half = "a" * (MAX_PROMPT_BYTES // 2)
    assert len(chat_messages([("user", half), ("assistant", half)])) == 2
    err = field_of(chat_messages, [("user", half), ("assistant", half), ("user", "!")])
    assert err.field == "messages"
    assert str(MAX_PROMPT_BYTES + 1) in str(err)


def test_chat_messages_total_counts_bytes_not_characters() -> None:
    chars = MAX_PROMPT_BYTES // 2 + 1  # fewer characters than the limit, but more bytes
    err = field_of(chat_messages, [("user", "é" * chars)])
    assert err.field == "messages"
    assert str(2 * chars) in str(err)
