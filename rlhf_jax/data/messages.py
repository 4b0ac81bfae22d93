"""Chat data: JSONL records with ``{"messages": [...]}``, rendered by the model's chat template.

Layouts (messages are ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``):

  demonstrations  {"messages": [...]}: SFT puts the loss on every assistant turn (and its
                  end-of-turn token) and nowhere else, as TRL's ``assistant_only_loss``;
  comparisons     {"messages": prefix, "responses": [r, ...], "ranking": [...]}  (K = 2..9) or
                  {"messages": prefix, "chosen": r, "rejected": r}, where a response ``r`` is the
                  assistant's text or a list of messages continuing ``prefix``;
                  {"prompt": prefix, "chosen": [...], "rejected": [...]} (TRL's explicit prompt);
                  {"chosen": [...], "rejected": [...]} (whole dialogues: the prefix is the
                  messages they share);
  prompts         {"messages": [...]}: rendered with ``add_generation_prompt=True``.

A bad record is a ``DataError`` naming the file, line and field (``readers.read_jsonl``); a
template that raises on a record is a ``ValueError`` naming the record and the template's message.

Assistant spans are found as TRL's ``get_training_chat_template`` intends, but by rendering
prefixes (any template works, no ``{% generation %}`` block needed): assistant turn ``i`` spans the
text between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``,
cut after the template's end-of-turn token (``Tokenizer.template_turn_end``: ``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``) so the newline a template writes after it is no target.  Each
prefix must render as a prefix of the whole dialogue (else the record's error says so).  A token
is a target when its character span overlaps an assistant span.  A dialogue's tokens stop at its
last answer's end of turn (what a template writes after it is dropped), so an SFT dialogue, a
demonstration scored by a reward model and a comparison's responses all end at that token, where
a reward model reads its score.  The template writes BOS and the turn ends itself, so chat records
get no extra BOS/EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax.chat import ChatTemplateError, check_messages
from rlhf_jax.data.readers import K_MAX, K_MIN, Comparison, Demonstration, Prompt, Records, _LineError, _unicode
from rlhf_jax.tokenizer import Tokenizer

Messages = tuple[Mapping[str, str], ...]


@dataclasses.dataclass(frozen=True)
class ChatDemonstration:
    """A dialogue for SFT; the loss goes on its assistant turns."""

    messages: Messages


@dataclasses.dataclass(frozen=True)
class ChatComparison:
    """K >= 2 continuations of one shared message prefix, best-first (RM data)."""

    prompt: Messages
    responses: tuple[Messages, ...]


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A dialogue for PPO rollouts; the model answers its last turn."""

    messages: Messages


# ---------------------------------------------------------------------------------- parsing


def messages_field(obj: Mapping[str, Any], field: str, *, nonempty: bool = True) -> Messages:
    """``obj[field]`` checked as a message list (``chat.check_messages``); a ``_LineError``
    naming the field (and the message index) otherwise."""
    if field not in obj:
        raise _LineError(field, "missing")
    try:
        check_messages(obj[field], source=field)
    except ChatTemplateError as e:
        raise _LineError(field, str(e).removeprefix(f"{field}: ")) from None
    if nonempty and not obj[field]:
        raise _LineError(field, "empty message list")
    for i, m in enumerate(obj[field]):
        _unicode(f"{field}[{i}].content", m["content"])
    return tuple({"role": m["role"], "content": m["content"]} for m in obj[field])


def parse_demonstration(obj: Mapping[str, Any]) -> ChatDemonstration:
    messages = messages_field(obj, "messages")
    if not any(m["role"] == "assistant" for m in messages):
        raise _LineError("messages", "no assistant turn to train on")
    return ChatDemonstration(messages)


def parse_prompt(obj: Mapping[str, Any]) -> ChatPrompt:
    return ChatPrompt(messages_field(obj, "messages"))


