"""The GRPO family of clipped policy losses (GRPO, BNPO, Dr. GRPO, DAPO, GSPO, and RLOO's
sequence-level ratio) as one pure function, and a whole GRPO or RLOO iteration as one compiled
program.

All of them share the clipped surrogate of PPO with a per-*response* advantage (no value model):

    ρ_t   = π_θ(y_t | ·) / π_old(y_t | ·)                       (importance_level="token")
    ℓ_t   = −min(ρ_t·A, clip(ρ_t, 1 − ε_low, 1 + ε_high)·A) + β·KL_t
    KL_t  = π_ref/π_θ − log(π_ref/π_θ) − 1                      (the k3 estimator)

and differ in how the per-token ``ℓ`` is reduced to a scalar (``loss_type``) and in the ratio
(``importance_level``). The formulas follow TRL 1.16.0's ``GRPOTrainer._compute_loss`` and
``RLOOTrainer._compute_loss``, which ``tests/test_grpo.py`` checks against golden numbers made by
running that code (``tests/golden/make_trl116_golden.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.advantages import kl_penalty, last_index
from rlhf_jax.ema import ema_update
from rlhf_jax.errors import check
from rlhf_jax.generation import GenerateConfig, Rollout, generate, next_token_nll, score, sequence_logprobs
from rlhf_jax.group_advantages import GROUP_SCALES, GroupScale, group_advantages, rloo_advantages
from rlhf_jax.masked import masked_mean
from rlhf_jax.model import Params, Transformer
from rlhf_jax.ppo import RewardFn, truncate_at
from rlhf_jax.train.state import TrainState

Array = jax.Array

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceLevel = Literal["token", "sequence", "sequence_sum"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_sum")


def grpo_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float | jax.Array,
    clip_high: float | jax.Array,
    beta: float | jax.Array,
    loss_type: LossType = "grpo",
    importance_level: ImportanceLevel = "token",
    max_len: int | None = None,
    num_items: float | jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped group-relative policy loss with a k3 KL penalty in the loss.

    The importance ratio (``importance_level``, static):

    * ``"token"``: ``ρ_t = exp(log π_θ(y_t) − log π_old(y_t))`` (PPO; DeepSeekMath GRPO, Shao et al.
      2024, eq. 3).
    * ``"sequence"``: one ratio per response, the geometric mean over its tokens,
      ``s = exp(1/|y| · Σ_t (log π_θ − log π_old))``, broadcast to its tokens (GSPO, Zheng et al.
      2025, eq. 7; TRL ``importance_sampling_level="sequence"``). Gradients flow through every
      token of ``s``.
    * ``"sequence_sum"``: ``exp(Σ_t (log π_θ − log π_old))``, the full sequence likelihood ratio of
      RLOO (TRL 1.16.0 ``RLOOTrainer``; with ``loss_type="grpo"`` and ``beta=0`` this is exactly
      TRL's RLOO loss, the mean over responses of the clipped surrogate).

    Clipping is asymmetric, ``clip(ρ, 1 − clip_low, 1 + clip_high)`` ("clip-higher", DAPO, Yu et al.
    2025, §3.1: e.g. ``clip_low=0.2, clip_high=0.28``); ``clip_low = clip_high = ε`` is PPO's.

    The KL term ``β·(exp(ref − logπ) − (ref − logπ) − 1)`` is the k3 estimator of KL(π_θ ‖ π_ref)
    added per token to the loss (DeepSeekMath eq. 4), not to the reward; it is skipped when
    ``beta`` is the Python number 0 (then ``ref_logprobs`` may be ``None``).

    The reduction (``loss_type``, static), with ``ℓ`` masked:

    * ``"grpo"``: ``mean_i [ Σ_t ℓ_it / |y_i| ]``, each response's token mean, then the mean over
      responses (DeepSeekMath eq. 3). Long responses' tokens weigh less (Dr. GRPO's length bias).
    * ``"bnpo"``: ``Σ_it ℓ_it / Σ_i |y_i|``, one token mean over this batch (TRL's "batch-normalised").
    * ``"dr_grpo"``: ``Σ_it ℓ_it / (B · max_len)``, a constant normaliser (Dr. GRPO, Liu et al.
      2025, §3.2; ``max_len`` is the generation budget, default the ``time`` axis; TRL uses
      ``max_completion_length``).
    * ``"dapo"``: ``Σ_it ℓ_it / num_items``, the token-level policy gradient loss of DAPO (Yu et al.
      2025, §3.3, eq. 12). TRL 1.16.0 divides by the number of response tokens in the whole
      *generation batch* (``num_items_in_batch``, per process and scaled for gradient accumulation),
      so a minibatch's tokens weigh the same as every other minibatch's: pass that count as
      ``num_items``. By default it is this batch's token count, where ``"dapo"`` equals ``"bnpo"``.

    With a sequence-level ratio the per-response loss is broadcast to the response's tokens before
    the reduction, as TRL does (``"bnpo"``/``"dapo"``/``"dr_grpo"`` then weigh a response by its
    length; GSPO's paper setup is ``loss_type="grpo"``).

    Args:
      logprobs: ``[B, T]`` log π_θ of the sampled response tokens (carries the gradient).
      old_logprobs: ``[B, T]`` the same under the policy that sampled them (π_old).
      ref_logprobs: ``[B, T]`` under the frozen reference π_ref, or ``None`` when ``beta == 0``.
      advantages: ``[B]`` one advantage per response (``group_advantages``, ``rloo_advantages``).
      mask: ``[B, T]`` 1 at real response tokens; entries outside it are ignored (even non-finite).
      clip_low, clip_high: ε_low, ε_high.
      beta: KL coefficient β (TRL's default 0; DeepSeekMath 0.04).
      loss_type, importance_level: see above (static).
      max_len: the ``"dr_grpo"`` normaliser's length (static int); default ``T``.
      num_items: the ``"dapo"`` normaliser; default ``Σ mask``.

    Returns:
      ``(loss, stats)``. ``stats`` (no gradient): ``kl`` (token mean of the k3 KL, 0 when skipped),
      ``clip_low_frac`` (fraction with ``ρ < 1 − ε_low`` and ``A < 0``), ``clip_high_frac``
      (``ρ > 1 + ε_high`` and ``A > 0``), ``clip_frac`` (either), ``ratio_mean``. They are means over
      tokens for a token-level ratio and over responses for a sequence-level one (TRL's
      ``clip_ratio/*_mean`` and ``kl`` metrics).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"grpo_loss: importance_level must be one of {IMPORTANCE_LEVELS}, got {importance_level!r}")
    skip_kl = isinstance(beta, (int, float)) and beta == 0
    if ref_logprobs is None and not skip_kl:
        raise ValueError("grpo_loss: ref_logprobs is None but beta is not 0; pass the reference log-probs")
    chex.assert_rank(logprobs, 2, custom_message="grpo_loss: `logprobs` must be [B, T]")
    for name, x in (("old_logprobs", old_logprobs), ("mask", mask)) + (
            () if ref_logprobs is None else (("ref_logprobs", ref_logprobs),)):
        chex.assert_equal_shape([logprobs, x], custom_message=f"grpo_loss: `{name}` must be [B, T] like `logprobs`")
    chex.assert_shape(advantages, logprobs.shape[:1], custom_message="grpo_loss: `advantages` must be [B]")

    keep = mask != 0
    weights = keep.astype(jnp.promote_types(logprobs.dtype, jnp.float32))
    logp = jnp.where(keep, logprobs, 0)
    log_ratio = jnp.where(keep, logprobs - old_logprobs, 0)
    if importance_level == "token":
        log_w = log_ratio
    else:
        log_w = jnp.sum(log_ratio, axis=1, keepdims=True)
        if importance_level == "sequence":
            log_w = log_w / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1)
    ratio = jnp.exp(log_w)  # [B, T] or [B, 1]
    adv = advantages[:, None].astype(ratio.dtype)
    clipped = jnp.clip(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    if skip_kl:
        kl = jnp.zeros_like(log_ratio)
    else:
        kl = jnp.where(keep, kl_penalty(logp, jnp.where(keep, ref_logprobs, 0), "k3"), 0)
        per_token = per_token + beta * kl
    per_token = jnp.where(keep, per_token, 0)  # broadcasts a [B, 1] sequence-level loss to [B, T]

    total = jnp.sum(per_token)
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1))
    elif loss_type == "bnpo":
        loss = total / jnp.maximum(jnp.sum(weights), 1)
    elif loss_type == "dr_grpo":
        loss = total / (logprobs.shape[0] * (logprobs.shape[1] if max_len is None else max_len))
    else:
        loss = total / jnp.maximum(jnp.sum(weights) if num_items is None else num_items, 1)

    low = ((ratio < 1 - clip_low) & (adv < 0)).astype(weights.dtype)
    high = ((ratio > 1 + clip_high) & (adv > 0)).astype(weights.dtype)

    mean = (lambda x: masked_mean(x, weights)) if importance_level == "token" else jnp.mean  # noqa: E731

    stats = {
        "kl": masked_mean(kl, weights),
        "clip_low_frac": mean(low),
        "clip_high_frac": mean(high),
        "clip_frac": mean(jnp.maximum(low, high)),
        "ratio_mean": mean(ratio),
    }
    return loss, jax.lax.stop_gradient(stats)


# ---------------------------------------------------------------------------------------------
# One GRPO / RLOO iteration as one compiled program (the PPO core's pattern, without a value model):
#
#   rollout    = generate(policy, each prompt repeated G times)
#   experience = reference log-probs, rewards, group (GRPO) or leave-one-out (RLOO) advantages
#   for epoch in epochs:  for minibatch in permutation(batch):   # one lax.scan
#       policy ← optimiser(∇[grpo_loss + γ·ptx_loss])
#   ema ← ema_update(ema, policy)                                # when ema_decay is set


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO / RLOO hyper-parameters. Defaults are TRL 1.16.0's ``GRPOConfig`` unless marked;
    ``GRPO_PRESETS`` holds the published variants.

    ``algorithm="grpo"``: group advantages (``scale``), β·k3 KL in the loss (DeepSeekMath).
    ``algorithm="rloo"``: leave-one-out advantages of ``score − β·Σ_t k1`` (the KL in the reward,
    Ahmadian et al. 2024; TRL's ``RLOOTrainer``), so ``grpo_loss`` runs with β = 0.
    """

    generation: GenerateConfig = GenerateConfig(max_new_tokens=32)
    algorithm: Literal["grpo", "rloo"] = "grpo"
    group_size: int = 8  # G; TRL num_generations 8 (DeepSeekMath: 64)
    scale: GroupScale = "group"  # GRPO only; "none" = Dr. GRPO
    normalize_advantages: bool = False  # RLOO only (TRL RLOOConfig)
    loss_type: LossType = "dapo"  # TRL 1.16.0's default
    importance_level: ImportanceLevel = "token"
    clip_low: float = 0.2  # TRL epsilon
    clip_high: float = 0.2  # TRL epsilon_high (defaults to epsilon); DAPO: 0.28
    beta: float = 0.0  # TRL GRPO 0.0 (DeepSeekMath 0.04); TRL RLOO 0.05
    ptx_coef: float = 0.0  # γ of InstructGPT's ptx term (per-token mean, as in PPOConfig)
    epochs: int = 1  # TRL num_iterations
    num_minibatches: int = 1  # TRL steps_per_generation / gradient_accumulation_steps
    ema_decay: float | None = None  # InstructGPT App. C.4: 0.992
    missing_eos_penalty: float | None = None
    stop_token_id: int | None = None

    def __post_init__(self) -> None:
        check(self.algorithm in ("grpo", "rloo"), self, "algorithm", "'grpo' or 'rloo'")
        check(self.scale in GROUP_SCALES, self, "scale", f"one of {GROUP_SCALES}")
        check(self.loss_type in LOSS_TYPES, self, "loss_type", f"one of {LOSS_TYPES}")
        check(self.importance_level in IMPORTANCE_LEVELS, self, "importance_level", f"one of {IMPORTANCE_LEVELS}")
        for f in ("group_size", "epochs", "num_minibatches"):
            check(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, self, f, "an int >= 1")
        check(self.group_size >= 2, self, "group_size", ">= 2 (one sample per prompt has no group baseline)")
        for f in ("clip_low", "clip_high"):
            check(0 < getattr(self, f) < 1, self, f, "in (0, 1)")
        for f in ("beta", "ptx_coef"):
            check(getattr(self, f) >= 0, self, f, ">= 0")
        check(self.ema_decay is None or 0 <= self.ema_decay <= 1,
              self, "ema_decay", "None or in [0, 1]")


