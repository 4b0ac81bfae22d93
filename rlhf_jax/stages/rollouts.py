"""What the RL stages (PPO, GRPO, RLOO) share around their iteration: prompt files as left-padded
arrays, the per-step batches of prompts and pretraining rows (``prompt_batches``), the
pretraining rows cut into one minibatch per update (``ptx_minibatches``), and the wall time of a
fused iteration (``TimedStep``), and the held-out prompts (``eval_prompt_arrays``).

``rl_cfg`` is the algorithm's config (``ppo.PPOConfig``, ``grpo.GRPOConfig``): its ``epochs``,
``num_minibatches`` and ``ptx_coef``; ``cfg`` the stage's config with ``train_data``,
``batch_size``, ``max_prompt_len``, ``truncation``, ``skip_bad``, ``seed`` and ``ptx_data``,
``ptx_batch_size``, ``ptx_seq_len``.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import (
    DataError,
    TruncationStats,
    ZipIterator,
    read_pretrain_texts,
    read_prompts,
    tokenize_prompts,
    tokenize_texts,
)
from rlhf_jax.data.agreement import data_shard, even_rows, process_batches
from rlhf_jax.stages.sources import naming, read_records
from rlhf_jax.tokenizer import Tokenizer


def prompt_arrays(path: str, tokenizer: Tokenizer, max_len: int, shard_index: int = 0,
                  shard_count: int = 1, *, truncation: str = "error", skip_bad: bool = False,
                  stats: TruncationStats | None = None) -> dict[str, np.ndarray]:
    """``{"tokens", "mask"}`` ``[n, max_len]`` left-padded prompts of a JSONL file (BOS added;
    its ``shard_index``-th of ``shard_count`` parts, ``data.read_jsonl``, skipping bad lines with
    ``skip_bad``; a longer prompt follows ``truncation``, ``data.truncation``; ``stats`` gets the
    counts)."""
    stats = TruncationStats() if stats is None else stats
    records = read_records(read_prompts, path, "prompts", stats, skip_bad=skip_bad, shard_index=shard_index,
                           shard_count=shard_count)
    with naming(path):
        return tokenize_prompts(records, tokenizer, max_len, truncation=truncation, stats=stats)


def eval_prompt_arrays(cfg: Any, tokenizer: Tokenizer,
                       stats: dict[str, TruncationStats]) -> dict[str, np.ndarray] | None:
    """The held-out prompts of ``cfg.eval_data`` (``prompt_arrays``, whole on every process), or
    None without one; ``stats["eval_data"]`` gets their cut, skipped and bad-line counts, which
    ``run_stage`` writes to ``metrics.jsonl`` with the training file's."""
    if cfg.eval_data is None:
        return None
    return prompt_arrays(cfg.eval_data, tokenizer, cfg.max_prompt_len, truncation=cfg.truncation,
                         skip_bad=cfg.skip_bad, stats=stats.setdefault("eval_data", TruncationStats()))


def prompt_batches(cfg: Any, rl_cfg: Any, tokenizer: Tokenizer, mesh: Any,
                  stats: dict[str, TruncationStats] | None = None) -> tuple[Any, int]:
    """``(batches, prompts)``: an RL stage's batches (``data.agreement.process_batches``: this process's part
    of the prompt and pretraining files) with ``prompt_*`` ``[batch_size, max_prompt_len]`` and
    ``ptx_*`` ``[epochs·num_minibatches·ptx_batch_size, ptx_seq_len]`` rows per global batch, and
    the number of training prompts over all processes; ``stats`` (``"train_data"``,
    ``"ptx_data"``) get the cut, skipped and bad-line counts."""
    shard = data_shard(mesh)
    stats = {} if stats is None else stats
    prompts = even_rows(prompt_arrays(cfg.train_data, tokenizer, cfg.max_prompt_len, **shard, truncation=cfg.truncation,
                                      skip_bad=cfg.skip_bad,
                                      stats=stats.setdefault("train_data", TruncationStats())))
    n_prompts = len(prompts["tokens"]) * shard["shard_count"]
    if cfg.batch_size > n_prompts:
        raise ConfigError(f"{type(cfg).__name__}.batch_size {cfg.batch_size} exceeds the {n_prompts} "
                          f"prompts of {cfg.train_data}")
    its = {"prompt": process_batches(prompts, cfg.batch_size, mesh, seed=cfg.seed, where=f"{type(cfg).__name__}.batch_size")}
    if rl_cfg.ptx_coef > 0:
        records = read_pretrain_texts(cfg.ptx_data, skip_bad=cfg.skip_bad, **shard)
        stats["ptx_data"] = TruncationStats(records=len(records), bad_lines=records.n_skipped)
        texts = [r.text for r in records]
        blocks = even_rows(tokenize_texts(texts, tokenizer, cfg.ptx_seq_len))
        per_iter = rl_cfg.epochs * rl_cfg.num_minibatches * cfg.ptx_batch_size
        n_blocks = len(blocks["tokens"]) * shard["shard_count"]
        if n_blocks < per_iter:
            raise DataError(f"{cfg.ptx_data}: {n_blocks} blocks of {cfg.ptx_seq_len} tokens; an "
                            f"iteration needs {per_iter} (epochs × num_minibatches × ptx_batch_size)")
        its["ptx"] = process_batches({"tokens": blocks["tokens"], "mask": blocks["mask"]}, per_iter, mesh,
                                     seed=cfg.seed + 1, where=f"{type(cfg).__name__} ptx rows per iteration")
    return ZipIterator(**its), n_prompts


def ptx_minibatches(rl_cfg: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array | None, jax.Array | None]:
    """Pretraining rows ``[E·M·ptx_b, L]`` -> ``[E·M, ptx_b, L]`` (one minibatch per update)."""
    if "ptx_tokens" not in batch:
        return None, None
    n = rl_cfg.epochs * rl_cfg.num_minibatches
    shape = (n, -1, batch["ptx_tokens"].shape[-1])
    return batch["ptx_tokens"].reshape(shape), batch["ptx_mask"].reshape(shape)


class TimedStep:
    """A fused iteration ``step(state, batch)``, logging its wall time as ``time/iteration``."""

    def __init__(self, step):
        self.step = step

    def __call__(self, state, batch):
        t0 = time.perf_counter()
        state, metrics = self.step(state, batch)
        jax.block_until_ready(metrics)
        return state, {**metrics, "time/iteration": jnp.float32(time.perf_counter() - t0)}
