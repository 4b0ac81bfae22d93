"""PPO-ptx (InstructGPT eq. 2) as pure functions: one iteration is one compiled program.

    objective(φ) = E_(x,y)~π_φ [ r(x, y) − β·log(π_φ(y|x) / π_SFT(y|x)) ] + γ·E_x~D_pretrain [ log π_φ(x) ]

An iteration reads top to bottom like the algorithm (PureJaxRL style):

    rollout   = generate(policy, prompts)                      # sample y ~ π_φ(·|x)
    experience = ref log-probs, values, RM scores,
                 per-token rewards (score − β·KL), GAE, whitening
    for epoch in epochs:  for minibatch in permutation(batch):  # one lax.scan
        policy ← Adam(∇[clipped surrogate − ent_coef·H + γ·ptx_loss(pretraining minibatch)])
        value  ← Adam(∇[clipped value loss])
    β ← KL controller(β, observed KL)

The three phases (``rollout_phase``, ``experience_phase``, ``update_phase``) are separate pure
functions so a driver can time them; ``ppo_iteration`` composes them under one ``jax.jit``.
The value function is a separate network initialised from the reward model (InstructGPT §3.5,
App. C.4), with its own optimiser.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.advantages import gae, last_index, per_token_rewards, whiten
from rlhf_jax.ema import ema_update
from rlhf_jax.errors import check
from rlhf_jax.generation import (GenerateConfig, Rollout, generate_traced, next_token_nll, score, sequence_logprobs,
                                 sequence_values)
from rlhf_jax.kl_control import KLControllerConfig, KLState, init_kl_state, update_kl
from rlhf_jax.losses import explained_variance, ppo_policy_loss, value_loss
from rlhf_jax.masked import masked_mean
from rlhf_jax.model import Params, Transformer, cast_floating
from rlhf_jax.train.state import TrainState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO-ptx hyper-parameters; defaults are InstructGPT's (App. C.4) unless marked.

    ptx scale: ``ptx_loss`` is a per-token mean over the pretraining minibatch, added as
    ``ptx_coef · ptx_loss`` to each policy minibatch loss.  InstructGPT's γ = 27.8 was tuned for
    their (unpublished) normalisation; with a per-token mean DeepSpeed-Chat found 27.8 unstable
    and most reproductions use γ ≈ 1 (see the ``"deepspeed"`` preset).  γ = 0 is plain PPO.
    """

    generation: GenerateConfig = GenerateConfig(max_new_tokens=32)  # IG C.4: temperature 1
    kl: KLControllerConfig = KLControllerConfig()  # IG C.4: fixed β = 0.02
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"  # IG eq. 2: the log-ratio
    ptx_coef: float = 27.8  # IG C.4: γ
    clip_eps: float = 0.2  # IG C.4
    value_clip_eps: float | None = 0.2  # Z19 / N+: clipped value loss
    vf_coef: float = 1.0  # separate value network: only rescales its gradient (TRL: 0.1)
    ent_coef: float = 0.0  # IG silent; N+: 0
    gamma: float = 1.0  # IG C.4: no discount
    lam: float = 0.95  # IG silent; Z19, S20, N+
    epochs: int = 1  # IG C.4: one inner epoch
    num_minibatches: int = 8  # IG C.4: 512 episodes / minibatch 64
    whiten_advantages: bool = True  # Z19, N+
    whiten_rewards: bool = False  # N+ off (Z19 on)
    whiten_unbiased: bool = True  # TRL: Bessel-corrected; Z19: population
    missing_eos_penalty: float | None = None  # Z19 / N+: −1 on responses that never stop
    stop_token_id: int | None = None  # truncate responses after this token (besides EOS)
    score_position: Literal["last", "after_last"] = "last"  # S20/N+: the EOS; TRL: one after
    # Decode from a copy of the policy weights cast to the compute dtype (made once per iteration
    # inside the compiled program) when that dtype is not float32: half the bytes per decode step.
    cast_rollout_weights: bool = True
    # Keep an exponential moving average of the policy weights in ``PPOState.ema_params``, updated
    # after each iteration's minibatch updates (IG C.4: decay 0.992, ``ema.INSTRUCTGPT_EMA_DECAY``;
    # their evaluations use it).  None: no EMA (the state holds None).
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        check(self.kl_estimator in ("k1", "k2", "k3"), self, "kl_estimator", "'k1', 'k2' or 'k3'")
        check(self.score_position in ("last", "after_last"), self, "score_position", "'last' or 'after_last'")
        for f in ("ptx_coef", "vf_coef", "ent_coef"):
            check(getattr(self, f) >= 0, self, f, ">= 0")
        check(0 < self.clip_eps < 1, self, "clip_eps", "in (0, 1)")
        check(self.value_clip_eps is None or self.value_clip_eps > 0, self, "value_clip_eps", "None or > 0")
        check(0 <= self.gamma <= 1, self, "gamma", "in [0, 1]")
        check(0 <= self.lam <= 1, self, "lam", "in [0, 1]")
        check(isinstance(self.cast_rollout_weights, bool), self, "cast_rollout_weights", "a bool")
        for f in ("epochs", "num_minibatches"):
            check(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, self, f, "an int >= 1")
        check(self.ema_decay is None or 0 <= self.ema_decay <= 1, self, "ema_decay", "None or in [0, 1]")


