"""Per-token rewards, generalised advantage estimation and whitening.

All functions are pure and jittable. Arrays are ``[batch, time]`` over the *response* tokens;
masks are float or bool ``[batch, time]`` with 1 at real response tokens, usually one contiguous
run of ones per row (right padding, left padding or none). In ``gae`` a 0 ends the episode, so a
row with several runs holds several episodes.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean, masked_var

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def _check_bt(fn: str, **arrays: jax.Array) -> None:
    """Every array is rank 2 and all have one shape ``[batch, time]``."""
    names = list(arrays)
    for name, x in arrays.items():
        chex.assert_rank(x, 2, custom_message=f"{fn}: `{name}` must be [batch, time]")
    chex.assert_equal_shape(
        list(arrays.values()),
        custom_message=f"{fn}: `{'`, `'.join(names)}` must share one shape [batch, time]")


def last_index(mask: jax.Array) -> jax.Array:
    """Index of the last non-zero entry of each row of ``mask`` ``[batch, time]`` -> ``[batch]``.

    A row with no non-zero entry gives -1.
    """
    chex.assert_rank(mask, 2, custom_message="last_index: `mask` must be [batch, time]")
    t = jnp.arange(mask.shape[1])
    return jnp.max(jnp.where(jnp.asarray(mask) != 0, t, -1), axis=1)


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, kl_estimator: KLEstimator = "k1") -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs (elementwise).

    With ``log r = ref_logprobs − logprobs`` (Schulman, "Approximating KL divergence", 2020):
    ``k1 = −log r``, ``k2 = ½ (log r)²``, ``k3 = (r − 1) − log r``. ``k1`` is the penalty of
    InstructGPT eq. 2 and Ziegler et al. 2019; ``k1``/``k3`` match TRL's ``kl_estimator``.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    log_r = ref_logprobs - logprobs
    if kl_estimator == "k1":
        return -log_r
    if kl_estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.expm1(log_r) - log_r


def per_token_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float | jax.Array,
    kl_estimator: KLEstimator = "k1",
    score_index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Rewards ``r_t = −β·kl_t·mask_t + score·[t = score_index]`` (InstructGPT eq. 2).

    Args:
      scores: ``[batch]`` reward-model score of each whole response.
      logprobs: ``[batch, time]`` log π(y_t | ·) of the sampled tokens under the rollout policy.
      ref_logprobs: ``[batch, time]`` the same under the reference (SFT) policy.
      mask: ``[batch, time]`` 1 at real response tokens.
      kl_coef: β (may be a traced scalar, e.g. the adaptive controller's ``KLState.coef``).
      kl_estimator: ``"k1"``, ``"k2"`` or ``"k3"``, see ``kl_penalty``.
      score_index: ``[batch]`` int position that receives the score. Default: the last real
        token (``last_index(mask)``, Stiennon et al. 2020); TRL uses one position after it.
        An index outside ``[0, time)`` (e.g. -1 for an empty row) drops the score.

    Returns:
      ``(rewards, kl)``, both ``[batch, time]``; ``kl`` is 0 outside the mask (entries there
      are ignored, even if they are not finite).
    """
    _check_bt("per_token_rewards", logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    chex.assert_shape(scores, (logprobs.shape[0],),
                      custom_message="per_token_rewards: `scores` must be [batch]")
    if score_index is None:
        score_index = last_index(mask)
    chex.assert_shape(score_index, (logprobs.shape[0],),
                      custom_message="per_token_rewards: `score_index` must be [batch]")
    kl = jnp.where(mask != 0, kl_penalty(logprobs, ref_logprobs, kl_estimator), 0)
    at_score = jax.nn.one_hot(score_index, logprobs.shape[1], dtype=kl.dtype)
    rewards = -kl_coef * kl + scores[:, None].astype(kl.dtype) * at_score
    return rewards, kl


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation (Schulman et al. 2016), as a reverse ``lax.scan``.

    ``δ_t = r_t + γ V_{t+1} − V_t``, ``A_t = δ_t + γλ A_{t+1}``, where ``V`` and ``A`` after the
    last real token are 0 (the episode ends there). InstructGPT uses γ = 1 (App. C.4); λ = 0.95 in
    Ziegler et al. 2019 and the reproductions.

    Args:
      rewards, values, mask: ``[batch, time]``.

    Returns:
      ``(advantages, returns)``, ``[batch, time]``, with ``returns = advantages + values``;
      both are 0 outside the mask.
    """
    _check_bt("gae", rewards=rewards, values=values, mask=mask)
    rewards, values = jnp.asarray(rewards), jnp.asarray(values)
    keep = mask != 0
    dtype = jnp.result_type(rewards.dtype, values.dtype, jnp.float32)
    m = keep.astype(dtype)
    r = jnp.where(keep, rewards, 0).astype(dtype)
    v = jnp.where(keep, values, 0).astype(dtype)
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
    next_m = jnp.pad(m[:, 1:], ((0, 0), (0, 1)))
    delta = r + gamma * next_v - v

    def step(next_adv, inputs):
        delta_t, next_m_t = inputs
        adv = delta_t + gamma * lam * next_m_t * next_adv
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[0], dtype), (delta.T, next_m.T), reverse=True)
    advantages = adv.T * m
    return advantages, (advantages + v) * m


def whiten(
    x: jax.Array,
    mask: jax.Array,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """Masked whitening ``(x − μ)·rsqrt(σ² + eps)`` (+ μ when ``shift_mean=False``).

    μ and σ² are taken over all masked entries of the whole array (not per row).
    ``shift_mean=False`` rescales around the mean and adds the mean back, so the mean is kept
    (Ziegler et al. 2019 ``whiten``; TRL ``masked_whiten``) — used for reward whitening.
    ``unbiased`` chooses Bessel-corrected (TRL) or population (Ziegler et al. 2019) variance.
    Entries outside the mask are returned as 0.

    Under ``jax.jit`` with sharded inputs the mean and variance are global reductions (GSPMD),
    so sharded equals unsharded: whitening is over the whole batch, never per device.
    """
    chex.assert_equal_shape([x, mask], custom_message="whiten: `x` and `mask` must share one shape")
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask != 0, out, 0)
