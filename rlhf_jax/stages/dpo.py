"""Direct preference optimisation on the comparison files (Rafailov et al. 2023), a stage of
``skeleton.run_stage``.

The policy starts from ``cfg.model`` (the SFT model), which is also the frozen reference π_ref.
Each batch element is one prompt with its K ranked responses ``[b, K, L]`` (the reward model's
comparison files); a ranking becomes all its C(K, 2) preference pairs, or only the best response
against each other one (``best_vs_rest``), and ``dpo.dpo_batch_loss`` averages the chosen loss
(``loss_type``: sigmoid, ipo, hinge, robust) over the pairs.  The reference's log-probs are
computed in the same compiled step from its frozen weights, which live in the train state
(``DPOState``) and so are sharded and checkpointed like the policy's.  Held-out: the DPO loss,
the pairwise accuracy of the implicit reward ``β·(log π_θ − log π_ref)`` and its margin.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import (DEFAULT_BUCKETS, TRUNCATIONS, DataError, TruncationStats, bucket_length, read_comparisons,
                           tokenize_comparisons)
from rlhf_jax.dpo import DPO_LOSS_TYPES, DPOLossType, dpo_batch_loss, ranked_pairs
from rlhf_jax.errors import check
from rlhf_jax.model import Params, Transformer
from rlhf_jax.sharding import state_shardings
from rlhf_jax.data.agreement import across_processes, data_shard, even_rows, fixed_batches, process_batches
from rlhf_jax.stages.config import StageConfig, StageOptimizerConfig, length_buckets
from rlhf_jax.stages.sources import load_model
from rlhf_jax.stages.steps import (
    Batch,
    Setup,
    StepFn,
    cached_optimizer,
    check_batch_fits_mesh,
    init_train_state,
    jit_on_mesh,
)
from rlhf_jax.stages.skeleton import StageData, StageRun, SupervisedStage, make_step_fn, run_stage
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import OptimizerConfig, TrainState


@dataclasses.dataclass(frozen=True)
class DPOOptimizerConfig(StageOptimizerConfig):
    """DPO (Rafailov et al. 2023, App. B): lr 1e-6 after a linear warm-up of 150 steps, then
    constant; TRL's ``DPOConfig`` also uses 1e-6."""

    lr: float = 1e-6
    warmup_steps: int = 150
    schedule: Literal["constant", "cosine", "linear"] = "constant"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(StageConfig):
    """The DPO stage.  ``model``: the SFT model (policy init and frozen reference).
    ``train_data``/``eval_data``: JSONL comparisons, as for ``RMConfig`` (K-way rankings,
    chosen/rejected pairs or HH-RLHF dialogues).  ``batch_size`` counts prompts, each with all its
    responses (DPO App. B: 64 pairs).  ``beta``: β (DPO: 0.1).  ``loss_type``/``label_smoothing``:
    see ``dpo.dpo_loss``.  ``best_vs_rest``: only the best response against each other one, not all
    C(K, 2) pairs.  ``k_max``/``max_len``/``buckets``/``truncation``/``skip_bad``: as for ``RMConfig``.
    """

    batch_size: int = 64
    optimizer: DPOOptimizerConfig = DPOOptimizerConfig()
    beta: float = 0.1
    loss_type: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    best_vs_rest: bool = False
    k_max: int | None = None
    max_len: int | None = None
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    truncation: Literal["error", "left", "right", "skip"] = "error"
    skip_bad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()

        check(isinstance(self.beta, (int, float)) and self.beta > 0, self, "beta", "a number > 0")
        check(self.loss_type in DPO_LOSS_TYPES, self, "loss_type", f"one of {DPO_LOSS_TYPES}")
        smoothed = ("sigmoid", "robust")
        check(0 <= self.label_smoothing < 0.5 and (not self.label_smoothing or self.loss_type in smoothed),
              self, "label_smoothing", "in [0, 0.5), and 0 unless loss_type is 'sigmoid' or 'robust'")
        check(self.k_max is None or 2 <= self.k_max, self, "k_max", "None or an int >= 2")
        check(self.max_len is None or self.max_len >= 3, self, "max_len", "None or an int >= 3")
        check(self.buckets and all(isinstance(b, int) and b >= 3 for b in self.buckets),
              self, "buckets", "a non-empty list of ints >= 3")
        check(self.truncation in TRUNCATIONS, self, "truncation", f"one of {TRUNCATIONS}")
        check(isinstance(self.skip_bad, bool), self, "skip_bad", "true or false")