PRESETS: dict[str, dict[str, Any]] = {
    # InstructGPT App. C.4 (the defaults above).
    "instructgpt": {},
    # TRL 1.9.0 PPOConfig defaults: kl 0.05, no ptx, λ 0.95, value clip 0.2, vf_coef 0.1, T 0.7,
    # score one token after EOS, 4 PPO epochs.
    "trl": {"kl": {"kind": "fixed", "init_kl_coef": 0.05}, "ptx_coef": 0.0, "vf_coef": 0.1,
            "epochs": 4, "score_position": "after_last", "generation": {"temperature": 0.7}},
    # DeepSpeed-Chat step 3: β 0.1, γ 1 with a per-token-mean ptx loss (27.8 was unstable).
    "deepspeed": {"kl": {"kind": "fixed", "init_kl_coef": 0.1}, "ptx_coef": 1.0},
    # Ziegler et al. 2019: adaptive KL, reward whitening, population variance, −1 no-EOS penalty.
    "ziegler": {"kl": {"kind": "adaptive", "init_kl_coef": 0.15, "target": 6.0, "horizon": 10000},
                "ptx_coef": 0.0, "whiten_rewards": True, "whiten_unbiased": False,
                "missing_eos_penalty": 1.0, "epochs": 4},
}


RewardFn = Callable[[Params, Array, Array, Array], Array]


class PPOModels(NamedTuple):
    """The static model definitions: an LM-head policy (also the reference), a scalar-head value
    model, and the reward: a scalar-head ``Transformer`` (the reward model) or any pure function
    ``reward(reward_params, tokens [b, T], mask [b, T], index [b]) -> [b]`` (a rule-based or gold
    reward; it must be hashable, e.g. a module-level function)."""

    policy: Transformer
    value: Transformer
    reward: Transformer | RewardFn


@flax.struct.dataclass
class PPOState:
    """Everything an iteration reads and writes (one pytree: jit it, shard it, checkpoint it).

    ``ref_params`` (π_SFT) and ``reward_params`` are frozen; ``reward_gain``/``reward_bias`` are
    the reward model's normalisation (InstructGPT §3.5).  ``ema_params``: the EMA of the policy
    weights (``PPOConfig.ema_decay``), sharded like them; None without an EMA.
    """

    policy: TrainState
    value: TrainState
    ref_params: Params
    reward_params: Params
    reward_gain: Array
    reward_bias: Array
    kl: KLState
    rng: Array
    iteration: Array
    ema_params: Params | None = None


@flax.struct.dataclass
class Experience:
    """A scored rollout, ``[b, N]`` per token unless noted."""

    tokens: Array  # [b, P + N]
    mask: Array  # [b, P + N]
    response_mask: Array
    old_logprobs: Array
    ref_logprobs: Array
    old_values: Array
    rewards: Array
    advantages: Array
    returns: Array
    scores: Array  # [b] normalised RM score (after the no-EOS penalty)
    kl: Array  # per-token KL estimate
    ended: Array  # [b]


