"""Stage 2: the K-way reward model (InstructGPT §3.5, eq. 1, App. C.2).

Each batch element is one prompt with up to K ranked responses, ``[b, K, L]``; all K responses
are scored in one forward pass (reshaped to ``[b·K, L]``), the scalar head is read at each
sequence's last real token (the EOS; ``generation.score``) or, with ``score_pooling="mean"``,
averaged over the tokens (each token adds its own term), and ``losses.ranking_loss`` averages
``−log σ(r_w − r_l)`` over all C(K, 2) pairs of a prompt, every prompt weighing the same (IG
footnote 5: one batch element per prompt keeps the K(K−1)/2 correlated pairs from overfitting).

After training a gain and bias normalise the reward: IG §3.5 shifts it so the labelers'
demonstrations score 0 on average (``normalize="demos_mean"``); ``"demos_mean_std"`` also scales
them to std 1 (Ziegler et al. 2019 normalise to mean 0, std 1, on policy samples).  They are
stored in ``reward_normalization.json`` beside the exported model; ``sources.load_reward_model`` returns
them with the model, ready for ``generation.score(..., gain=, bias=)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import (
    DEFAULT_BUCKETS,
    TRUNCATIONS,
    TruncationStats,
    bucket_length,
    read_comparisons,
    read_demonstrations,
    tokenize_comparisons,
    tokenize_demonstrations,
)
from rlhf_jax.errors import check
from rlhf_jax.generation import score
from rlhf_jax.losses import ranking_loss, ranking_pairs
from rlhf_jax.masked import masked_mean, masked_var
from rlhf_jax.model import Params, Transformer
from rlhf_jax.model_config import SCORE_POOLINGS
from rlhf_jax.data.agreement import across_processes, data_shard, even_rows, fixed_batches, process_batches
from rlhf_jax.stages.config import StageConfig, StageOptimizerConfig, length_buckets
from rlhf_jax.stages.sources import NORMALIZATION_FILE, naming, read_records
from rlhf_jax.stages.steps import Batch, StepFn, jit_on_mesh
from rlhf_jax.stages.skeleton import StageData, StageRun, SupervisedStage, make_step_fn, run_stage
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import OptimizerConfig, TrainState

NORMALIZATIONS = ("demos_mean", "demos_mean_std", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMConfig(StageConfig):
    """Reward-model training.  Defaults are InstructGPT's (App. C.2) where it gives one.

    ``train_data``/``eval_data``: JSONL comparisons (K-way ``{"prompt", "responses",
    "ranking"}``, pairwise ``{"prompt", "chosen", "rejected"}`` or HH-RLHF dialogues).
    ``batch_size`` counts prompts, each with all its responses.
    ``k_max``: responses per batch element (None: the most any comparison has; fewer are padded
    and masked).  ``k_buckets``: None pads every batch to ``k_max``; a list groups comparisons
    with similar K into the same batches (``BatchIterator(group_by="valid")``, windows of 32
    batches) and cuts each batch to the smallest bucket holding its largest K, which saves the
    padded responses' compute when K varies (one compile per bucket used; every prompt still
    weighs the same in its batch).  ``max_len``: longest ``[BOS] prompt response [EOS]`` (None:
    the model's context).  ``truncation``: a comparison with a longer sequence raises ("error"),
    loses its oldest prompt tokens, the same for all its K responses ("left"; skipped if a
    response alone is too long), the ends of its sequences ("right") or is skipped ("skip")
    (``data.truncation``; the demonstrations of ``demos`` follow the same rule); ``skip_bad``:
    skip (and count) malformed lines, e.g. HH-RLHF's empty replies.  Cut and skipped counts go
    to the log and ``metrics.jsonl``.
    ``margin`` is subtracted from each pair's reward difference; ``centering_coef`` adds
    ``coef · mean(r²)`` (Eisenstein et al. 2023) — both 0 in IG.
    ``normalize``/``demos``: see the module docstring; ``demos`` is a demonstrations JSONL.
    ``score_pooling``: ``"last"`` reads the scalar head at the EOS (IG §3.5); ``"mean"`` averages
    it over the tokens (``ModelConfig.score_pooling``), which lets a small model judge answers word
    by word (README "Results"); saved with the model, so every reader of the RM scores the same way.
    """

    batch_size: int = 64  # IG App. C.2: 64 prompts per batch
    epochs: float = 1.0  # IG App. C.2: one epoch; more overfits
    # IG App. C.2: lr 9e-6, cosine decay to 10% of it (a partial ``optimizer`` table keeps the rest).
    optimizer: StageOptimizerConfig = StageOptimizerConfig(lr=9e-6, schedule="cosine", final_lr_fraction=0.1)
    margin: float = 0.0
    centering_coef: float = 0.0
    normalize: Literal["demos_mean", "demos_mean_std", "none"] = "demos_mean"  # IG §3.5
    demos: str | None = None
    k_max: int | None = None
    k_buckets: tuple[int, ...] | None = None
    max_len: int | None = None
    truncation: Literal["error", "left", "right", "skip"] = "error"
    skip_bad: bool = False
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    score_pooling: Literal["last", "mean"] = "last"  # IG §3.5: the EOS token

    def __post_init__(self) -> None:
        super().__post_init__()

        check(self.score_pooling in SCORE_POOLINGS, self, "score_pooling", f"one of {SCORE_POOLINGS}")
        check(math.isfinite(self.margin), self, "margin", "finite")
        check(math.isfinite(self.centering_coef) and self.centering_coef >= 0,
              self, "centering_coef", "finite and >= 0")
        check(self.normalize in NORMALIZATIONS, self, "normalize", f"one of {NORMALIZATIONS}")
        check(self.normalize == "none" or self.demos,
              self, "demos", f"a demonstrations file when normalize={self.normalize!r} (or set normalize='none')")
        check(self.k_max is None or 2 <= self.k_max, self, "k_max", "None or an int >= 2")
        check(self.k_buckets is None or (self.k_buckets and all(
              isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.k_buckets)),
              self, "k_buckets", "None or a non-empty list of ints >= 2")
        check(self.max_len is None or self.max_len >= 3, self, "max_len", "None or an int >= 3")
        check(self.truncation in TRUNCATIONS, self, "truncation", f"one of {TRUNCATIONS}")
        check(isinstance(self.skip_bad, bool), self, "skip_bad", "true or false")
        check(self.buckets and all(isinstance(b, int) and b >= 3 for b in self.buckets),
              self, "buckets", "a non-empty list of ints >= 3")


# ---------------------------------------------------------------------------------- the step


def k_way_rewards(model: Transformer, params: Params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Rewards of K responses per prompt in one forward pass.

    Args:
      tokens, mask: ``[b, K, L]``, each row ``[BOS] prompt response [EOS]`` right padded (an
        all-zero mask row is a missing response; its reward is meaningless and must be masked).

    Returns:
      ``[b, K]`` float32: each row's ``generation.score`` (the scalar head at its last real token,
      or averaged over its tokens, per ``model.config.score_pooling``).
    """
    b, k, length = tokens.shape
    return score(model, params, tokens.reshape(b * k, length), mask.reshape(b * k, length),
                 right_padded=True).reshape(b, k)


def rm_batch_loss(
    model: Transformer,
    params: Params,
    batch: dict[str, jax.Array],
    margin: float = 0.0,
    centering_coef: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """InstructGPT eq. 1 on a batch: ``(loss, (accuracy, rewards))``.

    ``batch``: ``tokens``, ``mask`` ``[b, K, L]`` and ``valid`` ``[b, K]`` (responses best-first,
    ``data.tokenize_comparisons``); ``rewards`` ``[b, K]`` from ``k_way_rewards``; loss and
    accuracy from ``losses.ranking_loss(rewards, valid, margin=, centering_coef=)``.
    """
    rewards = k_way_rewards(model, params, batch["tokens"], batch["mask"])
    loss, accuracy = ranking_loss(rewards, batch["valid"], margin=margin, centering_coef=centering_coef)
    return loss, (accuracy, rewards)


def _rm_loss(model: Transformer, margin: float, centering_coef: float, params: Params,
             batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``rm_batch_loss`` with its metrics (``accuracy``, ``reward_mean``/``reward_std`` over the
    valid responses): the loss ``make_step_fn`` takes."""
    loss, (accuracy, rewards) = rm_batch_loss(model, params, batch, margin, centering_coef)
    return loss, {"accuracy": accuracy, "reward_mean": masked_mean(rewards, batch["valid"]),
                  "reward_std": jnp.sqrt(masked_var(rewards, batch["valid"], unbiased=False))}


@functools.lru_cache(maxsize=None)
def rm_step_fn(
    model: Transformer,
    optimizer: OptimizerConfig | None = None,
    margin: float = 0.0,
    centering_coef: float = 0.0,
) -> StepFn:
    """The pure reward-model update ``(state, batch) -> (state, metrics)`` (``skeleton.make_step_fn``).

    ``batch``: as for ``rm_batch_loss``, whose gradient the update applies.

    Metrics: ``loss``, ``accuracy`` (fraction of the batch's pairs ordered correctly),
    ``reward_mean``/``reward_std`` over the valid responses, ``grad_norm``, and ``lr`` when
    ``optimizer`` is given.
    """
    return make_step_fn(functools.partial(_rm_loss, model, margin, centering_coef), optimizer)


def rm_train_step(
    model: Transformer,
    optimizer: OptimizerConfig | None = None,
    *,
    margin: float = 0.0,
    centering_coef: float = 0.0,
) -> StepFn:
    """``jax.jit(rm_step_fn(...))``: the reward-model update for notebooks and tests."""
    return jax.jit(rm_step_fn(model, optimizer, margin, centering_coef))


@functools.lru_cache(maxsize=None)
def rm_eval_fn(model: Transformer) -> Any:
    """``(params, batch) -> sums`` for exact held-out metrics over many batches:
    ``loss_sum`` (eq. 1 loss × prompts with a pair), ``prompts``, ``correct`` (pairs with
    ``r_better > r_worse``) and ``pairs`` (all valid pairs)."""

    def evaluate(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        rewards = k_way_rewards(model, params, batch["tokens"], batch["mask"])
        valid = batch["valid"] != 0
        pairs = ranking_pairs(batch["valid"])
        correct = pairs & (rewards[:, :, None] > rewards[:, None, :])
        loss, _ = ranking_loss(rewards, batch["valid"])
        prompts = jnp.sum(jnp.sum(valid, axis=1) >= 2)
        return {"loss_sum": loss * prompts, "prompts": prompts, "correct": jnp.sum(correct),
                "pairs": jnp.sum(pairs)}

    return evaluate


@functools.lru_cache(maxsize=None)
def _score_fn(model: Transformer) -> Any:
    return lambda params, batch: score(model, params, batch["tokens"], batch["mask"])


# ------------------------------------------------------------------------------------ the data


def comparison_arrays(
    path: str | Path,
    records: list,
    tokenizer: Tokenizer,
    k_max: int,
    max_len: int,
    buckets: tuple[int, ...],
    truncation: str = "error",
    stats: TruncationStats | None = None,
) -> dict[str, np.ndarray]:
    """``tokens``, ``mask`` ``[n, k_max, L]`` and ``valid`` ``[n, k_max]`` int32 of comparisons read
    from ``path`` (``data.tokenize_comparisons`` with ``truncation``; ``stats`` gets the counts);
    ``L`` is the smallest bucket holding the longest sequence; errors name the file."""
    with naming(path):
        arrays = tokenize_comparisons(records, tokenizer, k_max, max_len, truncation=truncation, stats=stats)
    return _trim(arrays, buckets)


def _trim(arrays: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
    width = bucket_length(max(int(arrays["mask"].sum(-1).max()), 1), buckets)
    return {k: v[..., :width] if v.shape == arrays["mask"].shape else v for k, v in arrays.items()}


# ---------------------------------------------------------------------------- normalisation


def normalization(scores: np.ndarray, method: str) -> dict[str, float]:
    """Gain and bias from raw demonstration scores ``[n]``: ``gain · r + bias`` has mean 0
    (``"demos_mean"``, IG §3.5), also std 1 (``"demos_mean_std"``, population std), or is ``r``
    (``"none"``).  Returns ``{"gain", "bias", "method", "n", "raw_mean", "raw_std"}``."""
    if method not in NORMALIZATIONS:
        raise ValueError(f"normalization method must be one of {NORMALIZATIONS}, got {method!r}")
    scores = np.asarray(scores, np.float64)
    mean = float(scores.mean()) if scores.size else 0.0
    std = float(scores.std()) if scores.size else 0.0
    gain, bias = 1.0, 0.0
    if method == "demos_mean":
        bias = -mean
    elif method == "demos_mean_std":
        if not std > 0:
            raise ValueError(f"cannot scale rewards to std 1: the {scores.size} demonstrations all score {mean}")
        gain, bias = 1.0 / std, -mean / std
    return {"gain": gain, "bias": bias, "method": method, "n": int(scores.size), "raw_mean": mean, "raw_std": std}


def demonstration_rows(path: str | Path, tokenizer: Tokenizer, max_len: int, buckets: tuple[int, ...],
                       truncation: str = "error", skip_bad: bool = False,
                       stats: TruncationStats | None = None) -> dict[str, np.ndarray]:
    """``tokens``, ``mask`` ``[n, L]`` of the demonstrations in ``path``, each as
    ``[BOS] prompt response [EOS]`` (the layout of the comparisons; ``data.tokenize_demonstrations``
    with ``truncation``, ``stats`` getting the counts), right padded to the smallest bucket that
    holds them; errors name the file."""
    stats = TruncationStats() if stats is None else stats
    records = read_records(read_demonstrations, path, "demonstrations", stats, skip_bad=skip_bad)
    with naming(path):
        arrays = tokenize_demonstrations(records, tokenizer, (max_len,), truncation=truncation, stats=stats)
    return _trim({"tokens": arrays["tokens"], "mask": arrays["mask"]}, buckets)


def score_rows(rows: dict[str, np.ndarray], score_batch: Any, batch_size: int) -> np.ndarray:
    """Raw scores ``[n]`` of ``rows`` (``tokens``, ``mask`` ``[n, L]``), ``score_batch`` taking
    ``{"tokens", "mask"}`` of ``batch_size`` rows (the last batch padded)."""
    scores = [np.asarray(score_batch(b)) for b in fixed_batches(rows, batch_size, None)]
    return np.concatenate(scores)[: len(rows["tokens"])]


# --------------------------------------------------------------------------------- the stage


@dataclasses.dataclass
class _HeldOut:
    """What the RM stage reads besides its batches: held-out comparisons and demonstrations."""

    comparisons: dict[str, np.ndarray] | None
    demos: dict[str, np.ndarray] | None
    k_max: int = 2


class RMStage(SupervisedStage):
    """``run_stage``'s hooks for the reward model: K-way comparison batches (grouped by K with
    ``k_buckets``), InstructGPT eq. 1, held-out loss and pairwise accuracy, and the
    normalisation on the demonstrations exported beside the model."""

    name = "rm"
    inputs = ("model.hf_dir", "train_data", "tokenizer", "demos")
    head = "scalar"

    def score_pooling(self, cfg: RMConfig) -> str:
        return cfg.score_pooling

    def loss(self, cfg: RMConfig, model: Transformer, params: Params, batch: Batch) -> tuple[jax.Array, dict]:
        return _rm_loss(model, cfg.margin, cfg.centering_coef, params, batch)

    def step_fn(self, cfg: RMConfig, model: Transformer, optimizer: OptimizerConfig) -> StepFn:
        return rm_step_fn(model, optimizer, margin=cfg.margin, centering_coef=cfg.centering_coef)

    def prepare(self, run: StageRun) -> StageData:
        cfg, tokenizer, mesh = run.cfg, run.tokenizer, run.mesh
        buckets = length_buckets(cfg.buckets, cfg.max_len, run.model_config.max_len, "RMConfig")
        max_len = buckets[-1]
        stats = {name: TruncationStats() for name in ("train_data", "eval_data", "demos") if getattr(cfg, name)}
        train_records = read_records(read_comparisons, cfg.train_data, "comparisons", stats["train_data"],
                                     skip_bad=cfg.skip_bad, **data_shard(mesh))  # this process's part
        eval_records = None if cfg.eval_data is None else read_records(
            read_comparisons, cfg.eval_data, "comparisons", stats["eval_data"], skip_bad=cfg.skip_bad)
        k_max = cfg.k_max or max([across_processes(max(len(r.responses) for r in train_records)),
                                  *(len(r.responses) for r in eval_records or [])])
        pads = {"tokens": tokenizer.pad_id}
        train = even_rows(comparison_arrays(cfg.train_data, train_records, tokenizer, k_max, max_len, buckets,
                                            cfg.truncation, stats["train_data"]), pads)
        n_train = len(train["tokens"]) * data_shard(mesh)["shard_count"]
        held_out = None
        if eval_records is not None:
            held_out = comparison_arrays(cfg.eval_data, eval_records, tokenizer, k_max, max_len, buckets,
                                         cfg.truncation, stats["eval_data"])
        demos = None if cfg.normalize == "none" else demonstration_rows(
            cfg.demos, tokenizer, max_len, buckets, cfg.truncation, cfg.skip_bad, stats["demos"])
        if cfg.batch_size > n_train:
            raise ConfigError(f"RMConfig.batch_size {cfg.batch_size} exceeds the {n_train} "
                              f"comparisons of {cfg.train_data}")
        batches = process_batches(train, cfg.batch_size, mesh, seed=cfg.seed, buckets=buckets, pad_values=pads,
                                  where="RMConfig.batch_size", group_by="valid" if cfg.k_buckets else None,
                                  group_buckets=cfg.k_buckets)
        return StageData(batches, len(batches), _HeldOut(held_out, demos, k_max), stats)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]]:
        max_len = length_buckets(run.cfg.buckets, run.cfg.max_len, run.model_config.max_len, "RMConfig")[-1]
        return "rm", {"batch_size": run.cfg.batch_size, "k_responses": run.data.held_out.k_max, "seq_len": max_len}

    def evaluator(self, run: StageRun) -> Any:
        held_out = run.data.held_out.comparisons
        if held_out is None:
            return None
        return _make_eval(run.setup.model, run.setup.state, run.mesh,
                          fixed_batches(held_out, run.cfg.batch_size, run.cfg.eval_batches))

    def export(self, run: StageRun, state: TrainState) -> tuple[Transformer, Params, dict[str, Any]]:
        cfg, model, demos = run.cfg, run.setup.model, run.data.held_out.demos
        norm = normalization(np.zeros(0), "none")
        if demos is not None:
            score_batch = jit_on_mesh(_score_fn(model), run.mesh, state.params, returns_tree=False)
            raw = score_rows(demos, lambda batch: score_batch(state.params, batch), cfg.batch_size)
            norm = {**normalization(raw, cfg.normalize), "demos": cfg.demos}
        return model, state.params, {NORMALIZATION_FILE: norm}


def train_rm(cfg: RMConfig) -> Path:
    """Run (or resume, or skip if complete) the reward-model stage (``skeleton.run_stage``);
    returns ``workdir/model``.

    Trains on ``cfg.train_data`` for ``loop.total_steps`` or ``epochs``, reports held-out loss and
    pairwise accuracy over all pairs of ``eval_data``, then computes the normalisation on
    ``demos`` and exports the model with ``reward_normalization.json``.
    """
    return run_stage(RMStage(), cfg)


def _make_eval(model: Transformer, state: TrainState, mesh: Any, batches: list) -> Any:
    """``state -> {"loss", "accuracy"}`` over all held-out batches (exact, not a mean of means)."""
    evaluate = jit_on_mesh(rm_eval_fn(model), mesh, state.params, returns_tree=False)

    def eval_fn(state: TrainState) -> dict[str, float]:
        sums = [jax.device_get(evaluate(state.params, batch)) for batch in batches]
        total = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
        return {"loss": total["loss_sum"] / max(total["prompts"], 1.0),
                "accuracy": total["correct"] / max(total["pairs"], 1.0)}

    return eval_fn
