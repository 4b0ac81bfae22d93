"""Stage 3: PPO-ptx (InstructGPT §3.5, eq. 2, App. C.4) — the driver around ``rlhf_jax.ppo``.

Loads the SFT model (policy *and* frozen reference π_SFT), the reward model with its
normalisation, and the value model (initialised from the reward model, App. C.4); feeds prompt
batches and pretraining minibatches; runs ``run_loop`` (resumable, NaN-guarded checkpoints) with
one compiled PPO iteration per step; evaluates the mean reward and KL on held-out prompts; logs
samples; exports the final policy to ``workdir/model``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import TRUNCATIONS, TruncationStats
from rlhf_jax.errors import check
from rlhf_jax.model import ModelConfig, Transformer
from rlhf_jax.ppo import (
    PPOConfig,
    PPOModels,
    PPOState,
    experience_phase,
    finish_iteration,
    init_ppo_state,
    ppo_iteration,
    rollout_phase,
)
from rlhf_jax.sharding import place_batch, state_shardings
from rlhf_jax.stages.config import StageConfig, StageOptimizerConfig
from rlhf_jax.stages.sources import load_model, load_reward_model, model_config, with_execution
from rlhf_jax.stages.steps import Setup, cached_optimizer, check_batch_fits_mesh, jit_on_mesh
from rlhf_jax.tasks.gold_reward import GoldReward
from rlhf_jax.stages.rollouts import TimedStep, eval_prompt_arrays, prompt_batches, ptx_minibatches
from rlhf_jax.stages.skeleton import StageData, StageRun, run_stage
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import MetricsWriter, OptimizerConfig


FROZEN_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOStageConfig(StageConfig):
    """The PPO-ptx stage.

    ``model``: the SFT model (policy init and reference). ``reward_model``: the reward model
    directory (``train_rm``'s export, with ``reward_normalization.json``). ``value_model``: the
    value function's init (default: the reward model, InstructGPT App. C.4).
    ``train_data``/``eval_data``: JSONL prompts ``{"prompt"}``. ``ptx_data``: JSONL pretraining
    text ``{"text"}`` for the γ term (required when ``ppo.ptx_coef > 0``).
    ``batch_size``: rollouts per iteration (IG C.4: 512); ``epochs``: passes over the prompts
    (sets the number of iterations unless ``loop.total_steps`` is given).
    ``ptx_batch_size``: pretraining sequences per PPO minibatch (IG C.4 / E.11: 8× the RL
    episodes of a minibatch); ``ptx_seq_len``: their length.
    ``phase_timing``: run rollout / experience / update as three compiled programs to log their
    wall time (``time/generate``, ``time/experience``, ``time/update``); off runs the single fused
    program and logs ``time/iteration`` only.
    ``frozen_dtype``: storage dtype of the frozen reference policy and reward model (``"float32"``
    or ``"bfloat16"``); ``bfloat16`` halves their memory (``rlhf-jax plan`` counts them at this
    dtype) at the cost of rounding their weights to 8 mantissa bits (the reference log-probs and
    rewards move by bfloat16 rounding; compute still runs in ``model.dtype``).
    ``truncation``: a prompt longer than ``max_prompt_len`` (BOS included) raises ("error"), keeps
    its end ("left": the oldest tokens go), its start ("right") or is skipped ("skip")
    (``data.truncation``); ``skip_bad``: skip (and count) malformed lines of the prompt and
    pretraining files.  Cut and skipped counts go to the log and ``metrics.jsonl``.
    ``reward``: ``"model"`` scores with ``reward_model``; ``"gold"`` with the built-in world's gold
    labeler (``tasks.GoldReward``, the verifiable-reward setting; ``reward_model`` then only
    initialises the value model).  ``use_ema``: with ``ppo.ema_decay`` set, the held-out evaluation
    and the exported ``model/`` use the EMA of the policy weights (InstructGPT App. C.4).
    """

    reward_model: str
    reward: Literal["model", "gold"] = "model"
    use_ema: bool = True
    value_model: str | None = None
    ppo: PPOConfig = PPOConfig()
    ptx_data: str | None = None
    ptx_batch_size: int = 8
    ptx_seq_len: int = 64
    batch_size: int = 512  # IG C.4: 512 episodes per iteration
    epochs: float = 1.0
    # IG C.4: policy lr constant after 10 warm-up iterations starting from 0.1x (1.3B: 9.65e-6).
    optimizer: StageOptimizerConfig = StageOptimizerConfig(lr=9.65e-6, warmup_steps=10, schedule="constant")
    value_optimizer: StageOptimizerConfig = StageOptimizerConfig(lr=9e-6, schedule="constant")  # IG C.4
    max_prompt_len: int = 64
    truncation: Literal["error", "left", "right", "skip"] = "error"
    skip_bad: bool = False
    eval_samples: int = 4
    phase_timing: bool = False
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()

        check(isinstance(self.reward_model, str) and self.reward_model,
              self, "reward_model", "a reward-model directory")
        check(self.ppo.ptx_coef <= 0 or self.ptx_data is not None,
              self, "ptx_data", "a pretraining JSONL file when ppo.ptx_coef > 0 (or set ppo.ptx_coef=0)")
        check(self.batch_size % self.ppo.num_minibatches == 0,
              self, "batch_size", f"a multiple of ppo.num_minibatches={self.ppo.num_minibatches}")
        for field in ("ptx_batch_size", "max_prompt_len"):
            check(getattr(self, field) >= 1, self, field, "an int >= 1")
        check(self.ptx_seq_len >= 2, self, "ptx_seq_len", "an int >= 2")
        check(self.eval_samples >= 0, self, "eval_samples", "an int >= 0")
        check(self.frozen_dtype in FROZEN_DTYPES, self, "frozen_dtype", f"one of {FROZEN_DTYPES}")
        check(self.truncation in TRUNCATIONS, self, "truncation", f"one of {TRUNCATIONS}")
        check(isinstance(self.skip_bad, bool), self, "skip_bad", "true or false")
        check(self.reward in ("model", "gold"), self, "reward", "'model' or 'gold'")
        check(isinstance(self.use_ema, bool), self, "use_ema", "true or false")


def _generation(cfg: PPOStageConfig, tokenizer: Tokenizer) -> PPOConfig:
    """``cfg.ppo`` with the tokenizer's EOS, stop ids (``Tokenizer.stop_ids``: the chat
    template's end of turn too) and pad id in its generation config."""
    gen = dataclasses.replace(cfg.ppo.generation, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                              stop_ids={*cfg.ppo.generation.stop_ids, *tokenizer.stop_ids})
    return dataclasses.replace(cfg.ppo, generation=gen)


def ppo_step_fn(models: PPOModels, ppo_cfg: PPOConfig):
    """``(state, batch) -> (state, metrics)``: one fused PPO-ptx iteration on a host batch with
    ``prompt_tokens``/``prompt_mask`` ``[b, P]`` and optional ``ptx_tokens``/``ptx_mask``."""

    def step(state: PPOState, batch: dict[str, jax.Array]):
        return ppo_iteration(models, ppo_cfg, state, batch["prompt_tokens"], batch["prompt_mask"], *ptx_minibatches(ppo_cfg, batch))

    return step


class _PhaseTimedStep:
    """The same iteration as ``ppo_step_fn`` run as three compiled programs, timing each."""

    def __init__(self, models: PPOModels, ppo_cfg: PPOConfig, mesh: Any):
        self.mesh = mesh
        self.rollout = jax.jit(lambda s, ids, m, k: rollout_phase(models, ppo_cfg, s, ids, m, k))
        self.experience = jax.jit(lambda s, r: experience_phase(models, ppo_cfg, s, r))
        self.update = jax.jit(functools.partial(finish_iteration, models, ppo_cfg), static_argnums=6)
        self.ppo_cfg = ppo_cfg

    def __call__(self, state: PPOState, batch: dict[str, np.ndarray]):
        batch = place_batch(dict(batch), self.mesh, process_local=True)
        rng, k_roll, k_perm = jax.random.split(state.rng, 3)  # as in ppo_iteration
        t0 = time.perf_counter()
        rollout = jax.block_until_ready(self.rollout(state, batch["prompt_tokens"], batch["prompt_mask"], k_roll))
        t1 = time.perf_counter()
        exp = jax.block_until_ready(self.experience(state, rollout))
        t2 = time.perf_counter()
        ptx, ptx_mask = ptx_minibatches(self.ppo_cfg, batch)
        state, metrics = self.update(state, exp, ptx, ptx_mask, k_perm, rng, batch["prompt_tokens"].shape[0])
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        timing = {"time/generate": t1 - t0, "time/experience": t2 - t1, "time/update": t3 - t2}
        return state, {**metrics, **{k: jnp.float32(v) for k, v in timing.items()}}


def load_ppo_models(cfg: PPOStageConfig, key: jax.Array,
                    tokenizer: Tokenizer | None = None) -> tuple[PPOModels, dict[str, Any]]:
    """``(models, parts)``: the static models and the initial parameters
    (``policy``, ``value``, ``reward``, ``gain``, ``bias``); ``tokenizer`` decodes for the gold
    labeler (``cfg.reward == "gold"``)."""
    k_policy, k_value = jax.random.split(key)
    policy, policy_params = load_model(cfg.model, "lm", k_policy)
    if cfg.reward == "gold":
        reward, reward_params = GoldReward(tokenizer.decode, tokenizer.eos_id, cfg.max_prompt_len), {}
        gain, bias = 1.0, 0.0
    else:
        reward, reward_params, gain, bias = load_reward_model(cfg.reward_model, dtype=cfg.model.dtype)
        reward = Transformer(with_execution(cfg.model, reward.config))  # the policy's scan / remat / attention
    value_source = dataclasses.replace(cfg.model, hf_dir=cfg.value_model or cfg.reward_model, init=None)
    value, value_params = load_model(value_source, "scalar", k_value)
    parts = {"policy": policy_params, "value": value_params, "reward": reward_params, "gain": gain, "bias": bias}
    return PPOModels(policy, value, reward), parts


def initial_state(cfg: PPOStageConfig, ppo_cfg: PPOConfig, parts: dict[str, Any], policy_tx: Any, value_tx: Any,
                  key: jax.Array) -> PPOState:
    """``init_ppo_state`` from ``load_ppo_models``'s ``parts``, the frozen reference (π_SFT, a copy
    of the policy) and reward model stored in ``cfg.frozen_dtype``."""
    frozen = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, cfg.frozen_dtype), tree)  # noqa: E731
    return init_ppo_state(ppo_cfg, parts["policy"], parts["value"], frozen(parts["reward"]), policy_tx, value_tx,
                          key, ref_params=frozen(parts["policy"]), reward_gain=parts["gain"],
                          reward_bias=parts["bias"])