def init_ppo_state(
    cfg: PPOConfig,
    policy_params: Params,
    value_params: Params,
    reward_params: Params,
    policy_tx: Any,
    value_tx: Any,
    rng: Array,
    *,
    ref_params: Params | None = None,
    reward_gain: float = 1.0,
    reward_bias: float = 0.0,
) -> PPOState:
    """A fresh PPO state: the policy and the reference both start from the SFT parameters (unless
    ``ref_params`` is given) and the value function from the reward model (InstructGPT App. C.4).

    Frozen copies are made so no two state fields share a buffer (the iteration donates its state).
    The EMA (``cfg.ema_decay``) starts at the policy's initial weights.
    """
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731
    return PPOState(
        policy=TrainState.create(copy(policy_params), policy_tx, jax.random.fold_in(rng, 1)),
        value=TrainState.create(copy(value_params), value_tx, jax.random.fold_in(rng, 2)),
        ref_params=copy(policy_params if ref_params is None else ref_params),
        reward_params=copy(reward_params),
        reward_gain=jnp.asarray(reward_gain, jnp.float32),
        reward_bias=jnp.asarray(reward_bias, jnp.float32),
        kl=init_kl_state(cfg.kl),
        rng=rng,
        iteration=jnp.zeros((), jnp.int32),
        ema_params=None if cfg.ema_decay is None else copy(policy_params),
    )


def truncate_at(rollout: Rollout, stop_token_id: int, pad_id: int) -> Rollout:
    """Cut each response after its first ``stop_token_id`` (kept as the last real token)."""
    hit = (rollout.response == stop_token_id) & (rollout.response_mask != 0)
    after = (jnp.cumsum(hit, axis=1) - hit) > 0
    keep = (rollout.response_mask != 0) & ~after
    response = jnp.where(keep, rollout.response, pad_id)
    p = rollout.response_start
    return rollout.replace(
        tokens=rollout.tokens.at[:, p:].set(response),
        response=response,
        response_mask=keep.astype(rollout.response_mask.dtype),
        logprobs=jnp.where(keep, rollout.logprobs, 0.0),
        ended=rollout.ended | jnp.any(hit, axis=1),
    )


def rollout_params(models: PPOModels, cfg: PPOConfig, params: Params) -> Params:
    """The weights the rollout decodes from: ``params`` cast to the policy's compute dtype when
    ``cfg.cast_rollout_weights`` and that dtype is not float32 (the matmuls run in it anyway, so
    only the norm scales and a tied unembedding are rounded differently), else ``params``."""
    dtype = models.policy.config.compute_dtype
    if not cfg.cast_rollout_weights or dtype == jnp.float32:
        return params
    return cast_floating(params, dtype)


def rollout_phase(models: PPOModels, cfg: PPOConfig, state: PPOState, prompt_ids: Array,
                  prompt_mask: Array, key: Array) -> Rollout:
    """Sample responses from the current policy (stop-token truncation applied), decoding from
    ``rollout_params`` (a compute-dtype copy made once per call)."""
    params = rollout_params(models, cfg, state.policy.params)
    rollout = generate_traced(models.policy, params, prompt_ids, prompt_mask, key, cfg.generation)
    if cfg.stop_token_id is not None:
        rollout = truncate_at(rollout, cfg.stop_token_id, cfg.generation.pad_id)
    return rollout


