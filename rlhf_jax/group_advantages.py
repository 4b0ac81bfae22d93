"""Critic-free advantages from G sampled responses per prompt: GRPO's group baseline and RLOO's
leave-one-out baseline.

Both functions take one scalar reward per response, ``rewards [B]`` with ``B = n_prompts ·
group_size``, where the G responses of one prompt are consecutive rows (rows ``g·G … g·G + G − 1``
belong to prompt ``g``: TRL's ``repeat_interleave`` layout). They return one advantage per
response, ``[B]``, which the policy loss broadcasts over that response's tokens.

An optional ``mask [B]`` drops unscorable responses: a masked row gets advantage 0 and is left out
of every mean, standard deviation and baseline (TRL 1.16.0 marks such rows NaN and uses NaN-aware
reductions; this is the same arithmetic). Pure and jittable; ``group_size`` and ``scale`` are static.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean, masked_var

GroupScale = Literal["group", "batch", "none"]
GROUP_SCALES: tuple[str, ...] = ("group", "batch", "none")


def _grouped(fn: str, rewards: jax.Array, group_size: int,
             mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``rewards`` and its 0/1 mask as ``[n_prompts, group_size]`` float arrays, after checks."""
    chex.assert_rank(rewards, 1, custom_message=f"{fn}: `rewards` must be [B]")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{fn}: group_size must be an int >= 1, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{fn}: the batch of {rewards.shape[0]} rewards is not a whole number of groups "
                         f"of group_size={group_size}")
    rewards = jnp.asarray(rewards)
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    if mask is None:
        keep = jnp.ones(rewards.shape, bool)
    else:
        chex.assert_shape(mask, rewards.shape, custom_message=f"{fn}: `mask` must be [B] like `rewards`")
        keep = jnp.asarray(mask) != 0
    grouped = jnp.where(keep, rewards, 0).reshape(-1, group_size)
    return grouped, keep.reshape(-1, group_size).astype(rewards.dtype)


def _standardise(x: jax.Array, keep: jax.Array, std: jax.Array, eps: float) -> jax.Array:
    return jnp.where(keep != 0, x / (std + eps), 0)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: GroupScale = "group",
    eps: float = 1e-4,
    mask: jax.Array | None = None,
) -> jax.Array:
    """GRPO's group-relative advantage ``A_i = (r_i − mean(r_group)) / (std + eps)``.

    * ``scale="group"``: ``std`` is the group's (DeepSeekMath, Shao et al. 2024, §4.1.2 outcome
      supervision; TRL's default ``scale_rewards="group"``).
    * ``scale="batch"``: ``std`` is the whole batch's while the mean stays the group's (Hu et al.
      2025, REINFORCE++-baseline; TRL's ``scale_rewards="batch"``).
    * ``scale="none"``: no division, ``A_i = r_i − mean(r_group)`` (Dr. GRPO, Liu et al. 2025, §3.2:
      the std division weights prompts by how easy or hard they are).

    ``std`` is Bessel-corrected, as ``torch.std`` in DeepSeekMath's and TRL's code, and ``eps`` is
    added to the std (not the variance), as in TRL 1.16.0. A group of identical rewards gets
    advantage 0; with ``group_size=1`` (or one unmasked response) every advantage is 0.

    Args:
      rewards: ``[B]`` one scalar reward per response, groups of ``group_size`` consecutive rows.
      group_size: G, the responses sampled per prompt (static).
      scale: ``"group"``, ``"batch"`` or ``"none"`` (static).
      eps: added to the standard deviation.
      mask: optional ``[B]``; 0 marks an unscorable response (advantage 0, left out of the
        statistics).

    Returns:
      ``[B]`` advantages (float32, or float64 for float64 rewards).
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {GROUP_SCALES}, got {scale!r}")
    grouped, keep = _grouped("group_advantages", rewards, group_size, mask)
    centred = grouped - masked_mean(grouped, keep, axis=1, keepdims=True)
    if scale == "none":
        adv = jnp.where(keep != 0, centred, 0)
    elif scale == "group":
        adv = _standardise(centred, keep, jnp.sqrt(masked_var(grouped, keep, axis=1))[:, None], eps)
    else:
        adv = _standardise(centred, keep, jnp.sqrt(masked_var(grouped, keep)), eps)
    return adv.reshape(-1)


def rloo_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    normalize: bool = False,
    eps: float = 1e-4,
    mask: jax.Array | None = None,
) -> jax.Array:
    """REINFORCE leave-one-out advantage ``A_i = r_i − 1/(G − 1) · Σ_{j≠i} r_j`` (Kool et al. 2019;
    RLOO in Ahmadian et al. 2024, eq. 6).

    The baseline of response ``i`` is the mean reward of the *other* responses to the same prompt,
    so it is independent of ``y_i`` and the estimator stays unbiased. ``normalize=True`` then
    standardises the advantages over the whole batch, ``(A − mean(A)) / (std(A) + eps)`` with a
    Bessel-corrected std (TRL's ``RLOOConfig.normalize_advantages``, off by default).

    RLOO folds the KL penalty into the reward before the baseline (Ahmadian et al. 2024, §3; TRL:
    ``r − β·Σ_t (log π_old − log π_ref)``, the k1 estimate summed over the response): pass that
    penalised reward here.

    Args:
      rewards: ``[B]`` one scalar reward per response, groups of ``group_size`` consecutive rows.
      group_size: G (static). With G = 1 there is no baseline and every advantage is 0 (TRL).
      normalize: standardise over the batch afterwards (static).
      eps: added to the standard deviation when normalising.
      mask: optional ``[B]``; 0 marks an unscorable response: advantage 0, and it is not one of its
        siblings' "others" (the baseline averages the scorable others; with none, the advantage is 0).

    Returns:
      ``[B]`` advantages.
    """
    grouped, keep = _grouped("rloo_advantages", rewards, group_size, mask)
    others = jnp.sum(keep, axis=1, keepdims=True) - 1
    baseline = (jnp.sum(grouped, axis=1, keepdims=True) - grouped) / jnp.maximum(others, 1)
    keep = keep * (others > 0)
    adv = jnp.where(keep != 0, grouped - baseline, 0).reshape(-1)
    keep = keep.reshape(-1)
    if normalize:
        adv = _standardise(adv - masked_mean(adv, keep), keep, jnp.sqrt(masked_var(adv, keep)), eps)
    return adv
