"""The one rule every stage uses for a record longer than its token limit (SFT demonstrations,
reward-model comparisons, PPO prompts).

A record is a *group* of sequences that share one prompt: one sequence for a demonstration or a
rollout prompt, K for a comparison (the prompt followed by each of its K responses).  Each
sequence is ``head`` leading special tokens (BOS), then its prompt tokens, then its response
tokens and trailing specials (EOS).  ``truncation`` decides what happens when one of them is
longer than ``max_len``:

- ``"error"``: a ``ValueError`` naming the record (and its file line when known);
- ``"left"``: drop the *oldest* prompt tokens (right after the head) so that every response stays
  whole; all K sequences lose the same number of prompt tokens, so they still share one prompt.
  A response that does not fit even after its whole prompt is dropped makes the record skipped:
  ``left`` never alters a response (the HH-RLHF convention for dialogues: keep the last turns);
- ``"right"``: cut each sequence's end (for a demonstration: no EOS is added, since the response
  did not end there; for a comparison the score is then read inside the response);
- ``"skip"``: drop the record.

PPO pretraining text (ptx) is one stream cut into blocks, so no record is ever too long for it;
only ``skip_bad`` applies there.  ``TruncationStats`` counts what the rule did, for the log and
``metrics.jsonl`` (``data_metrics``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TypeVar

logger = logging.getLogger(__name__)

TRUNCATIONS = ("error", "left", "right", "skip")

T = TypeVar("T")


@dataclasses.dataclass
class TruncationStats:
    """What the rule did to one file's records: ``records`` seen, ``cut`` (shortened and kept),
    ``skipped`` (dropped: too long with ``skip``, a response alone too long with ``left``, or no
    response token left after a ``right`` cut), and ``bad_lines`` skipped by the reader
    (``skip_bad``)."""

    records: int = 0
    cut: int = 0
    skipped: int = 0
    bad_lines: int = 0

    def log(self, name: str, what: str, max_len: int, truncation: str) -> None:
        """One warning when a record was cut or skipped (the reader logs its bad lines)."""
        if self.cut or self.skipped:
            logger.warning("%s: %d of %d %s longer than %d tokens: %d cut, %d skipped (truncation=%r)", name,
                           self.cut + self.skipped, self.records, what, max_len, self.cut, self.skipped, truncation)


def check_truncation(truncation: str) -> None:
    """``ValueError`` unless ``truncation`` is one of ``TRUNCATIONS``."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")


def fit_group(lengths: Sequence[int], prompt_lengths: Sequence[int], max_len: int, truncation: str,
              what: str) -> tuple[int, int] | None:
    """How a record of sequences sharing one prompt fits ``max_len`` tokens.

    Args:
      lengths: each sequence's length, specials included.
      prompt_lengths: each sequence's prompt tokens (after its head, before its response).
      what: the record, for the error (e.g. ``"comparison 3 (line 4)"``).

    Returns:
      ``(drop, limit)``: remove ``drop`` tokens right after the head of every sequence, then keep
      at most ``limit`` tokens (``cut``); ``(0, max_len)`` when everything fits; ``None``: skip
      the record.

    Raises:
      ValueError: a sequence is too long and ``truncation == "error"``.
    """
    check_truncation(truncation)
    longest = max(lengths)
    if longest <= max_len:
        return 0, max_len
    if truncation == "error":
        k = max(range(len(lengths)), key=lengths.__getitem__)
        part = f" response {k}" if len(lengths) > 1 else ""
        raise ValueError(f"{what}{part} has {longest} tokens, more than max_len {max_len} (set truncation to "
                         "'left' (drop the oldest prompt tokens), 'right' (cut the end) or 'skip')")
    if truncation == "skip":
        return None
    if truncation == "right":
        return 0, max_len
    drop = longest - max_len
    if any(drop > p for p in prompt_lengths):
        return None  # a response is longer than the limit on its own
    return drop, max_len


def cut(seq: Sequence[T], drop: int, limit: int, head: int) -> list[T]:
    """``seq`` without its items ``[head, head + drop)``, then its first ``limit`` items."""
    return [*seq[:head], *seq[head + drop:]][:limit]


def data_metrics(stats: Mapping[str, TruncationStats]) -> dict[str, int]:
    """``{"data/<name>/<field>": count}`` for ``metrics.jsonl`` (one record at stage start), for
    the files ``name`` where a record was cut or skipped or a bad line skipped ({} when none)."""
    return {f"data/{name}/{field.name}": getattr(s, field.name)
            for name, s in stats.items() if s.cut or s.skipped or s.bad_lines
            for field in dataclasses.fields(s)}