def parse_comparison(obj: Mapping[str, Any]) -> ChatComparison:
    if "messages" in obj or isinstance(obj.get("prompt"), list):
        prefix_field = "messages" if "messages" in obj else "prompt"
        prefix = messages_field(obj, prefix_field)
        if "responses" in obj:
            responses = obj["responses"]
            if not isinstance(responses, list) or not K_MIN <= len(responses) <= K_MAX:
                raise _LineError("responses", f"expected a list of {K_MIN}..{K_MAX} responses")
            ranked = [_response(r, f"responses[{j}]") for j, r in enumerate(responses)]
            ranking = obj.get("ranking")
            if not isinstance(ranking, list) or not all(type(j) is int for j in ranking) or sorted(
                    ranking) != list(range(len(ranked))):
                raise _LineError("ranking", f"must be a permutation of range({len(ranked)}), got {ranking!r}")
            return ChatComparison(prefix, tuple(ranked[j] for j in ranking))
        return ChatComparison(prefix, tuple(_response(obj.get(f, ...), f) for f in ("chosen", "rejected")))
    chosen, rejected = messages_field(obj, "chosen"), messages_field(obj, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant" and shared in (len(chosen), len(rejected)):
        shared -= 1  # the prefix ends before an answer of each
    if shared == 0:
        raise _LineError("chosen", "shares no message prefix with 'rejected'")
    return ChatComparison(chosen[:shared], (_nonempty(chosen[shared:], "chosen"),
                                            _nonempty(rejected[shared:], "rejected")))


def _response(value: Any, field: str) -> Messages:
    if value is ...:
        raise _LineError(field, "missing")
    if isinstance(value, str):
        _unicode(field, value)
        if not value.strip():
            raise _LineError(field, "empty response")
        return ({"role": "assistant", "content": value},)
    return _nonempty(messages_field({field: value}, field), field)


def _nonempty(messages: Messages, field: str) -> Messages:
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise _LineError(field, "no non-empty assistant turn")
    return messages


def is_chat(records: Sequence[Any]) -> bool:
    """True when ``records`` are chat records; ValueError when chat and plain records mix."""
    chat = [isinstance(r, (ChatDemonstration, ChatComparison, ChatPrompt)) for r in records]
    if any(chat) and not all(chat):
        i = chat.index(not chat[0])
        raise ValueError(f"record {i} is {'a' if chat[i] else 'not a'} 'messages' record, unlike record 0: "
                         "a file holds one layout")
    return bool(chat) and chat[0]


# -------------------------------------------------------------------------------- rendering


def _render(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], what: str, *,
            add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as e:  # ChatTemplateError, or no template at all
        raise ValueError(f"{what}: {e}") from None


def assistant_spans(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]],
                    what: str = "record") -> tuple[str, list[tuple[int, int]]]:
    """``(text, spans)``: the dialogue rendered by ``tokenizer``'s chat template, and the
    ``[start, end)`` character span of each assistant turn (module docstring).

    Raises:
      ValueError: the template raises, or a prefix does not render as a prefix of the whole
        dialogue (naming ``what``).
    """
    text = _render(tokenizer, messages, what)
    turn_end = tokenizer.template_turn_end()
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], what, add_generation_prompt=True)) if i else 0
        upto = _render(tokenizer, messages[: i + 1], what)
        if not (text.startswith(upto) and upto.startswith(text[:start])):
            raise ValueError(f"{what}: the chat template does not render message {i}'s prefix as a prefix "
                             "of the whole dialogue, so its assistant turns cannot be located")
        end = len(upto)
        if turn_end is not None:  # the first end-of-turn token after the answer's text
            content = message["content"].strip()
            after = text.find(content, start, end)
            found = text.find(turn_end, start if after < 0 else after + len(content), end)
            end = end if found < 0 else found + len(turn_end)
        spans.append((start, end))
    return text, spans


def _names(records: Sequence[Any]) -> list[str]:
    """How errors name each record: ``"<path>, line <n>"`` for records read from a file."""
    if isinstance(records, Records):
        return [records.where(i) for i in range(len(records))]
    return [f"record {i}" for i in range(len(records))]


def _like(records: Sequence[Any], items: list) -> list:
    """``items`` with ``records``' file and line numbers when it is a ``Records``."""
    if isinstance(records, Records):
        return Records(items, records.path, records.n_skipped, records.lines)
    return items


def chat_demonstration_ids(tokenizer: Tokenizer,
                           records: Sequence[ChatDemonstration]) -> list[tuple[list[int], list[bool]]]:
    """For each dialogue: its template ids up to its last assistant turn's end, and which are SFT
    targets (tokens overlapping an assistant span)."""
    rendered = [assistant_spans(tokenizer, r.messages, name) for r, name in zip(records, _names(records))]
    # Up to the last answer's end of turn, as a comparison's responses: a reward model scoring a
    # demonstration reads it at the same token.
    encodings = tokenizer.hf.encode_batch([text[:spans[-1][1]] for text, spans in rendered], add_special_tokens=False)
    return [(enc.ids, [any(s < e_tok and b_tok < e for s, e in spans) for b_tok, e_tok in enc.offsets])
            for (_, spans), enc in zip(rendered, encodings, strict=True)]


def chat_comparisons_as_text(tokenizer: Tokenizer, records: Sequence[ChatComparison]) -> list[Comparison]:
    """Each comparison as text: the prefix with the generation prompt, and each continuation's
    text after it up to its last assistant turn's end-of-turn token (the reward is read there).
    Tokenise with no BOS/EOS added."""
    out = []
    for rec, name in zip(records, _names(records)):
        prompt = _render(tokenizer, rec.prompt, name, add_generation_prompt=True)
        responses = []
        for k, response in enumerate(rec.responses):
            text, spans = assistant_spans(tokenizer, (*rec.prompt, *response), f"{name} response {k}")
            if not text.startswith(prompt):
                raise ValueError(f"{name} response {k}: the chat template does not render the shared prefix "
                                 "with the generation prompt as a prefix of the dialogue")
            responses.append(text[len(prompt):spans[-1][1]])
        out.append(Comparison(prompt, tuple(responses)))
    return _like(records, out)


def chat_prompts_as_text(tokenizer: Tokenizer, records: Sequence[ChatPrompt]) -> list[Prompt]:
    """Each prompt dialogue rendered with ``add_generation_prompt=True`` (tokenise with no BOS
    added: the template writes it)."""
    return _like(records, [Prompt(_render(tokenizer, r.messages, name, add_generation_prompt=True))
                           for r, name in zip(records, _names(records))])


def demonstration_prompt(tokenizer: Tokenizer, record: Demonstration | ChatDemonstration) -> tuple[Prompt | ChatPrompt, str]:
    """What a model is asked to answer for a demonstration (SFT's held-out samples), and its text:
    the prompt of a ``Demonstration``; for a ``ChatDemonstration`` the messages before its last
    assistant turn, rendered with the generation prompt."""
    if isinstance(record, Demonstration):
        return Prompt(record.prompt), record.prompt
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    prompt = ChatPrompt(record.messages[:last])
    return prompt, chat_prompts_as_text(tokenizer, [prompt])[0].prompt