@dataclasses.dataclass(frozen=True)
class RLOOConfig(GRPOConfig):
    """``GRPOConfig`` with the defaults of TRL 1.16.0's ``RLOOTrainer`` (``GRPO_PRESETS["rloo"]``): the
    leave-one-out baseline of the reward less β·Σ_t k1 (β = 0.05), and the clipped sequence-sum ratio
    (a class of its own so that a partial ``rloo`` table or ``--set`` keeps these defaults)."""

    algorithm: Literal["grpo", "rloo"] = "rloo"
    loss_type: LossType = "grpo"
    importance_level: ImportanceLevel = "sequence_sum"
    beta: float = 0.05


GRPO_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath (Shao et al. 2024): per-response token mean, β = 0.04, std-scaled advantages.
    "grpo": {"loss_type": "grpo", "beta": 0.04},
    # Dr. GRPO (Liu et al. 2025): no std scaling, constant normaliser, no KL.
    "dr_grpo": {"loss_type": "dr_grpo", "scale": "none", "beta": 0.0},
    # DAPO (Yu et al. 2025): clip-higher 0.28, token-level loss, no KL.
    "dapo": {"loss_type": "dapo", "clip_high": 0.28, "beta": 0.0},
    # GSPO (Zheng et al. 2025): sequence-level ratio with its narrow clip range (3e-4, 4e-4).
    "gspo": {"loss_type": "grpo", "importance_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4},
    # RLOO as in TRL 1.16.0's RLOOTrainer: k1 KL in the reward (β 0.05), sequence-sum ratio.
    "rloo": {"algorithm": "rloo", "loss_type": "grpo", "importance_level": "sequence_sum", "beta": 0.05},
}


