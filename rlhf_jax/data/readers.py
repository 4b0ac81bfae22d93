"""JSONL readers for the four kinds of InstructGPT data (IG §3.2): demonstrations, ranked
comparisons, prompts and pretraining text.

One JSON object a line, read as `utf-8-sig` (a leading byte-order mark is ignored); blank lines
are ignored; `.gz` files are read transparently. A bad line (not JSON, a missing or mistyped
field, a string holding a lone UTF-16 surrogate such as the JSON escape `"\\ud800"`, which no
tokenizer can encode) raises `DataError` naming the file, the line and the field, or is skipped
and counted with `skip_bad=True`. Per-host sharding keeps the i-th record (i counting non-blank lines from 0) when
`i % shard_count == shard_index`, so every host parses only its own lines.

Layouts:
  demonstrations  {"prompt": str, "response": str}
  comparisons     {"prompt": str, "responses": [str, ...], "ranking": [int, ...]}  (K = 2..9,
                  ranking = indices of `responses` best-first, a permutation of range(K));
                  {"prompt": str, "chosen": str, "rejected": str}  (K = 2);
                  {"chosen": str, "rejected": str}  (Anthropic HH-RLHF: whole dialogues; the
                  prompt is their common prefix up to the last shared "\\n\\nAssistant:")
  prompts         {"prompt": str}
  pretraining     {"text": str}
Chat records (`{"messages": [...]}` and message-list comparisons) are parsed by `data.messages`
into `ChatDemonstration` / `ChatComparison` / `ChatPrompt` (layouts there).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rlhf_jax.errors import DataError

logger = logging.getLogger(__name__)

K_MIN = 2  # a comparison needs two responses
K_MAX = 9  # InstructGPT ranks K = 4..9 responses per prompt (IG §3.5)
HH_ASSISTANT = "\n\nAssistant:"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Demonstration:
    """A labeler-written response to a prompt (SFT data, IG §3.2)."""

    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class Comparison:
    """K >= 2 responses to one prompt, ordered best-first (RM data, IG §3.5)."""

    prompt: str
    responses: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt for PPO rollouts."""

    prompt: str


@dataclasses.dataclass(frozen=True)
class PretrainText:
    """A pretraining document (the ptx term of IG eq. 2)."""

    text: str


class Records(list):
    """The records read from one file (a list), with `n_skipped` (bad lines skipped) and
    `lines` (each record's 1-based line number in the file)."""

    def __init__(self, items: list, path: Path, n_skipped: int, lines: list[int] | None = None):
        super().__init__(items)
        self.path = path
        self.n_skipped = n_skipped
        self.lines = list(range(1, len(items) + 1)) if lines is None else lines

    def where(self, i: int) -> str:
        """``"<path>, line <n>"`` of record ``i``."""
        return f"{self.path}, line {self.lines[i]}"