@dataclasses.dataclass
class _Data(StageData):
    """The PPO stage's ``StageData``: ``held_out`` the held-out prompts (or None), ``ppo_cfg``
    with the tokenizer's ids."""

    ppo_cfg: PPOConfig | None = None


class PPOStage:
    """``run_stage``'s hooks for PPO-ptx: prompt and pretraining batches, the policy, value and
    reward models from the earlier stages' exports, one PPO iteration per step (fused, or three
    timed programs), held-out reward and KL, and the policy exported."""

    name = "ppo"
    inputs = ("model.hf_dir", "reward_model", "value_model", "train_data", "ptx_data", "tokenizer")

    def model_config(self, cfg: PPOStageConfig) -> ModelConfig:
        return model_config(cfg.model, "lm")

    def prepare(self, run: StageRun) -> _Data:
        cfg, config = run.cfg, run.model_config
        ppo_cfg = _generation(cfg, run.tokenizer)
        if cfg.max_prompt_len + ppo_cfg.generation.max_new_tokens > config.max_len:
            raise ConfigError(f"PPOStageConfig.max_prompt_len {cfg.max_prompt_len} + ppo.generation.max_new_tokens "
                              f"{ppo_cfg.generation.max_new_tokens} exceeds the model's context {config.max_len}")
        stats: dict[str, TruncationStats] = {}
        batches, n_prompts = prompt_batches(cfg, ppo_cfg, run.tokenizer, run.mesh, stats)
        held_out = eval_prompt_arrays(cfg, run.tokenizer, stats)
        return _Data(batches, n_prompts // cfg.batch_size, held_out, stats, ppo_cfg=ppo_cfg)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]]:
        cfg, ppo_cfg = run.cfg, run.data.ppo_cfg
        return "ppo", {"batch_size": cfg.batch_size, "prompt_len": cfg.max_prompt_len,
                       "max_new_tokens": ppo_cfg.generation.max_new_tokens, "ppo_minibatches": ppo_cfg.num_minibatches,
                       "ptx_batch_size": cfg.ptx_batch_size if ppo_cfg.ptx_coef > 0 else 0,
                       "seq_len": cfg.ptx_seq_len, "frozen_dtype": cfg.frozen_dtype,
                       "reward_model": cfg.reward == "model", "ema": ppo_cfg.ema_decay is not None}

    def optimizers(self, run: StageRun) -> dict[str, OptimizerConfig]:
        ppo_cfg = run.data.ppo_cfg
        updates = run.steps * ppo_cfg.epochs * ppo_cfg.num_minibatches  # optimiser steps per iteration
        return {"optimizer": run.cfg.optimizer.resolve(updates),
                "value_optimizer": run.cfg.value_optimizer.resolve(updates)}

    def setup(self, run: StageRun) -> Setup:
        """Keys: ``split(PRNGKey(cfg.seed))`` -> (models: policy, value heads; state rng)."""
        cfg, mesh, ppo_cfg = run.cfg, run.mesh, run.data.ppo_cfg
        check_batch_fits_mesh(cfg.batch_size, mesh, "PPOStageConfig")
        key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
        models, parts = load_ppo_models(cfg, key, run.tokenizer)
        policy_tx = cached_optimizer(run.optimizers["optimizer"])
        value_tx = cached_optimizer(run.optimizers["value_optimizer"])
        state = initial_state(cfg, ppo_cfg, parts, policy_tx, value_tx, state_key)
        state = jax.device_put(state, state_shardings(state, mesh))
        if cfg.phase_timing:
            train_step = _PhaseTimedStep(models, ppo_cfg, mesh)
        else:
            train_step = TimedStep(jit_on_mesh(ppo_step_fn(models, ppo_cfg), mesh, state, donate=True,
                                                process_local=True))
        return Setup(models, state, train_step)

    def evaluator(self, run: StageRun) -> Any:
        if run.data.held_out is None:
            return None
        return _make_eval(run.cfg, run.setup.model, run.data.ppo_cfg, run.tokenizer, run.setup.state, run.mesh,
                          run.data.held_out, run.samples)

    def tokens_in_batch(self, run: StageRun, batch: dict[str, np.ndarray]) -> int:
        return int(batch["prompt_mask"].sum()) + run.cfg.batch_size * run.data.ppo_cfg.generation.max_new_tokens

    def export(self, run: StageRun, state: PPOState) -> tuple[Transformer, Any, dict[str, Any]]:
        return run.setup.model.policy, _evaluated(run.cfg, state).policy.params, {}


def _evaluated(cfg: PPOStageConfig, state: PPOState) -> PPOState:
    """``state`` with the EMA weights as the policy's when they are kept and ``cfg.use_ema``."""
    if cfg.use_ema and state.ema_params is not None:
        return state.replace(policy=state.policy.replace(params=state.ema_params))
    return state


def train_ppo(cfg: PPOStageConfig) -> Path:
    """Run (or resume, or skip if complete) the PPO-ptx stage (``skeleton.run_stage``); returns
    ``workdir/model`` (the final policy in Hugging Face format)."""
    return run_stage(PPOStage(), cfg)


def _make_eval(cfg: PPOStageConfig, models: PPOModels, ppo_cfg: PPOConfig, tokenizer: Tokenizer, state: PPOState,
               mesh: Any, prompts: dict[str, np.ndarray], samples: MetricsWriter) -> Any:
    """``state -> {"score", "kl", "response_length", "eos_rate"}`` on held-out prompts (sampled
    at the training temperature with a fixed key, so evaluations are comparable), writing
    ``eval_samples`` decoded responses to ``samples.jsonl``."""
    n = len(prompts["tokens"]) // cfg.batch_size * cfg.batch_size
    if n == 0:
        raise ConfigError(f"PPOStageConfig.eval_data: {len(prompts['tokens'])} prompts; need at least "
                          f"batch_size={cfg.batch_size}")

    def evaluate(state: PPOState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        state = _evaluated(cfg, state)
        rollout = rollout_phase(models, ppo_cfg, state, batch["tokens"], batch["mask"], jax.random.PRNGKey(cfg.seed))
        exp = experience_phase(models, ppo_cfg, state, rollout)
        m = exp.response_mask
        return {"score": exp.scores.mean(), "kl": exp.kl.sum(1).mean(), "eos_rate": exp.ended.mean(),
                "response_length": m.sum(1).mean(), "response": rollout.response, "response_mask": m,
                "ended": rollout.ended}

    run = jit_on_mesh(evaluate, mesh, state, returns_tree=False)
    batches = [{k: v[s:s + cfg.batch_size] for k, v in prompts.items()} for s in range(0, n, cfg.batch_size)]

    def eval_fn(state: PPOState) -> dict[str, float]:
        outs = [run(state, b) for b in batches]
        metrics = {k: float(np.mean([float(o[k]) for o in outs])) for k in ("score", "kl", "eos_rate", "response_length")}
        step = int(state.iteration)
        written = 0
        for batch, out in zip(batches, outs):
            response, mask, ended = (np.asarray(out[k]) for k in ("response", "response_mask", "ended"))
            for i in range(len(response)):
                if written == cfg.eval_samples:
                    break
                prompt = tokenizer.decode(batch["tokens"][i][batch["mask"][i] != 0].tolist())
                text = tokenizer.decode(response[i][mask[i] != 0].tolist())
                samples.write_text(step, f"sample_{written}", json.dumps(
                    {"prompt": prompt, "response": text, "ended": bool(ended[i])}))
                written += 1
        return metrics

    return eval_fn
