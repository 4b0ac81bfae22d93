"""The synthetic instruction-following world: vocabulary, prompts, correct answers, gold score.

A tiny instruction language over a few dozen short words, small enough for a 4-layer model to
learn on a laptop CPU in minutes, with a programmatic *gold* reward standing in for the
human-preference ground truth (the set-up of simulated-annotator and gold-RM studies: AlpacaFarm,
Dubois et al. 2023; Gao et al. 2022, "Scaling laws for reward model overoptimization").

Prompt and response formats (words are always preceded by a space so a BPE tokenizer gives each
word one token)::

    prompt   = "reverse: cat dog red\\nanswer:"
    response = " red dog cat"                     (EOS is appended by the tokenizer, not here)

Families (``FAMILIES``), for the word list ``w1 .. wn``:

    copy     w1 .. wn                      reverse  wn .. w1
    sort     the words in alphabetical order
    count    the number word for n          ("three")
    first    w1                             last     wn
    plural   w1+"s" .. wn+"s"

Lists are drawn without replacement, so every answer is unique.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Sequence

import numpy as np

# Interleaved colour, animal, fruit, so that the first ``n_words`` always hold all three kinds.
WORDS: tuple[str, ...] = (
    "red", "cat", "apple", "blue", "dog", "pear", "green", "cow", "plum",
    "pink", "pig", "fig", "gold", "owl", "kiwi", "tan", "bee", "date",
    "gray", "hen", "melon", "black", "ant", "grape", "white", "rat", "lemon",
    "teal", "elk", "olive", "navy", "yak", "mango", "brown", "eel", "lime",
)  # fmt: skip
COLOURS, ANIMALS, FRUITS = WORDS[0::3], WORDS[1::3], WORDS[2::3]
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)  # fmt: skip
FAMILIES: tuple[str, ...] = ("copy", "reverse", "sort", "count", "first", "last", "plural")
DEFAULT_FAMILIES: tuple[str, ...] = ("copy", "reverse", "sort", "count", "first", "last")
MAX_LIST_LEN = 8  # so that a count off by one still has a number word
ANSWER_SUFFIX = "\nanswer:"

# Every word any answer can contain; anything else in a response is junk.
LEXICON: frozenset[str] = frozenset(WORDS) | {w + "s" for w in WORDS} | frozenset(NUMBER_WORDS)

# Gold-score weights (see ``gold_score``).
EXTRA_WORD_PENALTY = 0.25
JUNK_WORD_PENALTY = 0.25
NOT_ENDED_PENALTY = 0.5

_PROMPT_RE = re.compile(r"^([a-z]+): ([a-z]+(?: [a-z]+)*)\nanswer:$")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Everything that defines one synthetic world; all sampling is deterministic from ``seed``.

    ``labeler_noise`` is the scale of the Gumbel noise in the simulated labelers' utilities
    (Plackett-Luce rankings, Bradley-Terry pairs); ``None`` means the calibrated default that
    gives InstructGPT's ~73% inter-annotator agreement (IG §5.3 / App. B), see
    ``labelers.DEFAULT_LABELER_NOISE``. ``ranking_k`` is the number of responses a labeler ranks
    (IG §3.5: K = 4..9).
    """

    seed: int = 0
    families: tuple[str, ...] = DEFAULT_FAMILIES
    n_words: int = 24
    min_len: int = 2
    max_len: int = 5
    error_rate: float = 0.3
    labeler_noise: float | None = None
    ranking_k: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"WorldConfig.seed must be an integer >= 0, got {self.seed!r}")
        fams = tuple(self.families)
        object.__setattr__(self, "families", fams)
        if not fams or len(set(fams)) != len(fams) or not set(fams) <= set(FAMILIES):
            raise ValueError(
                f"WorldConfig.families must be a non-empty tuple of distinct names from "
                f"{FAMILIES}, got {self.families!r}"
            )
        if not 3 <= self.n_words <= len(WORDS):
            raise ValueError(f"WorldConfig.n_words must be in [3, {len(WORDS)}], got {self.n_words}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(
                f"WorldConfig.min_len must be in [1, max_len={self.max_len}], got {self.min_len}"
            )
        if not self.max_len <= min(MAX_LIST_LEN, self.n_words):
            raise ValueError(
                f"WorldConfig.max_len must be in [min_len, {min(MAX_LIST_LEN, self.n_words)}] "
                f"(at most {MAX_LIST_LEN} and at most n_words), got {self.max_len}"
            )
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"WorldConfig.error_rate must be in [0, 1], got {self.error_rate}")
        if self.labeler_noise is not None and not (
            np.isfinite(self.labeler_noise) and self.labeler_noise >= 0
        ):
            raise ValueError(
                f"WorldConfig.labeler_noise must be None or a finite float >= 0, "
                f"got {self.labeler_noise}"
            )
        if not 2 <= self.ranking_k <= 9:
            raise ValueError(f"WorldConfig.ranking_k must be in [2, 9], got {self.ranking_k}")

    @property
    def words(self) -> tuple[str, ...]:
        """The active words: the first ``n_words`` of ``WORDS``."""
        return WORDS[: self.n_words]


def format_prompt(family: str, words: Sequence[str]) -> str:
    """``"reverse: cat dog red\\nanswer:"``."""
    return f"{family}: {' '.join(words)}{ANSWER_SUFFIX}"