@flax.struct.dataclass
class DPOState:
    """The policy's train state and the frozen reference's parameters (π_SFT), one pytree."""

    policy: TrainState
    ref_params: Params


class DPOLoss(NamedTuple):
    """The loss settings of a ``DPOConfig`` (hashable: one compiled step per settings)."""

    beta: float
    loss_type: str
    label_smoothing: float
    best_vs_rest: bool

    @classmethod
    def of(cls, cfg: DPOConfig) -> DPOLoss:
        return cls(cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.best_vs_rest)


def _loss(settings: DPOLoss, model: Transformer, ref_params: Params, params: Params,
          batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    return dpo_batch_loss(model, params, ref_params, batch, **settings._asdict())


@functools.lru_cache(maxsize=None)
def dpo_step_fn(settings: DPOLoss, model: Transformer, optimizer: OptimizerConfig | None = None) -> StepFn:
    """``(DPOState, batch) -> (DPOState, metrics)``: one update of the policy on
    ``dpo_batch_loss`` (``batch``: ``tokens``, ``mask``, ``loss_mask`` ``[b, K, L]``, ``valid``
    ``[b, K]``).  Metrics: ``loss``, ``rewards_chosen``, ``rewards_rejected``, ``margin``,
    ``accuracy``, ``grad_norm`` and ``lr`` (``skeleton.make_step_fn``).  One function per
    arguments, so that re-created stages (a resumed run) reuse the compiled step."""

    def step(state: DPOState, batch: Batch) -> tuple[DPOState, dict[str, jax.Array]]:
        update = make_step_fn(functools.partial(_loss, settings, model, state.ref_params), optimizer)
        policy, metrics = update(state.policy, batch)
        return state.replace(policy=policy), metrics

    return step


def read_preferences(path: str, skip_bad: bool, stats: TruncationStats, shard_index: int = 0,
                     shard_count: int = 1) -> list:
    """The comparisons of ``path`` (its ``shard_index``-th of ``shard_count`` parts; malformed lines
    skipped and counted with ``skip_bad``); a file without any is a ``DataError``."""
    records = read_comparisons(path, skip_bad=skip_bad, shard_index=shard_index, shard_count=shard_count)
    stats.bad_lines += records.n_skipped
    if not records:
        raise DataError(f"{path}: no comparisons")
    return records


def preference_arrays(path: str, records: list, tokenizer: Tokenizer, k_max: int, max_len: int,
                      buckets: tuple[int, ...], truncation: str, stats: TruncationStats) -> dict[str, np.ndarray]:
    """``tokens``, ``mask``, ``loss_mask`` ``[n, k_max, L]`` and ``valid`` ``[n, k_max]`` of
    comparisons read from ``path``, best-first (``data.tokenize_comparisons(with_loss_mask=True)``
    with ``truncation``; ``stats`` gets the counts), ``L`` the smallest bucket holding the longest
    sequence; errors name the file."""
    try:
        arrays = tokenize_comparisons(records, tokenizer, k_max, max_len, truncation=truncation, stats=stats,
                                      with_loss_mask=True)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    width = bucket_length(max(int(arrays["mask"].sum(-1).max()), 1), buckets)
    return {key: v[..., :width] if v.ndim == 3 else v for key, v in arrays.items()}


@dataclasses.dataclass
class _Data(StageData):
    """``StageData`` plus ``k_max``: the responses per comparison (the batches' K)."""

    k_max: int = 2


class DPOStage(SupervisedStage):
    """``run_stage``'s hooks for DPO: comparison batches with response masks, the policy and its
    frozen reference in one state, held-out loss / accuracy / margin, and the policy exported."""

    name = "dpo"
    inputs = ("model.hf_dir", "train_data", "tokenizer")
    head = "lm"

    def prepare(self, run: StageRun) -> _Data:
        cfg, tokenizer, mesh = run.cfg, run.tokenizer, run.mesh
        buckets = length_buckets(cfg.buckets, cfg.max_len, run.model_config.max_len, "DPOConfig")
        stats = {name: TruncationStats() for name in ("train_data", "eval_data") if getattr(cfg, name)}
        train_records = read_preferences(cfg.train_data, cfg.skip_bad, stats["train_data"], **data_shard(mesh))
        eval_records = None if cfg.eval_data is None else read_preferences(cfg.eval_data, cfg.skip_bad,
                                                                            stats["eval_data"])
        k_max = cfg.k_max or max([across_processes(max(len(r.responses) for r in train_records)),
                                  *(len(r.responses) for r in eval_records or [])])
        arrays = lambda path, records, name: preference_arrays(  # noqa: E731
            path, records, tokenizer, k_max, buckets[-1], buckets, cfg.truncation, stats[name])
        pads = {"tokens": tokenizer.pad_id}
        train = even_rows(arrays(cfg.train_data, train_records, "train_data"), pads)
        held_out = None if eval_records is None else arrays(cfg.eval_data, eval_records, "eval_data")
        n_train = len(train["tokens"]) * data_shard(mesh)["shard_count"]
        if cfg.batch_size > n_train:
            raise ConfigError(f"DPOConfig.batch_size {cfg.batch_size} exceeds the {n_train} comparisons of "
                              f"{cfg.train_data}")
        batches = process_batches(train, cfg.batch_size, mesh, seed=cfg.seed, buckets=buckets, pad_values=pads,
                                  where="DPOConfig.batch_size")
        return _Data(batches, len(batches), held_out, stats, k_max=k_max)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]]:
        max_len = length_buckets(run.cfg.buckets, run.cfg.max_len, run.model_config.max_len, "DPOConfig")[-1]
        return "dpo", {"batch_size": run.cfg.batch_size, "k_responses": run.data.k_max, "seq_len": max_len}

    def setup(self, run: StageRun) -> Setup:
        """Keys: ``split(PRNGKey(cfg.seed))`` -> (model init, train-state rng), as ``setup_training``."""
        cfg, mesh = run.cfg, run.mesh
        check_batch_fits_mesh(cfg.batch_size, mesh, "DPOConfig")
        init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        model, params = load_model(cfg.model, "lm", init_key)
        optimizer = run.optimizers["optimizer"]
        ref = jax.device_put(jax.tree.map(jnp.array, params), state_shardings(params, mesh))
        state = DPOState(init_train_state(params, cached_optimizer(optimizer), state_key, mesh), ref)
        step = jit_on_mesh(dpo_step_fn(DPOLoss.of(cfg), model, optimizer), mesh, state, donate=True,
                           process_local=True)
        return Setup(model, state, step)

    def evaluator(self, run: StageRun) -> Any:
        if run.data.held_out is None:
            return None
        cfg, model = run.cfg, run.setup.model

        def sums(state: DPOState, batch: Batch) -> dict[str, jax.Array]:
            loss, stats = _loss(DPOLoss.of(cfg), model, state.ref_params, state.policy.params, batch)
            n = jnp.sum(ranked_pairs(batch["valid"], batch["valid"], best_vs_rest=cfg.best_vs_rest)[2])
            n = n.astype(jnp.float32)
            return {"pairs": n, "loss": loss * n, "accuracy": stats["accuracy"] * n, "margin": stats["margin"] * n}

        evaluate = jit_on_mesh(sums, run.mesh, run.setup.state, returns_tree=False)
        batches = fixed_batches(run.data.held_out, cfg.batch_size, cfg.eval_batches)

        def eval_fn(state: DPOState) -> dict[str, float]:
            total = [jax.device_get(evaluate(state, b)) for b in batches]
            n = max(sum(float(t["pairs"]) for t in total), 1.0)
            return {k: sum(float(t[k]) for t in total) / n for k in ("loss", "accuracy", "margin")}

        return eval_fn

    def export(self, run: StageRun, state: DPOState) -> tuple[Transformer, Params, dict[str, Any]]:
        return run.setup.model, state.policy.params, {}


def train_dpo(cfg: DPOConfig) -> Path:
    """Run (or resume, or skip if complete) the DPO stage; returns ``workdir/model`` (the policy)."""
    return run_stage(DPOStage(), cfg)
