"""HH-RLHF dialogues as chat-formatted prompts and responses, split by conversation.

An HH-RLHF record (Bai et al. 2022) is two dialogues, ``chosen`` and ``rejected``, written as
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, that share every turn but the last assistant one.
``hh_examples`` turns each record into the shared turns as ``messages`` (``[{"role": "user" |
"assistant", "content"}]``, ending with a user turn) and the two final assistant answers.

Formatting uses the model's own chat template through a ``render(messages,
add_generation_prompt) -> str`` function (e.g. ``Tokenizer.apply_chat_template``):

- prompt = ``render(messages, True)`` without a leading BOS token text (the stages add BOS
  themselves, so ``[BOS] prompt`` is the template's text token for token);
- response = the assistant's text; the stages append EOS, which for a ChatML model is the
  template's end-of-turn token ``<|im_end|>``, so ``prompt + response + EOS`` is what
  ``render(messages + [answer], False)`` writes, up to the template's text after the end-of-turn
  token (``chat_formatting_matches`` checks it).

Splits are deterministic and disjoint by conversation: the split of a record is a function of a
hash of its prompt messages (and the seed), so the same prompt always lands in the same split.
Long prompts are cut from the left (``truncate_messages``): whole oldest exchanges first, then
the oldest tokens of the last human turn, which always stays; every cut is counted.
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_jax.data.readers import DataError, read_jsonl, split_hh_dialogues

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
SPLITS = ("A", "B", "C")

Message = dict[str, str]
Render = Callable[[list[Message], bool], str]


@dataclass(frozen=True)
class HHExample:
    """One HH-RLHF record: the shared dialogue (``messages``, last turn a user turn) and the
    chosen and rejected final assistant answers (stripped)."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs: hashable
    chosen: str
    rejected: str

    def message_dicts(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


def parse_dialogue(text: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b ..."`` -> ``[{"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"}, ...]`` (contents stripped).

    Raises ValueError when the text does not start with a human turn or the roles do not
    alternate (an empty turn is kept as empty content)."""
    if not text.startswith(HUMAN):
        raise ValueError(f"does not start with {HUMAN!r}")
    messages: list[Message] = []
    rest, role = text, "user"
    while rest:
        marker = HUMAN if role == "user" else ASSISTANT
        if not rest.startswith(marker):
            raise ValueError(f"turn {len(messages) + 1}: expected {marker!r}")
        rest = rest[len(marker):]
        other = ASSISTANT if role == "user" else HUMAN
        end = rest.find(other)
        end = len(rest) if end < 0 else end
        messages.append({"role": role, "content": rest[:end].strip()})
        rest = rest[end:]
        role = "assistant" if role == "user" else "user"
    return messages


def hh_examples(path: str | Path, skipped: collections.Counter) -> list[HHExample]:
    """The records of an HH-RLHF JSONL(.gz) file as ``HHExample``, in file order.

    A record that cannot be split into shared turns + two answers (no shared assistant turn,
    unparsable turns, an empty prompt turn, an empty or identical pair of answers) is skipped and
    counted in ``skipped`` under its reason; a line that is not a JSON object raises ``DataError``
    naming the file and line."""
    out = []
    for obj in read_jsonl(path, dict):
        chosen, rejected = obj.get("chosen"), obj.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            skipped["missing chosen/rejected"] += 1
            continue
        split = split_hh_dialogues(chosen, rejected)
        if split is None:
            skipped["no shared assistant turn"] += 1
            continue
        prompt, good, bad = split
        try:
            messages = parse_dialogue(prompt[: -len(ASSISTANT)])
        except ValueError:
            skipped["malformed turns"] += 1
            continue
        good, bad = good.strip(), bad.strip()
        if HUMAN in good or HUMAN in bad:  # a dialogue that goes on after the differing answer
            good, bad = good.split(HUMAN)[0].strip(), bad.split(HUMAN)[0].strip()
        if messages[-1]["role"] != "user" or not all(m["content"] for m in messages):
            skipped["empty turn"] += 1
        elif not good or not bad:
            skipped["empty response"] += 1
        elif good == bad:
            skipped["identical responses"] += 1
        else:
            out.append(HHExample(tuple((m["role"], m["content"]) for m in messages), good, bad))
    if not out:
        raise DataError(f"{path}: no usable HH-RLHF records (skipped: {dict(skipped)})")
    return out


def split_of(example: HHExample, fractions: Sequence[float], seed: int) -> str:
    """``"A"``, ``"B"`` or ``"C"``: the conversation's split, from the SHA-256 of the seed and its
    prompt messages mapped to [0, 1) against the cumulative ``fractions`` (A, B, C)."""
    digest = hashlib.sha256(json.dumps([seed, example.messages]).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def strip_bos(text: str, bos_text: str | None) -> str:
    """``text`` without a leading ``bos_text`` (the stages add the BOS id themselves)."""
    return text[len(bos_text):] if bos_text and text.startswith(bos_text) else text


def truncate_messages(
    messages: list[Message], n_tokens: Callable[[list[Message]], int], max_len: int,
    encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], counts: collections.Counter,
) -> list[Message]:
    """``messages`` (ending with a user turn) cut from the left until ``n_tokens(messages) <=
    max_len``: first whole oldest exchanges (user + assistant, counted in
    ``counts["turns_dropped"]``), then, with only the last user turn left, its oldest tokens
    (``counts["tokens_cut"]``).  ``counts["prompts_cut"]`` counts prompts that lost anything.

    Raises ValueError when even an empty last turn does not fit (``max_len`` below the
    template's own tokens)."""
    messages = list(messages)
    if n_tokens(messages) <= max_len:
        return messages
    counts["prompts_cut"] += 1
    while len(messages) > 1 and n_tokens(messages) > max_len:
        messages = messages[2:]
        counts["turns_dropped"] += 2
    last = messages[-1]
    ids = encode(last["content"])
    while n_tokens(messages) > max_len:
        if not ids:
            raise ValueError(f"max_prompt_len {max_len} is below the chat template's own tokens")
        over = n_tokens(messages) - max_len
        counts["tokens_cut"] += min(over, len(ids))
        ids = ids[over:]
        messages = [*messages[:-1], {"role": last["role"], "content": decode(ids)}]
    return messages


def cut_response(text: str, max_tokens: int, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], counts: collections.Counter) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (``counts["responses_cut"]``)."""
    ids = encode(text)
    if len(ids) <= max_tokens:
        return text
    counts["responses_cut"] += 1
    return decode(ids[:max_tokens]).rstrip()


@dataclass(frozen=True)
class Formatted:
    """A record ready for the stages: chat-formatted prompt (no leading BOS text), the answers
    cut to the response length (``chosen``, ``rejected``: RM pairs), the whole chosen answer
    (``demo``: the SFT stage cuts it and then omits the EOS, so a cut answer is not taught to
    end there) and the last human turn as plain text (for the report)."""

    split: str
    prompt: str
    chosen: str
    rejected: str
    demo: str
    last_human: str


def format_examples(
    examples: Sequence[HHExample], render: Render, encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str], *, bos_text: str | None, max_prompt_len: int, max_response_len: int,
    fractions: Sequence[float], seed: int, counts: collections.Counter,
) -> Iterator[Formatted]:
    """Each example split, its prompt rendered and left-truncated to ``max_prompt_len`` tokens
    (BOS included), its answers cut to ``max_response_len`` tokens (EOS excluded); an answer
    that decodes empty after the cut is skipped and counted (``counts["empty_after_cut"]``)."""

    def prompt_text(messages: list[Message]) -> str:
        return strip_bos(render(messages, True), bos_text)

    def n_tokens(messages: list[Message]) -> int:
        return 1 + len(encode(prompt_text(messages)))

    for ex in examples:
        messages = truncate_messages(ex.message_dicts(), n_tokens, max_prompt_len, encode, decode, counts)
        chosen, rejected = (cut_response(t, max_response_len, encode, decode, counts) for t in (ex.chosen, ex.rejected))
        if not chosen or not rejected or chosen == rejected:
            counts["empty_after_cut"] += 1
            continue
        yield Formatted(split_of(ex, fractions, seed), prompt_text(messages), chosen, rejected, ex.chosen,
                        messages[-1]["content"])


def chat_formatting_matches(render: Render, messages: list[Message], answer: str, bos_text: str | None,
                            eos_text: str) -> bool:
    """Whether ``[BOS] prompt + answer + EOS`` (as the stages write it) is a prefix of the
    template's rendering of the whole dialogue ``messages + [answer]``."""
    prompt = strip_bos(render(messages, True), bos_text)
    full = render([*messages, {"role": "assistant", "content": answer}], False)
    return full.startswith((bos_text or "") + prompt + answer + eos_text)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` as JSON lines, written to a temporary file and renamed (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def ptx_texts(path: str | Path, heldout_chars: int) -> tuple[list[str], list[str]]:
    """A plain-text corpus (e.g. tinyshakespeare) as paragraphs (blank-line separated):
    ``(train, heldout)``, the held-out part being the last paragraphs totalling at least
    ``heldout_chars`` characters.  Raises FileNotFoundError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pretraining text file (ptx_text)")
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    total, cut = 0, len(paragraphs)
    while cut > 1 and total < heldout_chars:
        cut -= 1
        total += len(paragraphs[cut])
    if cut < 1:
        raise DataError(f"{path}: too little text for a held-out part of {heldout_chars} characters")
    return paragraphs[:cut], paragraphs[cut:]