class GRPOModels(NamedTuple):
    """The static model definitions: an LM-head policy (also the reference) and the reward, a
    scalar-head ``Transformer`` or any pure ``reward(reward_params, tokens [b, T], mask [b, T],
    index [b]) -> [b]`` (a verifiable reward; hashable, e.g. a module-level function)."""

    policy: Transformer
    reward: Transformer | RewardFn


@flax.struct.dataclass
class GRPOState:
    """Everything an iteration reads and writes. ``ref_params`` and ``reward_params`` are frozen;
    ``ema_params`` is the policy's EMA (``None`` unless ``GRPOConfig.ema_decay`` is set)."""

    policy: TrainState
    ref_params: Params
    reward_params: Params
    reward_gain: Array
    reward_bias: Array
    ema_params: Params | None
    rng: Array
    iteration: Array


@flax.struct.dataclass
class GroupExperience:
    """A scored group rollout, ``[B, N]`` per token unless noted, ``B = n_prompts · G``."""

    tokens: Array  # [B, P + N]
    mask: Array  # [B, P + N]
    response_mask: Array
    old_logprobs: Array
    ref_logprobs: Array
    advantages: Array  # [B]
    scores: Array  # [B] reward (normalised RM score or reward function, after the no-EOS penalty)
    ended: Array  # [B]


