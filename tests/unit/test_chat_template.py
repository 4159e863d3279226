"""Chat templates shipped with models render in a sandbox; their refusals are the caller's error."""

from __future__ import annotations

import pytest

from laas.daemon.chat_template import ChatTemplate
from laas.daemon.engine import ChatMessage
from laas.daemon.errors import InvalidArgument, ModelLoadError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_renders_with_the_generation_prompt_and_the_eos_stop() -> None:
    request = ChatTemplate(CHATML, bos_token="<s>", eos_token="<|im_end|>").render([ChatMessage("user", "Hi")])
    assert request.prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert request.template_stops == ("<|im_end|>",) and request.add_special is False


def test_raise_exception_becomes_invalid_argument_on_messages() -> None:
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}",
                            bos_token="", eos_token="")
    with pytest.raises(InvalidArgument, match="user first") as error:
        template.render([ChatMessage("assistant", "x")])
    assert error.value.field == "messages"


def test_the_sandbox_refuses_reaching_python_internals() -> None:
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}", bos_token="", eos_token="")
    with pytest.raises(InvalidArgument):
        template.render([ChatMessage("user", "x")])


def test_a_template_that_does_not_parse_fails_the_model() -> None:
    with pytest.raises(ModelLoadError, match="does not parse"):
        ChatTemplate("{% for %}", bos_token="", eos_token="")