def experience_phase(models: PPOModels, cfg: PPOConfig, state: PPOState, rollout: Rollout) -> Experience:
    """Reference log-probs, values, scores, per-token rewards, GAE and whitening."""
    p, mask, rmask = rollout.response_start, rollout.mask, rollout.response_mask
    temperature = cfg.generation.logprob_temperature
    ref_logprobs, _ = sequence_logprobs(models.policy, state.ref_params, rollout.tokens, mask, p,
                                        temperature=temperature)
    old_values = sequence_values(models.value, state.value.params, rollout.tokens, mask, p)

    last = last_index(mask)
    index = last if cfg.score_position == "last" else jnp.minimum(last + 1, mask.shape[1] - 1)
    if isinstance(models.reward, Transformer):
        raw = score(models.reward, state.reward_params, rollout.tokens, mask, index=index)
    else:
        raw = models.reward(state.reward_params, rollout.tokens, mask, index)
    scores = state.reward_gain * raw + state.reward_bias
    if cfg.missing_eos_penalty is not None:
        scores = jnp.where(rollout.ended, scores, scores - cfg.missing_eos_penalty)

    rewards, kl = per_token_rewards(scores, rollout.logprobs, ref_logprobs, rmask,
                                    kl_coef=state.kl.coef, kl_estimator=cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, rmask, shift_mean=False, unbiased=cfg.whiten_unbiased)
    advantages, returns = gae(rewards, old_values, rmask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, rmask, unbiased=cfg.whiten_unbiased)
    return Experience(tokens=rollout.tokens, mask=mask, response_mask=rmask, old_logprobs=rollout.logprobs,
                      ref_logprobs=ref_logprobs, old_values=old_values, rewards=rewards,
                      advantages=advantages, returns=returns, scores=scores, kl=kl, ended=rollout.ended)


def update_phase(models: PPOModels, cfg: PPOConfig, state: PPOState, exp: Experience,
                 ptx_tokens: Array | None, ptx_mask: Array | None, key: Array) -> tuple[PPOState, dict[str, Array]]:
    """``epochs × num_minibatches`` Adam updates of policy and value, one ``lax.scan``; then the
    policy EMA step (``cfg.ema_decay``).

    ``ptx_tokens``/``ptx_mask``: ``[epochs · num_minibatches, ptx_batch, L]`` pretraining
    minibatches, one per update (InstructGPT App. C.4: the ptx gradient is computed per PPO
    minibatch, scaled by γ and added), or ``None`` when γ = 0.
    """
    b = exp.tokens.shape[0]
    n_mb = cfg.num_minibatches
    if b % n_mb:
        raise ValueError(f"PPO: rollout batch {b} is not divisible by PPOConfig.num_minibatches={n_mb}")
    p = exp.tokens.shape[1] - exp.response_mask.shape[1]
    temperature = cfg.generation.logprob_temperature
    perms = jnp.stack([jax.random.permutation(k, b) for k in jax.random.split(key, cfg.epochs)])
    indices = perms.reshape(cfg.epochs * n_mb, b // n_mb)
    use_ptx = ptx_tokens is not None and cfg.ptx_coef > 0
    xs = (indices, ptx_tokens, ptx_mask) if use_ptx else (indices, None, None)

    def policy_loss_fn(params, mb: Experience, ptx_toks, ptx_m):
        logprobs, entropy = sequence_logprobs(models.policy, params, mb.tokens, mb.mask, p, temperature=temperature)
        pg, stats = ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps=cfg.clip_eps)
        ent = masked_mean(entropy, mb.response_mask)
        loss = pg - cfg.ent_coef * ent
        stats = dict(stats, pg_loss=pg, entropy=ent)
        if use_ptx:
            lm = next_token_nll(models.policy, params, ptx_toks, ptx_m, ptx_m)  # = ptx_loss
            loss = loss + cfg.ptx_coef * lm
            stats["ptx_loss"] = lm
        return loss, stats

    def value_loss_fn(params, mb: Experience):
        values = sequence_values(models.value, params, mb.tokens, mb.mask, p)
        loss, stats = value_loss(values, mb.old_values, mb.returns, mb.response_mask, clip_eps=cfg.value_clip_eps)
        return cfg.vf_coef * loss, dict(stats, vf_loss=loss)

    def step(carry, x):
        policy, value = carry
        idx, ptx_toks, ptx_m = x
        mb = jax.tree_util.tree_map(lambda a: a[idx], exp)
        (_, pstats), pgrads = jax.value_and_grad(policy_loss_fn, has_aux=True)(policy.params, mb, ptx_toks, ptx_m)
        (_, vstats), vgrads = jax.value_and_grad(value_loss_fn, has_aux=True)(value.params, mb)
        return (policy.apply_gradients(pgrads), value.apply_gradients(vgrads)), {**pstats, **vstats}

    (policy, value), stats = jax.lax.scan(step, (state.policy, state.value), xs)
    ema = None if cfg.ema_decay is None else ema_update(state.ema_params, policy.params, cfg.ema_decay)
    return state.replace(policy=policy, value=value, ema_params=ema), jax.tree_util.tree_map(jnp.mean, stats)