def init_grpo_state(cfg: GRPOConfig, policy_params: Params, reward_params: Params, policy_tx: Any, rng: Array,
                    *, ref_params: Params | None = None, reward_gain: float = 1.0,
                    reward_bias: float = 0.0) -> GRPOState:
    """A fresh state: policy, reference and EMA all start from ``policy_params`` (unless
    ``ref_params`` is given); every field is its own copy (the iteration donates its state)."""
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)  # noqa: E731
    return GRPOState(
        policy=TrainState.create(copy(policy_params), policy_tx, jax.random.fold_in(rng, 1)),
        ref_params=copy(policy_params if ref_params is None else ref_params),
        reward_params=copy(reward_params),
        reward_gain=jnp.asarray(reward_gain, jnp.float32),
        reward_bias=jnp.asarray(reward_bias, jnp.float32),
        ema_params=None if cfg.ema_decay is None else copy(policy_params),
        rng=rng,
        iteration=jnp.zeros((), jnp.int32),
    )


def scored_rollout(models: GRPOModels, cfg: GRPOConfig, state: GRPOState, params: Params, prompt_ids: Array,
                   prompt_mask: Array, key: Array) -> tuple[Rollout, Array, Array]:
    """One response per row of ``prompt_ids``/``prompt_mask`` ``[b, P]`` (left-padded) sampled from
    ``params`` (the policy, or its EMA for evaluation), cut at ``cfg.stop_token_id``, and scored.

    Returns:
      ``(rollout, ref_logprobs [b, N], scores [b])``: the reference's log-probs of the response
      tokens and the reward (``reward_gain · raw + reward_bias``, less ``missing_eos_penalty`` for
      a response that never stopped).
    """
    rollout = generate(models.policy, params, prompt_ids, prompt_mask, key, cfg.generation)
    if cfg.stop_token_id is not None:
        rollout = truncate_at(rollout, cfg.stop_token_id, cfg.generation.pad_id)
    p, mask = rollout.response_start, rollout.mask
    ref_logprobs, _ = sequence_logprobs(models.policy, state.ref_params, rollout.tokens, mask, p,
                                        temperature=cfg.generation.logprob_temperature)
    index = last_index(mask)
    if isinstance(models.reward, Transformer):
        raw = score(models.reward, state.reward_params, rollout.tokens, mask, index=index)
    else:
        raw = models.reward(state.reward_params, rollout.tokens, mask, index)
    scores = state.reward_gain * raw + state.reward_bias
    if cfg.missing_eos_penalty is not None:
        scores = jnp.where(rollout.ended, scores, scores - cfg.missing_eos_penalty)
    return rollout, ref_logprobs, scores


