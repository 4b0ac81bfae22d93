"""GRPO and RLOO (no value model; ``rlhf_jax.grpo``) as a stage of ``skeleton.run_stage``: the
commands ``rlhf-jax grpo`` (``GRPOStageConfig``) and ``rlhf-jax rloo`` (``RLOOStageConfig``).

The policy and the frozen reference start from ``cfg.model`` (the SFT model).  The reward is the
reward model in ``reward_model`` (``train_rm``'s export, normalised) or, with ``reward="gold"``,
the built-in world's gold labeler (``tasks.GoldReward``: the verifiable-reward setting).  Each
step is one compiled iteration on ``batch_size`` prompts × ``group_size`` samples (and
pretraining minibatches for the ptx term); held-out: the mean reward and KL of one sample per
prompt.  With ``grpo.ema_decay`` set and ``use_ema``, the evaluation and the exported ``model/``
use the EMA of the policy weights (InstructGPT App. C.4).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import TRUNCATIONS, TruncationStats
from rlhf_jax.errors import check
from rlhf_jax.grpo import (GRPOConfig, GRPOModels, GRPOState, RLOOConfig, evaluate_policy, grpo_iteration,
                           init_grpo_state)
from rlhf_jax.model import ModelConfig, Params, Transformer
from rlhf_jax.sharding import state_shardings
from rlhf_jax.stages.config import StageConfig, StageOptimizerConfig
from rlhf_jax.stages.rollouts import TimedStep, eval_prompt_arrays, prompt_batches, ptx_minibatches
from rlhf_jax.stages.skeleton import StageData, StageRun, run_stage
from rlhf_jax.stages.sources import load_model, load_reward_model, model_config, with_execution
from rlhf_jax.stages.steps import Setup, cached_optimizer, check_batch_fits_mesh, jit_on_mesh
from rlhf_jax.tasks.gold_reward import GoldReward
from rlhf_jax.train import OptimizerConfig

REWARDS = ("model", "gold")
FROZEN_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOStageConfig(StageConfig):
    """The GRPO stage (defaults: TRL 1.16.0's ``GRPOConfig``, ``grpo.GRPOConfig``).

    ``model``: the SFT model (policy init and reference).  ``reward``: ``"model"`` reads the
    reward model directory ``reward_model``; ``"gold"`` scores with the world's gold labeler.
    ``train_data``/``eval_data``: JSONL prompts ``{"prompt"}``; ``batch_size``: prompts per
    iteration (each sampled ``grpo.group_size`` times); ``epochs``: passes over the prompts.
    ``ptx_data``/``ptx_batch_size``/``ptx_seq_len``: the pretraining term, as for PPO (needed when
    ``grpo.ptx_coef > 0``).  ``frozen_dtype``: storage dtype of the reference and reward model.
    ``use_ema``: evaluate and export the EMA weights when ``grpo.ema_decay`` is set.
    ``truncation``/``skip_bad``: as for ``PPOStageConfig`` (prompts and pretraining text).
    """

    reward: Literal["model", "gold"] = "model"
    reward_model: str | None = None
    grpo: GRPOConfig = GRPOConfig()
    ptx_data: str | None = None
    ptx_batch_size: int = 8
    ptx_seq_len: int = 64
    batch_size: int = 64
    optimizer: StageOptimizerConfig = StageOptimizerConfig(lr=1e-6, schedule="constant")  # TRL: lr 1e-6
    max_prompt_len: int = 64
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    use_ema: bool = True
    truncation: Literal["error", "left", "right", "skip"] = "error"
    skip_bad: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.grpo
        check(self.reward in REWARDS, self, "reward", f"one of {REWARDS}")
        check((self.reward == "model") == bool(self.reward_model), self, "reward_model",
              "a reward-model directory when reward='model', and unset when reward='gold'")
        check(g.ptx_coef == 0 or self.ptx_data is not None, self, "ptx_data",
              "a pretraining JSONL file when grpo.ptx_coef > 0 (or set grpo.ptx_coef=0)")
        check(self.batch_size * g.group_size % g.num_minibatches == 0, self, "batch_size",
              f"such that batch_size × grpo.group_size ({g.group_size}) divides into grpo.num_minibatches "
              f"({g.num_minibatches})")
        for field in ("ptx_batch_size", "max_prompt_len"):
            check(getattr(self, field) >= 1, self, field, "an int >= 1")
        check(self.ptx_seq_len >= 2, self, "ptx_seq_len", "an int >= 2")
        check(self.frozen_dtype in FROZEN_DTYPES, self, "frozen_dtype", f"one of {FROZEN_DTYPES}")
        check(isinstance(self.use_ema, bool), self, "use_ema", "true or false")
        check(self.truncation in TRUNCATIONS, self, "truncation", f"one of {TRUNCATIONS}")
        check(isinstance(self.skip_bad, bool), self, "skip_bad", "true or false")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOStageConfig(GRPOStageConfig):
    """The RLOO stage: ``GRPOStageConfig`` with ``grpo`` defaulting to TRL 1.16.0's ``RLOOTrainer``
    (``grpo.RLOOConfig``)."""

    grpo: RLOOConfig = RLOOConfig()


@dataclasses.dataclass
class _Data(StageData):
    """``StageData`` plus ``grpo_cfg``: ``cfg.grpo`` with the tokenizer's EOS and pad ids
    (``held_out``: the held-out prompts, or None)."""

    grpo_cfg: GRPOConfig | None = None


@functools.lru_cache(maxsize=None)
def grpo_step_fn(models: GRPOModels, grpo_cfg: GRPOConfig):
    """``(state, batch) -> (state, metrics)``: one GRPO/RLOO iteration on a host batch with
    ``prompt_tokens``/``prompt_mask`` ``[b, P]`` and optional ``ptx_tokens``/``ptx_mask``.  One
    function per arguments, so that re-created stages (a resumed run) reuse the compiled step."""

    def step(state: GRPOState, batch: dict[str, jax.Array]):
        return grpo_iteration(models, grpo_cfg, state, batch["prompt_tokens"], batch["prompt_mask"],
                              *ptx_minibatches(grpo_cfg, batch))

    return step


def _exported(cfg: GRPOStageConfig, state: GRPOState) -> Params:
    """The weights evaluated and exported: the EMA when kept and ``cfg.use_ema``, else the policy."""
    return state.ema_params if cfg.use_ema and state.ema_params is not None else state.policy.params


class GRPOStage:
    """``run_stage``'s hooks for GRPO and RLOO."""

    name = "grpo"
    inputs = ("model.hf_dir", "reward_model", "train_data", "ptx_data", "tokenizer")

    def model_config(self, cfg: GRPOStageConfig) -> ModelConfig:
        return model_config(cfg.model, "lm")

    def prepare(self, run: StageRun) -> _Data:
        cfg, tokenizer = run.cfg, run.tokenizer
        gen = dataclasses.replace(cfg.grpo.generation, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                  stop_ids={*cfg.grpo.generation.stop_ids, *tokenizer.stop_ids})
        grpo_cfg = dataclasses.replace(cfg.grpo, generation=gen)
        if cfg.max_prompt_len + gen.max_new_tokens > run.model_config.max_len:
            raise ConfigError(f"{type(cfg).__name__}.max_prompt_len {cfg.max_prompt_len} + grpo.generation."
                              f"max_new_tokens {gen.max_new_tokens} exceeds the model's context "
                              f"{run.model_config.max_len}")
        stats: dict[str, TruncationStats] = {}
        batches, n_prompts = prompt_batches(cfg, grpo_cfg, tokenizer, run.mesh, stats)
        held_out = eval_prompt_arrays(cfg, tokenizer, stats)
        return _Data(batches, n_prompts // cfg.batch_size, held_out, stats, grpo_cfg=grpo_cfg)

    def optimizers(self, run: StageRun) -> dict[str, OptimizerConfig]:
        grpo_cfg = run.data.grpo_cfg
        return {"optimizer": run.cfg.optimizer.resolve(run.steps * grpo_cfg.epochs * grpo_cfg.num_minibatches)}

    def setup(self, run: StageRun) -> Setup:
        """Keys: ``split(PRNGKey(cfg.seed))`` -> (policy init, state rng)."""
        cfg, mesh, grpo_cfg = run.cfg, run.mesh, run.data.grpo_cfg
        check_batch_fits_mesh(cfg.batch_size, mesh, type(cfg).__name__)
        key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        policy, params = load_model(cfg.model, "lm", key)
        frozen = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, cfg.frozen_dtype), tree)  # noqa: E731
        if cfg.reward == "gold":
            reward, reward_params, gain, bias = GoldReward(run.tokenizer.decode, run.tokenizer.eos_id,
                                                           cfg.max_prompt_len), None, 1.0, 0.0
        else:
            reward, reward_params, gain, bias = load_reward_model(cfg.reward_model, dtype=cfg.model.dtype)
            reward, reward_params = Transformer(with_execution(cfg.model, reward.config)), frozen(reward_params)
        models = GRPOModels(policy, reward)
        state = init_grpo_state(grpo_cfg, params, reward_params, cached_optimizer(run.optimizers["optimizer"]),
                                state_key, ref_params=frozen(params), reward_gain=gain, reward_bias=bias)
        state = jax.device_put(state, state_shardings(state, mesh))
        step = jit_on_mesh(grpo_step_fn(models, grpo_cfg), mesh, state, donate=True, process_local=True)
        return Setup(models, state, TimedStep(step))

    def evaluator(self, run: StageRun) -> Any:
        cfg, models, grpo_cfg, prompts = run.cfg, run.setup.model, run.data.grpo_cfg, run.data.held_out
        if prompts is None:
            return None
        n = len(prompts["tokens"]) // cfg.batch_size * cfg.batch_size
        if n == 0:
            raise ConfigError(f"{type(cfg).__name__}.eval_data: {len(prompts['tokens'])} prompts; need at least "
                              f"batch_size={cfg.batch_size}")
        key = jax.random.PRNGKey(cfg.seed)  # one key for every evaluation: comparable numbers

        def evaluate(state: GRPOState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
            return evaluate_policy(models, grpo_cfg, state, batch["tokens"], batch["mask"], key,
                                   use_ema=cfg.use_ema)

        run_eval = jit_on_mesh(evaluate, run.mesh, run.setup.state, returns_tree=False)
        batches = [{k: v[s:s + cfg.batch_size] for k, v in prompts.items()} for s in range(0, n, cfg.batch_size)]

        def eval_fn(state: GRPOState) -> dict[str, float]:
            outs = [jax.device_get(run_eval(state, b)) for b in batches]
            return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}

        return eval_fn

    def tokens_in_batch(self, run: StageRun, batch: dict[str, np.ndarray]) -> int:
        g = run.data.grpo_cfg
        return g.group_size * (int(batch["prompt_mask"].sum()) + run.cfg.batch_size * g.generation.max_new_tokens)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]]:
        cfg, g = run.cfg, run.data.grpo_cfg
        return "grpo", {"batch_size": cfg.batch_size, "group_size": g.group_size, "prompt_len": cfg.max_prompt_len,
                        "max_new_tokens": g.generation.max_new_tokens, "ppo_minibatches": g.num_minibatches,
                        "ptx_batch_size": cfg.ptx_batch_size if g.ptx_coef > 0 else 0, "seq_len": cfg.ptx_seq_len,
                        "frozen_dtype": cfg.frozen_dtype, "reward_model": cfg.reward == "model",
                        "ema": g.ema_decay is not None}

    def export(self, run: StageRun, state: GRPOState) -> tuple[Transformer, Params, dict[str, Any]]:
        return run.setup.model.policy, _exported(run.cfg, state), {}


class RLOOStage(GRPOStage):
    """The same hooks, named ``"rloo"`` in the stage record."""

    name = "rloo"


def train_grpo(cfg: GRPOStageConfig) -> Path:
    """Run (or resume, or skip if complete) the GRPO stage; returns ``workdir/model``."""
    return run_stage(GRPOStage(), cfg)


def train_rloo(cfg: RLOOStageConfig) -> Path:
    """Run (or resume, or skip if complete) the RLOO stage; returns ``workdir/model``."""
    return run_stage(RLOOStage(), cfg)
