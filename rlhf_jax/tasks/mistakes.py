"""Plausible mistakes a careless labeler (or an imperfect policy) makes on world prompts.

One *error* is one of (chosen uniformly among those that apply to the answer):

    swap        exchange two words                              (answers of >= 2 words)
    drop        leave out one word                              (answers of >= 2 words)
    substitute  replace one word by another word of the same form (plural stays plural)
    repeat      write one word twice
    off_by_one  count one too many or one too few               (count only)
    neighbour   give another word of the list                   (first / last only)
    wrong_rule  apply the rule of a neighbouring family (reverse <-> copy, sort -> copy,
                plural -> copy, first <-> last); only as the first error

Errors are redrawn until the answer changes, so a corrupted answer always differs from the
correct one (the demonstrations' error rate is exactly what the config says).
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.tasks.world import (
    NUMBER_WORDS,
    WorldConfig,
    answer_words,
    format_response,
    parse_prompt,
)

_WRONG_RULE = {"reverse": "copy", "copy": "reverse", "sort": "copy", "plural": "copy",
               "first": "last", "last": "first"}  # fmt: skip


def _one_error(
    rng: np.random.Generator, family: str, words: tuple[str, ...], ans: list[str],
    pool: tuple[str, ...], first: bool,
) -> list[str]:
    kinds = ["substitute", "repeat"]
    if len(ans) >= 2:
        kinds += ["swap", "drop"]
    if family == "count":
        kinds = ["off_by_one", "off_by_one", "repeat"]
    elif family in ("first", "last"):
        kinds += ["neighbour", "neighbour"]
    if first and family in _WRONG_RULE:
        kinds.append("wrong_rule")
    kind = kinds[rng.integers(len(kinds))]
    out = list(ans)
    i = int(rng.integers(len(out)))
    if kind == "swap":
        j = int(rng.integers(len(out) - 1))
        j += j >= i
        out[i], out[j] = out[j], out[i]
    elif kind == "drop":
        del out[i]
    elif kind == "repeat":
        out.insert(i, out[i])
    elif kind == "substitute":
        plural = family == "plural"
        choices = [w + "s" if plural else w for w in pool]
        choices = [w for w in choices if w != out[i]]
        out[i] = choices[rng.integers(len(choices))]
    elif kind == "off_by_one":
        n = NUMBER_WORDS.index(out[0]) + (1 if rng.random() < 0.5 else -1)
        out[0] = NUMBER_WORDS[min(max(n, 0), len(NUMBER_WORDS) - 1)]
    elif kind == "neighbour":
        out[0] = words[rng.integers(len(words))]
    else:  # wrong_rule
        out = answer_words(_WRONG_RULE[family], words)
    return out


def corrupt_answer(
    rng: np.random.Generator, prompt: str, n_errors: int = 1, config: WorldConfig | None = None
) -> str:
    """The correct answer to ``prompt`` with ``n_errors`` plausible mistakes applied in turn.

    Each error is redrawn (up to 100 times) until it changes the current answer; substitutions
    draw from ``config.words``. Returns a response string (leading spaces, no EOS).
    """
    if n_errors < 0:
        raise ValueError(f"n_errors must be >= 0, got {n_errors}")
    config = config or WorldConfig()
    pool = config.words
    family, words = parse_prompt(prompt)
    ans = answer_words(family, words)
    for e in range(n_errors):
        for _ in range(100):
            new = _one_error(rng, family, words, ans, pool, first=e == 0)
            if new != ans:
                break
        ans = new
    return format_response(ans)