def sequence_kl(logprobs: Array, ref_logprobs: Array, mask: Array) -> Array:
    """``[b]`` the k1 estimate of KL(π ‖ π_ref) of each response, ``Σ_t (log π − log π_ref)`` over
    its real tokens (PPO's ``kl`` metric; RLOO's reward penalty)."""
    return jnp.sum(jnp.where(mask != 0, kl_penalty(logprobs, ref_logprobs, "k1"), 0), axis=1)


def group_experience(models: GRPOModels, cfg: GRPOConfig, state: GRPOState, prompt_ids: Array,
                     prompt_mask: Array, key: Array) -> GroupExperience:
    """Sample G responses per prompt from the current policy, score them, and compute the
    advantages. ``prompt_ids``/``prompt_mask``: ``[n_prompts, P]``, left-padded."""
    ids = jnp.repeat(prompt_ids, cfg.group_size, axis=0)
    pmask = jnp.repeat(prompt_mask, cfg.group_size, axis=0)
    rollout, ref_logprobs, scores = scored_rollout(models, cfg, state, state.policy.params, ids, pmask, key)
    rmask = rollout.response_mask
    if cfg.algorithm == "grpo":
        advantages = group_advantages(scores, cfg.group_size, scale=cfg.scale)
    else:
        kl = sequence_kl(rollout.logprobs, ref_logprobs, rmask)
        advantages = rloo_advantages(scores - cfg.beta * kl, cfg.group_size, normalize=cfg.normalize_advantages)
    return GroupExperience(tokens=rollout.tokens, mask=rollout.mask, response_mask=rmask,
                           old_logprobs=rollout.logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
                           scores=scores, ended=rollout.ended)


def evaluate_policy(models: GRPOModels, cfg: GRPOConfig, state: GRPOState, prompt_ids: Array, prompt_mask: Array,
                    key: Array, *, use_ema: bool = False) -> dict[str, Array]:
    """Held-out means of one sampled response per prompt: ``score``, ``kl`` (k1, to the reference),
    ``response_length`` and ``eos_rate``; from the EMA weights when ``use_ema`` (and the state has
    them), else the policy's.  Jittable with ``models``/``cfg``/``use_ema`` static."""
    params = state.ema_params if use_ema and state.ema_params is not None else state.policy.params
    rollout, ref_logprobs, scores = scored_rollout(models, cfg, state, params, prompt_ids, prompt_mask, key)
    m = rollout.response_mask
    return {"score": scores.mean(), "kl": sequence_kl(rollout.logprobs, ref_logprobs, m).mean(),
            "response_length": m.sum(axis=1).astype(jnp.float32).mean(),
            "eos_rate": rollout.ended.astype(jnp.float32).mean()}