def iteration_metrics(exp: Experience, update_stats: dict[str, Array], kl_coef: Array) -> dict[str, Array]:
    """Scalars logged every iteration (the names the stage, report and plots read).  ``entropy``
    comes from the update's forward passes (the policy's mean token entropy over the minibatches),
    so the experience phase needs no extra policy forward."""
    m = exp.response_mask
    lengths = m.sum(axis=1).astype(jnp.float32)
    kl_per_seq = exp.kl.sum(axis=1)
    return {
        "score": exp.scores.mean(),
        "kl": kl_per_seq.mean(),
        "kl_coef": kl_coef,
        "reward_total": exp.rewards.sum(axis=1).mean(),
        "response_length": lengths.mean(),
        "eos_rate": exp.ended.astype(jnp.float32).mean(),
        "explained_variance": explained_variance(exp.old_values, exp.returns, m),
        "value_mean": masked_mean(exp.old_values, m),
        "advantage_mean": masked_mean(exp.advantages, m),
        **update_stats,
    }


def ppo_iteration(models: PPOModels, cfg: PPOConfig, state: PPOState, prompt_ids: Array, prompt_mask: Array,
                  ptx_tokens: Array | None = None, ptx_mask: Array | None = None) -> tuple[PPOState, dict[str, Array]]:
    """One whole PPO-ptx iteration (rollout → experience → updates → KL control).

    Args:
      models, cfg: static.
      state: the ``PPOState``.
      prompt_ids, prompt_mask: ``[b, P]`` left-padded prompts.
      ptx_tokens, ptx_mask: ``[epochs · num_minibatches, ptx_batch, L]`` or ``None``.

    Returns:
      ``(new_state, metrics)``; jit with ``static_argnums=(0, 1)`` (see ``make_ppo_iteration``).
    """
    rng, k_roll, k_perm = jax.random.split(state.rng, 3)
    rollout = rollout_phase(models, cfg, state, prompt_ids, prompt_mask, k_roll)
    exp = experience_phase(models, cfg, state, rollout)
    return finish_iteration(models, cfg, state, exp, ptx_tokens, ptx_mask, k_perm, rng, prompt_ids.shape[0])


def finish_iteration(models: PPOModels, cfg: PPOConfig, state: PPOState, exp: Experience, ptx_tokens: Array | None,
                     ptx_mask: Array | None, key: Array, rng: Array,
                     batch_size: int) -> tuple[PPOState, dict[str, Array]]:
    """An iteration's end, after its experience: ``update_phase`` with ``key`` (the minibatch
    permutations), ``iteration_metrics``, the KL controller's step over ``batch_size`` (static)
    rollouts, and the state's next ``rng`` and ``iteration``.  ``ppo_iteration`` ends with it, and
    so does a driver that runs the phases as separate programs (the PPO stage's phase timing)."""
    new_state, stats = update_phase(models, cfg, state, exp, ptx_tokens, ptx_mask, key)
    metrics = iteration_metrics(exp, stats, state.kl.coef)
    kl = update_kl(cfg.kl, state.kl, metrics["kl"], batch_size)
    return new_state.replace(kl=kl, rng=rng, iteration=state.iteration + 1), metrics


def make_ppo_iteration(models: PPOModels, cfg: PPOConfig):
    """``jax.jit``-compiled ``ppo_iteration`` closed over the static models and config; the state
    argument is donated (its buffers are reused for the new state)."""
    return jax.jit(lambda state, prompt_ids, prompt_mask, ptx_tokens=None, ptx_mask=None:
                   ppo_iteration(models, cfg, state, prompt_ids, prompt_mask, ptx_tokens, ptx_mask),
                   donate_argnums=(0,))
