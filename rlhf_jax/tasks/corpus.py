"""Pretraining text "of the world": sentences about its words, never answers to its prompts.

Used to pretrain the tiny base model (so that it knows the words, plurals, numbers and the
alphabetical order before SFT) and as the pretraining distribution of the PPO-ptx term
(IG eq. 2, γ·E_pretrain[log π(x)]). Templates, with ``C``/``A``/``F`` a colour/animal/fruit of the
active words, ``N`` a number word and ``L`` a random list of the active words::

    the C A eats the F .
    N As and N Fs .
    A and A like C Fs .
    L                                   (a bare word list)
    in order : <L sorted> .
    counting : one two ... N .
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.tasks.world import NUMBER_WORDS, WorldConfig

_TEMPLATES = ("eats", "numbers", "like", "list", "order", "counting")


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def pretraining_texts(
    rng: np.random.Generator, n: int, config: WorldConfig | None = None
) -> list[str]:
    """``n`` texts, template uniform over the six above (module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or WorldConfig()
    words = config.words
    colours, animals, fruits = words[0::3], words[1::3], words[2::3]
    numbers = NUMBER_WORDS[1 : config.max_len + 1]
    texts = []
    for _ in range(n):
        kind = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        if kind == "eats":
            text = f"the {_pick(rng, colours)} {_pick(rng, animals)} eats the {_pick(rng, fruits)} ."
        elif kind == "numbers":
            text = (
                f"{_pick(rng, numbers)} {_pick(rng, animals)}s and "
                f"{_pick(rng, numbers)} {_pick(rng, fruits)}s ."
            )
        elif kind == "like":
            text = (
                f"{_pick(rng, animals)} and {_pick(rng, animals)} like "
                f"{_pick(rng, colours)} {_pick(rng, fruits)}s ."
            )
        elif kind == "counting":
            text = "counting : " + " ".join(NUMBER_WORDS[1 : 2 + rng.integers(len(numbers))]) + " ."
        else:
            length = int(rng.integers(config.min_len, config.max_len + 1))
            lst = [words[i] for i in rng.choice(len(words), size=length, replace=False)]
            text = " ".join(lst) if kind == "list" else "in order : " + " ".join(sorted(lst)) + " ."
        texts.append(text)
    return texts