def parse_prompt(prompt: str) -> tuple[str, tuple[str, ...]]:
    """``(family, words)`` of a world prompt; ``ValueError`` naming the problem otherwise."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise ValueError(
            f"prompt {prompt!r} is not of the form '<family>: <word> ... <word>\\nanswer:'"
        )
    family, words = m.group(1), tuple(m.group(2).split(" "))
    if family not in FAMILIES:
        raise ValueError(f"prompt {prompt!r}: unknown family {family!r}, expected one of {FAMILIES}")
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: words {unknown} are not in the world's WORDS")
    if len(words) > MAX_LIST_LEN:
        raise ValueError(f"prompt {prompt!r}: {len(words)} words, at most {MAX_LIST_LEN} allowed")
    return family, words


def answer_words(family: str, words: Sequence[str]) -> list[str]:
    """The correct answer of ``family`` applied to ``words``, as a list of words."""
    words = list(words)
    if family == "copy":
        return words
    if family == "reverse":
        return words[::-1]
    if family == "sort":
        return sorted(words)
    if family == "count":
        return [NUMBER_WORDS[len(words)]]
    if family == "first":
        return words[:1]
    if family == "last":
        return words[-1:]
    if family == "plural":
        return [w + "s" for w in words]
    raise ValueError(f"unknown family {family!r}, expected one of {FAMILIES}")


def format_response(words: Sequence[str]) -> str:
    """``" red dog cat"``: every word preceded by one space."""
    return "".join(" " + w for w in words)


def correct_answer(prompt: str) -> str:
    """The exact answer to a world prompt, in response format (leading space, no EOS)."""
    return format_response(answer_words(*parse_prompt(prompt)))


def sample_prompts(
    rng: np.random.Generator,
    n: int,
    config: WorldConfig | None = None,
    families: Sequence[str] | None = None,
    exclude: Collection[str] = (),
) -> list[str]:
    """``n`` prompts: family uniform over ``families`` (default ``config.families``), list length
    uniform in ``[min_len, max_len]``, words drawn without replacement from ``config.words``.
    Prompts in ``exclude`` (e.g. a held-out evaluation set) are redrawn."""
    config = config or WorldConfig()
    families = tuple(config.families if families is None else families)
    if not families or not set(families) <= set(FAMILIES):
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[str] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"could not draw {n} prompts outside `exclude` ({len(exclude)} prompts)")
        family = families[rng.integers(len(families))]
        length = int(rng.integers(config.min_len, config.max_len + 1))
        idx = rng.choice(config.n_words, size=length, replace=False)
        prompt = format_prompt(family, [config.words[i] for i in idx])
        if prompt not in exclude:
            out.append(prompt)
    return out


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (order-aware overlap)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _word_credit(got: str, want: str) -> float:
    """1 for the right word; for number words ``max(0, 1 - |got - want| / 2)``; else 0."""
    if got == want:
        return 1.0
    if got in NUMBER_WORDS and want in NUMBER_WORDS:
        return max(0.0, 1.0 - abs(NUMBER_WORDS.index(got) - NUMBER_WORDS.index(want)) / 2)
    return 0.0


def gold_score(prompt: str, response: str, ended: bool) -> float:
    """The world's ground-truth reward of ``response`` to ``prompt``: 1 at best, mostly in [-1, 1].

    With ``T`` the correct answer's words and ``R = response.split()``::

        position = sum_{i < min(|R|,|T|)} credit(R_i, T_i) / |T|     (credit: 1 if equal;
                                                                      number words off by d:
                                                                      max(0, 1 - d/2))
        order    = LCS(R, T) / |T|                                   (longest common subsequence)
        quality  = (position + order) / 2                            in [0, 1]
        penalty  = 0.25 * max(0, |R| - |T|)                          extra words
                 + 0.25 * #{r in R : r not in LEXICON}               junk words
                 + 0.5  * (not ended)                                never emitted EOS
        score    = 2 * quality - 1 - penalty

    The exact answer that ended scores 1, an ended response with no right word (or the empty
    response) -1, and penalties push worse responses below -1 (to at most -1.5 - 0.5 |R|), so
    that the score keeps ordering even wholly wrong responses (concise beats rambling).
    ``ended`` is whether the sampler emitted EOS (a truncated response is penalised, as Z19/N+
    penalise no-EOS samples).
    """
    target = answer_words(*parse_prompt(prompt))
    got = response.split()
    position = sum(_word_credit(r, t) for r, t in zip(got, target)) / len(target)
    order = _lcs(got, target) / len(target)
    quality = 0.5 * (position + order)
    penalty = (
        EXTRA_WORD_PENALTY * max(0, len(got) - len(target))
        + JUNK_WORD_PENALTY * sum(w not in LEXICON for w in got)
        + NOT_ENDED_PENALTY * (not ended)
    )
    return float(2.0 * quality - 1.0 - penalty)


def gold_scores(
    prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]
) -> np.ndarray:
    """``gold_score`` over a batch: ``[batch]`` float64."""
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(
            f"prompts, responses and ended must have one length, got "
            f"{len(prompts)}, {len(responses)}, {len(ended)}"
        )
    return np.array([gold_score(p, r, bool(e)) for p, r, e in zip(prompts, responses, ended)])
