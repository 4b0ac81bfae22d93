"""Pretraining text "of the world": sentences about its words, never answers to its prompts.

Used to pretrain the tiny base model and as the pretraining distribution of the PPO-ptx term
(IG eq. 2, γ·E_pretrain[log π(x)]).  As web text teaches a real base model to repeat, reorder
and count what it reads before any instruction tuning, most sentences (``SKILL_SHARE``) show those skills
on a list, in prose rather than in the prompt format (no ``answer:``), so that SFT only has to
teach which skill an instruction asks for.  Templates, with ``C``/``A``/``F`` a colour/animal/fruit
of the active words, ``N`` a number word and ``L`` a random list of the active words::

    the C A eats the F .                       (world)
    N As and N Fs .
    A and A like C Fs .
    counting : one two ... N .
    L .                                        (skills)
    L , again L .
    L , backwards <L reversed> .
    L , in order <L sorted> .
    L , N words .
    L , first <first of L> , last <last of L> .
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.tasks.world import NUMBER_WORDS, WorldConfig

WORLD_TEMPLATES = ("eats", "numbers", "like", "counting")
SKILL_TEMPLATES = ("list", "again", "backwards", "order", "size", "ends")
TEMPLATES = WORLD_TEMPLATES + SKILL_TEMPLATES
SKILL_SHARE = 0.8  # of the sentences; the skills are what the base model must learn
_WEIGHTS = [(1 - SKILL_SHARE) / len(WORLD_TEMPLATES)] * len(WORLD_TEMPLATES) + [SKILL_SHARE / len(SKILL_TEMPLATES)] * len(SKILL_TEMPLATES)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[rng.integers(len(words))]


def _skill_text(kind: str, lst: list[str]) -> str:
    head = " ".join(lst)
    if kind == "list":
        return f"{head} ."
    if kind == "again":
        return f"{head} , again {head} ."
    if kind == "backwards":
        return f"{head} , backwards {' '.join(lst[::-1])} ."
    if kind == "order":
        return f"{head} , in order {' '.join(sorted(lst))} ."
    if kind == "size":
        return f"{head} , {NUMBER_WORDS[len(lst)]} words ."
    return f"{head} , first {lst[0]} , last {lst[-1]} ."  # ends


def pretraining_texts(
    rng: np.random.Generator, n: int, config: WorldConfig | None = None
) -> list[str]:
    """``n`` texts: a skill template with probability ``SKILL_SHARE``, else a world template,
    uniformly within each group (module docstring)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or WorldConfig()
    words = config.words
    colours, animals, fruits = words[0::3], words[1::3], words[2::3]
    numbers = NUMBER_WORDS[1 : config.max_len + 1]
    texts: list[str] = []
    for _ in range(n):
        kind = TEMPLATES[rng.choice(len(TEMPLATES), p=_WEIGHTS)]
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
            text = _skill_text(kind, lst)
        texts.append(text)
    return texts