def group_update(models: GRPOModels, cfg: GRPOConfig, state: GRPOState, exp: GroupExperience,
                 ptx_tokens: Array | None, ptx_mask: Array | None, key: Array) -> tuple[GRPOState, dict[str, Array]]:
    """``epochs × num_minibatches`` policy updates on ``grpo_loss`` (+ γ·ptx), one ``lax.scan``;
    then the EMA step. Minibatches are drawn over responses, as TRL shuffles them.

    ``"dapo"`` divides each minibatch's token sum by the *average* minibatch token count of the
    whole rollout (TRL's ``num_items_in_batch`` over ``steps_per_generation``).
    ``ptx_tokens``/``ptx_mask``: ``[epochs · num_minibatches, ptx_batch, L]`` or ``None``.
    """
    b, n = exp.response_mask.shape
    n_mb = cfg.num_minibatches
    if b % n_mb:
        raise ValueError(f"GRPO: rollout batch {b} is not divisible by GRPOConfig.num_minibatches={n_mb}")
    p = exp.tokens.shape[1] - n
    perms = jnp.stack([jax.random.permutation(k, b) for k in jax.random.split(key, cfg.epochs)])
    indices = perms.reshape(cfg.epochs * n_mb, b // n_mb)
    use_ptx = ptx_tokens is not None and cfg.ptx_coef > 0
    xs = (indices, ptx_tokens, ptx_mask) if use_ptx else (indices, None, None)
    num_items = jnp.sum(exp.response_mask != 0) / n_mb
    beta = cfg.beta if cfg.algorithm == "grpo" else 0.0

    def loss_fn(params, mb: GroupExperience, ptx_toks, ptx_m):
        logprobs, entropy = sequence_logprobs(models.policy, params, mb.tokens, mb.mask, p,
                                              temperature=cfg.generation.logprob_temperature)
        pg, stats = grpo_loss(logprobs, mb.old_logprobs, mb.ref_logprobs, mb.advantages, mb.response_mask,
                              clip_low=cfg.clip_low, clip_high=cfg.clip_high, beta=beta, loss_type=cfg.loss_type,
                              importance_level=cfg.importance_level, max_len=n, num_items=num_items)
        stats = dict(stats, pg_loss=pg, entropy=masked_mean(entropy, mb.response_mask))
        loss = pg
        if use_ptx:
            lm = next_token_nll(models.policy, params, ptx_toks, ptx_m, ptx_m)  # = ptx_loss
            loss = loss + cfg.ptx_coef * lm
            stats["ptx_loss"] = lm
        return loss, stats

    def step(policy: TrainState, x):
        idx, ptx_toks, ptx_m = x
        mb = jax.tree_util.tree_map(lambda a: a[idx], exp)
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy.params, mb, ptx_toks, ptx_m)
        return policy.apply_gradients(grads), stats

    policy, stats = jax.lax.scan(step, state.policy, xs)
    ema = None if cfg.ema_decay is None else ema_update(state.ema_params, policy.params, cfg.ema_decay)
    return state.replace(policy=policy, ema_params=ema), jax.tree_util.tree_map(jnp.mean, stats)


def grpo_iteration(models: GRPOModels, cfg: GRPOConfig, state: GRPOState, prompt_ids: Array, prompt_mask: Array,
                   ptx_tokens: Array | None = None,
                   ptx_mask: Array | None = None) -> tuple[GRPOState, dict[str, Array]]:
    """One whole GRPO or RLOO iteration (group rollout → advantages → updates → EMA).

    Args:
      models, cfg: static.
      state: the ``GRPOState``.
      prompt_ids, prompt_mask: ``[n_prompts, P]`` left-padded; each prompt is sampled G times.
      ptx_tokens, ptx_mask: ``[epochs · num_minibatches, ptx_batch, L]`` or ``None``.

    Returns:
      ``(new_state, metrics)``: ``score`` (mean reward), ``kl`` (mean over responses of the summed
      k1 KL to the reference, as PPO's), ``response_length``, ``eos_rate``, ``frac_zero_std``
      (groups whose rewards are all equal: no learning signal), and the update's means of
      ``grpo_loss``'s stats, ``pg_loss``, ``entropy`` (and ``ptx_loss``).
    """
    rng, k_roll, k_perm = jax.random.split(state.rng, 3)
    exp = group_experience(models, cfg, state, prompt_ids, prompt_mask, k_roll)
    new_state, stats = group_update(models, cfg, state, exp, ptx_tokens, ptx_mask, k_perm)
    m = exp.response_mask != 0
    grouped = exp.scores.reshape(-1, cfg.group_size)
    metrics = {
        "score": exp.scores.mean(),
        "kl": sequence_kl(exp.old_logprobs, exp.ref_logprobs, exp.response_mask).mean(),
        "response_length": m.sum(axis=1).astype(jnp.float32).mean(),
        "eos_rate": exp.ended.astype(jnp.float32).mean(),
        "frac_zero_std": jnp.mean(jnp.all(grouped == grouped[:, :1], axis=1).astype(jnp.float32)),
        **stats,
    }
    return new_state.replace(rng=rng, iteration=state.iteration + 1), metrics


def make_grpo_iteration(models: GRPOModels, cfg: GRPOConfig):
    """``jax.jit``-compiled ``grpo_iteration`` closed over the static models and config; the state
    argument is donated."""
    return jax.jit(lambda state, prompt_ids, prompt_mask, ptx_tokens=None, ptx_mask=None:
                   grpo_iteration(models, cfg, state, prompt_ids, prompt_mask, ptx_tokens, ptx_mask),
                   donate_argnums=(0,))
