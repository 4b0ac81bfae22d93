"""The GRPO family of clipped policy losses: GRPO, BNPO, Dr. GRPO, DAPO and GSPO, plus RLOO's
sequence-level ratio, as one pure function.

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

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.advantages import kl_penalty
from rlhf_jax.masked import masked_mean

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