class _LineError(Exception):
    """Raised by a record parser; `read_jsonl` adds the file and line."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def read_demonstrations(
    path: str | os.PathLike, *, skip_bad: bool = False, shard_index: int = 0, shard_count: int = 1
) -> Records:
    """Reads `{"prompt", "response"}` lines into `Demonstration`s."""
    return read_jsonl(path, _parse_demonstration, skip_bad, shard_index, shard_count)


def read_comparisons(
    path: str | os.PathLike, *, skip_bad: bool = False, shard_index: int = 0, shard_count: int = 1
) -> Records:
    """Reads ranked (K-way), pairwise or HH-RLHF lines into best-first `Comparison`s."""
    return read_jsonl(path, _parse_comparison, skip_bad, shard_index, shard_count)


def read_prompts(
    path: str | os.PathLike, *, skip_bad: bool = False, shard_index: int = 0, shard_count: int = 1
) -> Records:
    """Reads `{"prompt"}` lines into `Prompt`s (empty prompts are allowed)."""
    return read_jsonl(path, _parse_prompt, skip_bad, shard_index, shard_count)


def read_pretrain_texts(
    path: str | os.PathLike, *, skip_bad: bool = False, shard_index: int = 0, shard_count: int = 1
) -> Records:
    """Reads `{"text"}` lines into `PretrainText`s."""
    return read_jsonl(
        path, lambda o: PretrainText(_str(o, "text", nonempty=True)), skip_bad, shard_index,
        shard_count,
    )


def read_jsonl(
    path: str | os.PathLike,
    parse: Callable[[dict[str, Any]], T],
    skip_bad: bool = False,
    shard_index: int = 0,
    shard_count: int = 1,
) -> Records:
    """Applies `parse` to this shard's JSON objects; see the module docstring for the rules."""
    if not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
    if not isinstance(shard_index, int) or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, {shard_count}), got {shard_index!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records, lines, n_skipped = [], [], 0
    for i, (line_no, line) in enumerate(_lines(path)):
        if i % shard_count != shard_index:
            continue
        try:
            records.append(parse(_object(line)))
            lines.append(line_no)
        except _LineError as e:
            where = f"{path}, line {line_no}" + (f", field {e.field!r}" if e.field else "")
            if not skip_bad:
                raise DataError(f"{where}: {e.message}") from None
            n_skipped += 1
    if n_skipped:
        logger.warning("%s: skipped %d bad line(s)", path, n_skipped)
    return Records(records, path, n_skipped, lines)


def split_hh_dialogues(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen response, rejected response) of two HH-RLHF dialogues.

    The prompt is the longest common prefix that ends right after a "\\n\\nAssistant:" (the
    last one shared by both); the responses are the rest, so prompt + response == dialogue.
    Returns None when the dialogues share no "\\n\\nAssistant:".
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of the non-blank lines."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield line_no, line
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _object(line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(None, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _LineError(None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _str(obj: dict[str, Any], field: str, nonempty: bool = False) -> str:
    if field not in obj:
        raise _LineError(field, "missing")
    value = obj[field]
    if not isinstance(value, str):
        raise _LineError(field, f"expected a string, got {type(value).__name__}")
    _unicode(field, value)
    if nonempty and not value.strip():
        raise _LineError(field, "empty")
    return value


def _unicode(field: str, value: str) -> None:
    """A `_LineError` if `value` holds a lone UTF-16 surrogate (JSON allows the escape; UTF-8 and
    every tokenizer reject it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _LineError(field, f"not valid Unicode: a lone surrogate {value[e.start]!r} at character "
                                f"{e.start} (a JSON escape such as \\ud800 without its pair)") from None


def _chat(obj: dict[str, Any], kind: str) -> Any:
    """The `data.messages` parser for `kind` when `obj` is a chat record, else None."""
    from rlhf_jax.data import messages  # it builds on this module

    chat = "messages" in obj or (kind == "comparison" and any(
        isinstance(obj.get(f), list) for f in ("prompt", "chosen", "rejected")))
    return getattr(messages, f"parse_{kind}") if chat else None


def _parse_prompt(obj: dict[str, Any]) -> Any:
    parse = _chat(obj, "prompt")
    return parse(obj) if parse else Prompt(_str(obj, "prompt"))


def _parse_demonstration(obj: dict[str, Any]) -> Any:
    if parse := _chat(obj, "demonstration"):
        return parse(obj)
    return Demonstration(_str(obj, "prompt"), _str(obj, "response", nonempty=True))


def _parse_comparison(obj: dict[str, Any]) -> Any:
    if parse := _chat(obj, "comparison"):
        return parse(obj)
    if "responses" in obj:
        return _parse_ranked(obj)
    if "chosen" not in obj and "rejected" not in obj:
        raise _LineError("responses", "missing (nor are there 'chosen'/'rejected' fields)")
    chosen, rejected = _str(obj, "chosen"), _str(obj, "rejected")
    if "prompt" in obj:
        prompt = _str(obj, "prompt")
    else:
        split = split_hh_dialogues(chosen, rejected)
        if split is None:
            raise _LineError("chosen", f"no {HH_ASSISTANT!r} turn shared with 'rejected'")
        prompt, chosen, rejected = split
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise _LineError(field, "empty response")
    return Comparison(prompt, (chosen, rejected))


def _parse_ranked(obj: dict[str, Any]) -> Comparison:
    prompt = _str(obj, "prompt")
    responses = obj["responses"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise _LineError("responses", "expected a list of strings")
    k = len(responses)
    if not K_MIN <= k <= K_MAX:
        raise _LineError("responses", f"expected {K_MIN}..{K_MAX} responses, got {k}")
    for j, r in enumerate(responses):
        _unicode("responses", r)
        if not r.strip():
            raise _LineError("responses", f"response {j} is empty")
    if "ranking" not in obj:
        raise _LineError("ranking", "missing")
    ranking = obj["ranking"]
    if not isinstance(ranking, list) or not all(
        isinstance(j, int) and not isinstance(j, bool) for j in ranking
    ):
        raise _LineError("ranking", "expected a list of integers")
    if sorted(ranking) != list(range(k)):
        raise _LineError("ranking", f"must be a permutation of range({k}), got {ranking}")
    return Comparison(prompt, tuple(responses[j] for j in ranking))
