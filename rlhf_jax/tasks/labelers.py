"""Simulated labelers: imperfect demonstrations and noisy K-way rankings.

Rankings follow a Plackett-Luce model: a labeler ranks responses by the utility

    u_i = gold_score(prompt, y_i, ended_i) + noise * G_i,      G_i ~ Gumbel(0, 1) i.i.d.,

best first, so any pair is ordered by a Bradley-Terry choice,
P(y_i above y_j) = sigmoid((g_i - g_j) / noise) -- the model the reward loss assumes (IG eq. 1).
Two independent labelers agree on a pair with probability p^2 + (1 - p)^2.

``DEFAULT_LABELER_NOISE`` is calibrated (``calibrate_noise`` on ``sft_like_responses`` of 2000
default-world prompts, K = 4) so that two labelers agree on 73% of pairs, InstructGPT's
inter-annotator agreement among training labelers (IG §5.3, 72.6 ± 1.5%).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from rlhf_jax.tasks.mistakes import corrupt_answer
from rlhf_jax.tasks.world import WorldConfig, correct_answer, gold_score, sample_prompts

DEFAULT_LABELER_NOISE = 0.57  # calibrate_noise(*default_calibration_sets()) = 0.572
TARGET_AGREEMENT = 0.73  # IG §5.3: 72.6 ± 1.5% among training labelers


def _resolve_noise(noise: float | None, config: WorldConfig | None = None) -> float:
    if noise is None:
        noise = config.labeler_noise if config is not None else None
    noise = DEFAULT_LABELER_NOISE if noise is None else float(noise)
    if not (np.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite float >= 0, got {noise}")
    return noise


def demonstrations(
    rng: np.random.Generator,
    n: int,
    error_rate: float | None = None,
    config: WorldConfig | None = None,
    exclude: Collection[str] = (),
) -> list[dict[str, str]]:
    """``n`` records ``{"prompt", "response"}`` written by careless labelers: each response is
    the correct answer, or with probability ``error_rate`` (default ``config.error_rate``) the
    answer with exactly one plausible mistake (``mistakes.corrupt_answer``)."""
    config = config or WorldConfig()
    error_rate = config.error_rate if error_rate is None else error_rate
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    prompts = sample_prompts(rng, n, config, exclude=frozenset(exclude))
    out = []
    for p in prompts:
        wrong = rng.random() < error_rate
        response = corrupt_answer(rng, p, 1, config) if wrong else correct_answer(p)
        out.append({"prompt": p, "response": response})
    return out


def sft_like_responses(
    rng: np.random.Generator, prompt: str, k: int, config: WorldConfig | None = None
) -> tuple[list[str], list[bool]]:
    """``k`` responses resembling samples of an imperfect SFT policy, for calibration.

    Each is the correct answer with probability 0.45, else the answer with 1, 2 or 3 mistakes
    (probabilities 0.5, 0.3, 0.2); independently a junk word ("the") is appended with
    probability 0.05 and the response is left unended (no EOS) with probability 0.1.
    Returns ``(responses, ended)``, both of length ``k``.
    """
    responses, ended = [], []
    for _ in range(k):
        if rng.random() < 0.45:
            r = correct_answer(prompt)
        else:
            r = corrupt_answer(rng, prompt, int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), config)
        if rng.random() < 0.05:
            r += " the"
        responses.append(r)
        ended.append(bool(rng.random() >= 0.1))
    return responses, ended


def rank_responses(
    rng: np.random.Generator,
    prompt: str,
    responses: Sequence[str],
    ended: Sequence[bool],
    noise: float | None = None,
) -> list[int]:
    """One labeler's ranking of ``responses``: indices, best first (module docstring).

    ``noise=0`` ranks by gold score exactly, breaking ties uniformly at random.
    """
    if len(responses) != len(ended):
        raise ValueError(f"responses and ended differ in length: {len(responses)} vs {len(ended)}")
    noise = _resolve_noise(noise)
    gold = np.array([gold_score(prompt, r, bool(e)) for r, e in zip(responses, ended)])
    utility = gold + noise * rng.gumbel(size=len(gold))
    tiebreak = rng.random(len(gold))
    return [int(i) for i in np.lexsort((tiebreak, -utility))]


def _distinct_pairs(responses: Sequence[str], ended: Sequence[bool]) -> list[tuple[int, int]]:
    """Pairs ``i < j`` whose (text, ended) differ -- identical responses have no preference."""
    k = len(responses)
    return [
        (i, j) for i in range(k) for j in range(i + 1, k)
        if (responses[i].split(), ended[i]) != (responses[j].split(), ended[j])
    ]  # fmt: skip


def _check_sets(
    prompts, response_sets, ended_sets, names=("response_sets", "ended_sets")
) -> list[list[bool]]:
    """``ended_sets`` as lists of bools (all True if None), after checking the lengths match."""
    rname, ename = names
    if ended_sets is None:
        ended_sets = [[True] * len(rs) for rs in response_sets]
    if not len(prompts) == len(response_sets) == len(ended_sets):
        raise ValueError(
            f"prompts, {rname} and {ename} must have one length, got "
            f"{len(prompts)}, {len(response_sets)}, {len(ended_sets)}"
        )
    for n, (rs, es) in enumerate(zip(response_sets, ended_sets)):
        if len(rs) != len(es):
            raise ValueError(f"{rname}[{n}] has {len(rs)} responses but {ename}[{n}] {len(es)}")
    return [list(map(bool, es)) for es in ended_sets]


def labeler_agreement(
    rng: np.random.Generator,
    prompts: Sequence[str],
    response_sets: Sequence[Sequence[str]],
    noise: float | None = None,
    ended_sets: Sequence[Sequence[bool]] | None = None,
) -> tuple[float, int]:
    """Measured agreement of two independent labelers: ``(fraction of pairs ordered alike,
    number of pairs)`` over the pairs of distinct responses of each set (all ended if
    ``ended_sets`` is None)."""
    ended_sets = _check_sets(prompts, response_sets, ended_sets)
    agree = total = 0
    for p, rs, es in zip(prompts, response_sets, ended_sets):
        pos_a = np.argsort(rank_responses(rng, p, rs, es, noise))  # position of each response
        pos_b = np.argsort(rank_responses(rng, p, rs, es, noise))
        for i, j in _distinct_pairs(rs, es):
            agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
            total += 1
    if total == 0:
        raise ValueError("no pair of distinct responses to compare")
    return agree / total, total


def _gold_differences(prompts, response_sets, ended_sets) -> np.ndarray:
    """``[pairs]`` gold-score differences over the distinct pairs of every set."""
    diffs = []
    for p, rs, es in zip(prompts, response_sets, ended_sets):
        g = [gold_score(p, r, e) for r, e in zip(rs, es)]
        diffs += [g[i] - g[j] for i, j in _distinct_pairs(rs, es)]
    return np.array(diffs)


def _agreement_from_diffs(diffs: np.ndarray, noise: float) -> float:
    if noise == 0:
        p = np.where(diffs > 0, 1.0, np.where(diffs < 0, 0.0, 0.5))
    else:
        p = 1.0 / (1.0 + np.exp(-diffs / noise))
    return float(np.mean(p**2 + (1 - p) ** 2))


def expected_agreement(
    prompts: Sequence[str],
    response_sets: Sequence[Sequence[str]],
    noise: float | None = None,
    ended_sets: Sequence[Sequence[bool]] | None = None,
) -> float:
    """Closed-form expected agreement: the mean over distinct pairs of p^2 + (1-p)^2 with
    p = sigmoid((g_i - g_j) / noise)."""
    ended_sets = _check_sets(prompts, response_sets, ended_sets)
    return _agreement_from_diffs(_gold_differences(prompts, response_sets, ended_sets),
                                 _resolve_noise(noise))  # fmt: skip


def calibrate_noise(
    prompts: Sequence[str],
    response_sets: Sequence[Sequence[str]],
    ended_sets: Sequence[Sequence[bool]] | None = None,
    target: float = TARGET_AGREEMENT,
) -> float:
    """The labeler noise at which ``expected_agreement`` equals ``target`` (bisection; the
    agreement falls monotonically from its noise-free value to 0.5 as noise grows)."""
    ended_sets = _check_sets(prompts, response_sets, ended_sets)
    diffs = _gold_differences(prompts, response_sets, ended_sets)
    if diffs.size == 0:
        raise ValueError("no pair of distinct responses to calibrate on")
    best = _agreement_from_diffs(diffs, 0.0)
    if not 0.5 < target <= best:
        raise ValueError(f"target must be in (0.5, {best:.4f}] for these responses, got {target}")
    lo, hi = 0.0, 1.0
    while _agreement_from_diffs(diffs, hi) > target:
        hi *= 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _agreement_from_diffs(diffs, mid) > target else (lo, mid)
    return 0.5 * (lo + hi)


def default_calibration_sets(
    seed: int = 0, n_prompts: int = 2000, k: int = 4, config: WorldConfig | None = None
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The prompts and ``sft_like_responses`` sets ``DEFAULT_LABELER_NOISE`` is calibrated on."""
    rng = np.random.default_rng(seed)
    prompts = sample_prompts(rng, n_prompts, config)
    sets = [sft_like_responses(rng, p, k, config) for p in prompts]
    return prompts, [s[0] for s in sets], [s[1] for s in sets]


