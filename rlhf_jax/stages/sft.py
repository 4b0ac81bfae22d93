"""Stage 1: supervised fine-tuning on labeler demonstrations (InstructGPT §3.5, App. C.1).

Next-token cross entropy on ``[BOS] prompt response [EOS]``, by default on the response tokens
only (IG is silent on prompt masking; ``prompt_masking=False`` trains on every token).
``train_sft(cfg)`` tokenises the demonstrations, runs ``run_loop`` (resumable) and exports the
model to ``workdir/model`` for the reward-model and PPO stages.

Differences from the paper: our transformer has no dropout (IG C.1 uses residual dropout 0.2),
and IG picks the final SFT checkpoint by RM score on a validation set, not by validation loss;
here the last step is exported and the held-out loss is logged.
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
    pack_sequences,
    read_demonstrations,
    tokenize_demonstrations,
    tokenize_prompts,
)
from rlhf_jax.errors import check
from rlhf_jax.generation import GenerateConfig, generate, next_token_nll
from rlhf_jax.losses import token_logprobs
from rlhf_jax.model import Params, Transformer, forward
from rlhf_jax.data.messages import demonstration_prompt
from rlhf_jax.data.agreement import data_shard, even_rows, fixed_batches, process_batches
from rlhf_jax.stages.config import StageConfig, StageOptimizerConfig, length_buckets
from rlhf_jax.stages.steps import Batch, StepFn, jit_on_mesh
from rlhf_jax.stages.sources import naming, read_records
from rlhf_jax.stages.skeleton import StageData, StageRun, SupervisedStage, make_step_fn, run_stage
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import MetricsWriter, OptimizerConfig, TrainState


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig(StageConfig):
    """Supervised fine-tuning.  Defaults are InstructGPT's (App. C.1) for its 1.3B/6B models.

    ``train_data``/``eval_data``: JSONL demonstrations ``{"prompt", "response"}``.
    ``max_len``: longest sequence, BOS and EOS included (None: the model's context); sequences
    are padded to the smallest of ``buckets`` (capped at ``max_len``) that holds a batch.
    ``truncation``: a demonstration longer than ``max_len`` raises ("error"), loses its oldest
    prompt tokens ("left"; skipped if the response alone is too long), its end ("right") or is
    skipped ("skip") (``data.truncation``); ``skip_bad``: skip (and count) malformed lines
    instead of stopping at the first.  Cut and skipped counts go to the log and ``metrics.jsonl``.
    ``packing``: several demonstrations per row of ``max_len`` tokens, attention kept within each.
    ``sample_prompts``: greedy completions of that many held-out prompts are written to
    ``samples.jsonl`` at every evaluation (0: none).
    """

    batch_size: int = 32  # IG App. C.1: 32 for 1.3B and 6B (8 for 175B)
    epochs: float = 16.0  # IG §3.5, App. C.1
    # IG App. C.1: lr 9.65e-6 (1.3B and 6B models), cosine decay to 10% of it, no warmup.  A partial
    # ``optimizer`` table or ``--set optimizer.lr=...`` keeps the rest (``configs.from_dict``).
    optimizer: StageOptimizerConfig = StageOptimizerConfig(lr=9.65e-6, schedule="cosine", final_lr_fraction=0.1)
    prompt_masking: bool = True  # IG silent; loss on the response (and EOS) only
    packing: bool = False
    max_len: int | None = None
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    truncation: Literal["error", "left", "right", "skip"] = "error"
    skip_bad: bool = False
    sample_prompts: int = 4
    sample_max_new_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()

        check(self.max_len is None or self.max_len >= 2, self, "max_len", "None or an int >= 2")
        check(self.buckets and all(isinstance(b, int) and b >= 2 for b in self.buckets),
              self, "buckets", "a non-empty list of ints >= 2")
        check(self.truncation in TRUNCATIONS, self, "truncation", f"one of {TRUNCATIONS}")
        check(isinstance(self.skip_bad, bool), self, "skip_bad", "true or false")
        check(self.sample_prompts >= 0, self, "sample_prompts", "an int >= 0")
        check(self.sample_max_new_tokens >= 1, self, "sample_max_new_tokens", "an int >= 1")


# ------------------------------------------------------------------------------------ the step


def sft_batch_loss(model: Transformer, params: Params, batch: dict[str, jax.Array]) -> jax.Array:
    """``losses.sft_loss`` of a batch: ``tokens``, ``mask``, ``loss_mask`` ``[b, T]`` int
    (``loss_mask`` marks targets, ``data.batching`` conventions), plus ``positions`` and
    ``segment_ids`` ``[b, T]`` for packed rows.  A scalar: the mean next-token NLL over all
    targets of the batch.  Rows without ``segment_ids`` are right padded (``data.batching``'s
    SFT rows), which the cuDNN attention uses (``forward``'s ``right_padded``)."""
    packed = "segment_ids" in batch
    return next_token_nll(model, params, batch["tokens"], batch["mask"], batch["loss_mask"],
                          positions=batch.get("positions"), segment_ids=batch.get("segment_ids"),
                          right_padded=not packed)


def _sft_loss(model: Transformer, params: Params, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(sft_batch_loss, {"tokens": targets counted})``: the loss ``make_step_fn`` takes."""
    return sft_batch_loss(model, params, batch), {"tokens": jnp.sum(batch["loss_mask"][:, 1:] != 0)}


@functools.lru_cache(maxsize=None)
def sft_step_fn(model: Transformer, optimizer: OptimizerConfig | None = None) -> StepFn:
    """The pure SFT update ``(state, batch) -> (state, metrics)`` (``skeleton.make_step_fn``;
    jit it, or ``jit_on_mesh``).

    ``batch``: as for ``sft_batch_loss``, whose gradient the update applies.

    Metrics: ``loss``, ``tokens`` (targets counted), ``grad_norm`` (global L2 norm of the
    gradient), and ``lr`` (the rate of this update) when ``optimizer`` is given.
    """
    return make_step_fn(functools.partial(_sft_loss, model), optimizer)


def sft_train_step(model: Transformer, optimizer: OptimizerConfig | None = None) -> StepFn:
    """``jax.jit(sft_step_fn(model, optimizer))``: the SFT update for notebooks and tests;
    placement follows the inputs (see ``common.jit_on_mesh`` for explicit mesh shardings)."""
    return jax.jit(sft_step_fn(model, optimizer))


@functools.lru_cache(maxsize=None)
def sft_eval_fn(model: Transformer) -> Any:
    """``(params, batch) -> {"nll_sum", "tokens"}``: summed next-token NLL over the batch's targets
    and their count, so that ``nll_sum / tokens`` over a whole held-out set is its ``sft_loss``."""

    def evaluate(params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logits = forward(model, params, batch["tokens"], batch["mask"]).logits
        targets = batch["loss_mask"][:, 1:] != 0
        nll = -jnp.where(targets, token_logprobs(logits, batch["tokens"]), 0.0)
        return {"nll_sum": jnp.sum(nll), "tokens": jnp.sum(targets)}

    return evaluate


# ------------------------------------------------------------------------------------ the data


def demonstration_arrays(
    path: str | Path,
    tokenizer: Tokenizer,
    buckets: tuple[int, ...],
    *,
    prompt_masking: bool = True,
    truncation: str = "error",
    skip_bad: bool = False,
    stats: TruncationStats | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> tuple[list, dict[str, np.ndarray]]:
    """``(records, arrays)`` of a demonstrations file (the ``shard_index``-th of ``shard_count``
    parts, ``data.read_jsonl``, skipping bad lines with ``skip_bad``): ``tokens``, ``mask``,
    ``loss_mask`` ``[n, L]`` int32 (``data.tokenize_demonstrations`` with ``truncation``;
    ``stats`` gets the counts); errors name the file."""
    stats = TruncationStats() if stats is None else stats
    records = read_records(read_demonstrations, path, "demonstrations", stats, skip_bad=skip_bad,
                           shard_index=shard_index, shard_count=shard_count)
    with naming(path):
        arrays = tokenize_demonstrations(records, tokenizer, buckets, train_on_prompt=not prompt_masking,
                                         truncation=truncation, stats=stats)
    return records, arrays


def pack(arrays: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """``data.pack_sequences`` plus: the first token of every document is never a target, so no
    document is predicted from the end of the one before it (packed loss == unpacked loss)."""
    packed = pack_sequences(arrays["tokens"], arrays["mask"], arrays["loss_mask"], seq_len, pad_id=pad_id)
    packed["loss_mask"] = np.where(packed["positions"] == 0, 0, packed["loss_mask"]).astype(np.int32)
    return packed


def train_batches(cfg: SFTConfig, tokenizer: Tokenizer, buckets: tuple[int, ...], mesh: Any,
                  stats: TruncationStats | None = None) -> Any:
    """The stage's training batches (``common.process_batches``): this process's part of
    ``cfg.train_data`` tokenised (and packed), ``cfg.batch_size`` rows per global batch; ``stats``
    gets the cut and skipped counts."""
    _, train = demonstration_arrays(cfg.train_data, tokenizer, buckets, prompt_masking=cfg.prompt_masking,
                                    truncation=cfg.truncation, skip_bad=cfg.skip_bad, stats=stats,
                                    **data_shard(mesh))
    if cfg.packing:
        train = pack(train, buckets[-1], tokenizer.pad_id)
    pads = {"tokens": tokenizer.pad_id}
    train = even_rows(train, pads)
    n_rows = len(train["tokens"]) * data_shard(mesh)["shard_count"]
    if cfg.batch_size > n_rows:
        raise ConfigError(f"SFTConfig.batch_size {cfg.batch_size} exceeds the {n_rows} training rows "
                          f"of {cfg.train_data}")
    return process_batches(train, cfg.batch_size, mesh, seed=cfg.seed, buckets=buckets, pad_values=pads,
                           where="SFTConfig.batch_size")


# --------------------------------------------------------------------------------- the stage


class SFTStage(SupervisedStage):
    """``run_stage``'s hooks for SFT: demonstration batches (packed or bucketed), the response
    NLL, and the held-out loss / perplexity with greedy samples."""

    name = "sft"
    inputs = ("model.hf_dir", "train_data", "tokenizer")
    head = "lm"

    def loss(self, cfg: SFTConfig, model: Transformer, params: Params, batch: Batch) -> tuple[jax.Array, dict]:
        return _sft_loss(model, params, batch)

    def step_fn(self, cfg: SFTConfig, model: Transformer, optimizer: OptimizerConfig) -> StepFn:
        return sft_step_fn(model, optimizer)

    def prepare(self, run: StageRun) -> StageData:
        cfg = run.cfg
        buckets = length_buckets(cfg.buckets, cfg.max_len, run.model_config.max_len, "SFTConfig")
        stats = {"train_data": TruncationStats()}
        batches = train_batches(cfg, run.tokenizer, buckets, run.mesh, stats["train_data"])
        held_out = None
        if cfg.eval_data is not None:
            stats["eval_data"] = TruncationStats()
            held_out = demonstration_arrays(cfg.eval_data, run.tokenizer, buckets, prompt_masking=cfg.prompt_masking,
                                            truncation=cfg.truncation, skip_bad=cfg.skip_bad,
                                            stats=stats["eval_data"])
        return StageData(batches, len(batches), held_out, stats)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]]:
        max_len = length_buckets(run.cfg.buckets, run.cfg.max_len, run.model_config.max_len, "SFTConfig")[-1]
        return "sft", {"batch_size": run.cfg.batch_size, "seq_len": max_len}

    def evaluator(self, run: StageRun) -> Any:
        if run.data.held_out is None:
            return None
        return _make_eval(run.cfg, run.setup.model, run.tokenizer, run.setup.state, run.mesh, *run.data.held_out,
                          run.samples)


def train_sft(cfg: SFTConfig) -> Path:
    """Run (or resume, or skip if complete) the SFT stage (``skeleton.run_stage``); returns
    ``workdir/model``.

    Reads ``cfg.train_data`` (and ``eval_data``), builds or loads the model, trains for
    ``loop.total_steps`` or ``epochs``, evaluates held-out loss / perplexity (and greedy samples)
    every ``loop.eval_every`` steps and at the end, and exports the final model.
    """
    return run_stage(SFTStage(), cfg)


def _make_eval(cfg: SFTConfig, model: Transformer, tokenizer: Tokenizer, state: TrainState, mesh: Any,
               records: list, held_out: dict[str, np.ndarray], samples: MetricsWriter) -> Any:
    """``state -> {"loss", "perplexity"}`` over the held-out set, writing greedy samples."""
    evaluate = jit_on_mesh(sft_eval_fn(model), mesh, state.params, returns_tree=False)
    batches = fixed_batches(held_out, cfg.batch_size, cfg.eval_batches)
    sampler = _greedy_sampler(cfg, model, tokenizer, records[: cfg.sample_prompts])

    def eval_fn(state: TrainState) -> dict[str, float]:
        sums = [evaluate(state.params, batch) for batch in batches]
        nll = sum(float(s["nll_sum"]) for s in sums)
        count = sum(int(s["tokens"]) for s in sums)
        loss = nll / max(count, 1)
        if sampler is not None:
            step = int(state.step)
            for i, text in enumerate(sampler(state.params)):
                samples.write_text(step, f"sample_{i}", text)
        return {"loss": loss, "perplexity": math.exp(loss)}

    return eval_fn


def _greedy_sampler(cfg: SFTConfig, model: Transformer, tokenizer: Tokenizer, records: list) -> Any:
    """``params -> [prompt + greedy response]`` for ``records`` (None when there is nothing to
    sample or no room in the context)."""
    if not records:
        return None
    asked = [demonstration_prompt(tokenizer, r) for r in records]  # chat records too (data.messages)
    prompts = tokenize_prompts([p for p, _ in asked], tokenizer, model.config.max_len, truncation="left")
    prompt_len = int(prompts["mask"].sum(axis=1).max())
    new_tokens = min(cfg.sample_max_new_tokens, model.config.max_len - prompt_len)
    if new_tokens < 1:
        return None
    prompts = {k: v[:, -prompt_len:] for k, v in prompts.items()}
    gen = GenerateConfig(max_new_tokens=new_tokens, greedy=True, eos_id=tokenizer.eos_id,
                         stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)

    def sample(params: Params) -> list[str]:
        key = jax.random.PRNGKey(0)  # unused: greedy decoding draws nothing
        rollout = generate(model, params, prompts["tokens"], prompts["mask"], key, gen)
        response, mask = np.asarray(rollout.response), np.asarray(rollout.response_mask)
        return [text + tokenizer.decode(response[i][mask[i] != 0]) for i, (_, text) in enumerate(asked)]

    return sample
