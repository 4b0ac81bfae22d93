"""Chat templates: a model's Jinja2 ``chat_template`` rendered exactly as ``transformers`` does.

``transformers`` (``utils/chat_template_utils.py``, ``_compile_jinja_template`` and
``render_jinja_template``) renders in a ``jinja2.sandbox.ImmutableSandboxedEnvironment`` with
``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension, a ``tojson`` filter
that does not escape HTML (``json.dumps`` with ``ensure_ascii=False``), and the globals
``raise_exception`` and ``strftime_now``; the template sees ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...)
and any extra keyword.  The same environment is built here, so the text is identical (tested
against ``transformers``' ``apply_chat_template`` for templates of each family's shape).
Templates come from model files and are untrusted: the sandbox forbids attribute tricks and
mutation of the inputs.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlhf_jax.errors import ChatTemplateError

ROLES = ("system", "user", "assistant", "tool")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def check_messages(messages: Sequence[Mapping[str, Any]], source: str = "messages") -> None:
    """Each message is a dict with ``role`` in ``ROLES`` and a ``str`` ``content``; otherwise a
    ``ChatTemplateError`` naming ``source``, the message index and the field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"{source}: must be a list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        where = f"{source}[{i}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where}: must be a dict with 'role' and 'content', "
                                    f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"{where}.content: must be a str, got "
                                    f"{type(message.get('content')).__name__}")


def apply_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
    template_name: str = "chat_template",
    **extra: Any,
) -> str:
    """The text ``template`` renders for ``messages`` (``transformers``' ``apply_chat_template``
    with ``tokenize=False``).

    Args:
      template: the Jinja2 source (a tokenizer's ``chat_template``).
      messages: ``[{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]``.
      add_generation_prompt: append the header that opens the assistant's turn.
      bos_token, eos_token: the special tokens' text, as the template variables of those names.
      template_name: how error messages name the template (e.g. the file it came from).
      extra: more template variables (``tools``, ``documents``, ``pad_token``, ...).

    Raises:
      ChatTemplateError: a bad message (index and field named), a template that does not compile,
        or one that raises (``raise_exception`` or a runtime error), naming ``template_name``.
    """
    check_messages(messages)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{template_name}: line {e.lineno}: {e.message}") from None
    variables = {"tools": None, "documents": None, **extra}
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"{template_name} raised: {e.message}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"{template_name} failed: {type(e).__name__}: {e}") from None