def make_comparisons(
    rng: np.random.Generator,
    prompts: Sequence[str],
    samples_per_prompt: Sequence[Sequence[str]],
    ended: Sequence[Sequence[bool]],
    k: int | None = None,
    noise: float | None = None,
    config: WorldConfig | None = None,
) -> list[dict]:
    """Comparison records ``{"prompt", "responses", "ranking"}`` (ranking: indices into
    ``responses``, best first), one per prompt: ``k`` (default ``config.ranking_k``) of the
    prompt's samples, drawn without replacement, ranked by one simulated labeler."""
    config = config or WorldConfig()
    k = config.ranking_k if k is None else k
    ended = _check_sets(prompts, samples_per_prompt, ended, ("samples_per_prompt", "ended"))
    noise = _resolve_noise(noise, config)
    records = []
    for n, (p, samples, es) in enumerate(zip(prompts, samples_per_prompt, ended)):
        if len(samples) < k:
            raise ValueError(f"samples_per_prompt[{n}] has {len(samples)} samples, need k={k}")
        pick = rng.choice(len(samples), size=k, replace=False)
        responses = [samples[i] for i in pick]
        ranking = rank_responses(rng, p, responses, [es[i] for i in pick], noise)
        records.append({"prompt": p, "responses": responses, "ranking": ranking})
    return records
