"""Losses of the three InstructGPT stages: SFT, the K-way reward model, and PPO-ptx.

All functions are pure and jittable. Log-softmax runs in float32 (float64 when the logits are
float64); every loss is a masked mean with its mask explicit.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp

from rlhf_jax.masked import masked_mean, masked_var


def _log_softmax(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return jax.nn.log_softmax(logits.astype(dtype) / temperature, axis=-1)


def logprobs_of(logits: jax.Array, targets: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """``log softmax(logits / temperature)[..., targets]``.

    Args:
      logits: ``[batch, n, vocab]``, already aligned with ``targets`` (no shift here).
      targets: ``[batch, n]`` int token ids in ``[0, vocab)`` (positions that a mask will drop
        may hold anything; they give a finite value or NaN, never an error).
      temperature: the sampling temperature; divide by it in every log-prob that enters PPO
        (rollout, reference, new policy) — see instructgpt.md, "Pitfalls".

    Returns:
      ``[batch, n]`` log-probs in float32.
    """
    chex.assert_rank(logits, 3, custom_message="logprobs_of: `logits` must be [batch, n, vocab]")
    chex.assert_shape(targets, logits.shape[:2],
                      custom_message="logprobs_of: `targets` must be [batch, n] matching `logits`")
    logp = _log_softmax(logits, temperature)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Next-token log-probs: ``logits[:, t]`` scores ``tokens[:, t + 1]``.

    Args:
      logits: ``[batch, time, vocab]`` from a causal LM run on ``tokens``.
      tokens: ``[batch, time]``.

    Returns:
      ``[batch, time − 1]``; entry ``t`` is ``log p(tokens[:, t + 1] | tokens[:, :t + 1])``.
    """
    chex.assert_rank(logits, 3, custom_message="token_logprobs: `logits` must be [batch, time, vocab]")
    chex.assert_shape(tokens, logits.shape[:2],
                      custom_message="token_logprobs: `tokens` must be [batch, time] matching `logits`")
    return logprobs_of(logits[:, :-1], tokens[:, 1:], temperature)


def token_entropy(logits: jax.Array, temperature: float | jax.Array = 1.0) -> jax.Array:
    """Entropy of ``softmax(logits / temperature)`` at every position: ``[b, n, V]`` -> ``[b, n]``."""
    chex.assert_rank(logits, 3, custom_message="token_entropy: `logits` must be [batch, n, vocab]")
    logp = _log_softmax(logits, temperature)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_logprobs(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,
    targets: jax.Array,
    chunk: int,
    temperature: float | jax.Array = 1.0,
    *,
    with_entropy: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """``logprobs_of`` / ``token_entropy`` of ``logits_fn(hidden)`` computed ``chunk`` time steps at
    a time, so the ``[batch, n, vocab]`` float32 logits are never held whole.

    Each chunk's body is rematerialised (``jax.checkpoint``), so under ``grad`` the backward
    pass recomputes one chunk's logits at a time too, and only ``hidden`` is saved.  Equal to
    ``logprobs_of(logits_fn(hidden), targets)`` up to float rounding (tests/test_losses.py).

    Args:
      logits_fn: ``[batch, c, d] -> [batch, c, vocab]`` float32 (``model.unembed_fn``).
      hidden: ``[batch, n, d]`` final hidden states aligned with ``targets``.
      targets: ``[batch, n]`` int.
      chunk: time steps per chunk (at most ``n``; ``n`` is padded up to a multiple).

    Returns:
      ``(logprobs [batch, n], entropy [batch, n] or None)`` float32.
    """
    chex.assert_rank(hidden, 3, custom_message="chunked_logprobs: `hidden` must be [batch, n, d]")
    chex.assert_shape(targets, hidden.shape[:2],
                      custom_message="chunked_logprobs: `targets` must be [batch, n] matching `hidden`")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunked_logprobs: chunk must be an int >= 1 (got {chunk!r})")
    b, n, d = hidden.shape
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n_chunks, chunk, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        logits = logits_fn(args[0])
        logp = logprobs_of(logits, args[1], temperature)
        return logp, (token_entropy(logits, temperature) if with_entropy else None)

    logp, entropy = jax.lax.map(one, (h, t))
    unchunk = lambda x: None if x is None else x.swapaxes(0, 1).reshape(b, n_chunks * chunk)[:, :n]  # noqa: E731
    return unchunk(logp), unchunk(entropy)


def _next_token_nll(fn: str, logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    chex.assert_shape(mask, tokens.shape, custom_message=f"{fn}: mask must be [batch, time] like `tokens`")
    return -masked_mean(token_logprobs(logits, tokens), mask[:, 1:])


def sft_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Next-token cross entropy, a mean over the target tokens that count (InstructGPT §3.5).

    Alignment: ``logits[:, t]`` predicts ``tokens[:, t + 1]``. ``loss_mask`` is aligned with
    ``tokens`` and marks *targets*: ``loss_mask[:, t] = 1`` means "predicting ``tokens[:, t]``
    counts", so ``loss_mask[:, 0]`` is never used. To train on the response only, set
    ``loss_mask`` to 1 on response tokens (and the EOS) and 0 on the prompt and on padding.

    Args:
      logits: ``[batch, time, vocab]``; tokens: ``[batch, time]``; loss_mask: ``[batch, time]``.

    Returns:
      A scalar: the mean over all counted target tokens of the batch.
    """
    return _next_token_nll("sft_loss", logits, tokens, loss_mask)


def ptx_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Pretraining LM loss ``−E[log π(x)]`` of PPO-ptx (InstructGPT eq. 2), a token mean.

    Same alignment as ``sft_loss``: ``logits[:, t]`` predicts ``tokens[:, t + 1]`` and ``mask``
    (aligned with ``tokens``, typically the non-pad mask) marks which targets count.

    The scale of γ depends on this averaging. Here the loss is a per-token mean, so γ weighs one
    average token against the PPO loss. InstructGPT's γ = 27.8 (App. C.4) was tuned with their
    own (unpublished) normalisation; DeepSpeed-Chat found γ = 27.8 unstable with a per-token
    mean, so pick γ for this normalisation rather than copying the paper's number.
    """
    return _next_token_nll("ptx_loss", logits, tokens, mask)


def ranking_pairs(mask: jax.Array, ranks: jax.Array | None = None) -> jax.Array:
    """``[batch, K, K]`` bool, the pairs ``ranking_loss`` averages over: ``[b, i, j]`` when
    response ``i`` beats ``j`` and both are valid (``mask`` ``[batch, K]`` != 0).  Without
    ``ranks`` responses are best-first (``i < j``); with ``ranks`` ``[batch, K]`` (smaller = better)
    ``ranks[i] < ranks[j]``, so a tie is no pair."""
    valid = mask != 0
    if ranks is None:
        k = mask.shape[1]
        better = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]
    else:
        better = ranks[:, :, None] < ranks[:, None, :]
    return better & valid[:, :, None] & valid[:, None, :]


def ranking_loss(
    rewards: jax.Array,
    mask: jax.Array,
    *,
    margin: float | jax.Array = 0.0,
    centering_coef: float | jax.Array = 0.0,
    ranks: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """K-way reward-model loss (InstructGPT eq. 1): all C(K, 2) pairs of a prompt in one element.

    For prompt ``b`` with valid pairs ``P_b`` (``i`` better than ``j``, both valid):
    ``loss_b = −1/|P_b| · Σ_{(i,j)∈P_b} log σ(r_i − r_j − margin)``; the loss is the mean of
    ``loss_b`` over prompts with ``|P_b| > 0`` (each prompt weighs the same; a prompt with fewer
    than two valid responses, or with all of them tied, is left out). With no pair in the batch
    the ranking part is 0.

    Ordering: without ``ranks`` responses are best-first, so ``i`` beats ``j`` when ``i < j``.
    With ``ranks`` (int, smaller = better) ``i`` beats ``j`` when ``ranks[i] < ranks[j]``; a pair of
    equal rank is dropped and ``|P_b|`` counts only the remaining pairs (ties are unspecified in
    the paper; see instructgpt.md).

    ``centering_coef > 0`` adds ``centering_coef · mean(r²)`` over the valid responses of the
    batch (reward centering, Eisenstein et al. 2023), which pins the reward's free offset near 0.

    Args:
      rewards: ``[batch, K]`` scalar rewards.
      mask: ``[batch, K]`` 1 for a real response, 0 for padding.
      margin: subtracted from every pair's reward difference.
      ranks: optional ``[batch, K]`` int ranks.

    Returns:
      ``(loss, accuracy)``; accuracy is the fraction of all valid pairs of the batch with
      ``r_i > r_j`` (strictly), regardless of the margin.
    """
    chex.assert_rank(rewards, 2, custom_message="ranking_loss: `rewards` must be [batch, K]")
    chex.assert_equal_shape([rewards, mask], custom_message="ranking_loss: `mask` must be [batch, K] like `rewards`")
    if ranks is not None:
        chex.assert_equal_shape([rewards, ranks],
                                custom_message="ranking_loss: `ranks` must be [batch, K] like `rewards`")
    rewards = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32))
    valid = mask != 0
    pairs = ranking_pairs(mask, ranks)
    diff = rewards[:, :, None] - rewards[:, None, :]
    nll = -jax.nn.log_sigmoid(jnp.where(pairs, diff, 0) - margin)
    per_prompt = masked_mean(nll, pairs, axis=(1, 2))
    has_pairs = jnp.any(pairs, axis=(1, 2))
    loss = masked_mean(per_prompt, has_pairs)
    accuracy = masked_mean((diff > 0).astype(rewards.dtype), pairs)
    return loss + centering_coef * masked_mean(jnp.square(rewards), valid), accuracy


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float | jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate (Schulman et al. 2017; Ziegler et al. 2019), a token mean.

    ``loss = masked_mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))`` with ``ρ = exp(logπ − logπ_old)``.

    Args:
      logprobs, old_logprobs, advantages, mask: ``[batch, time]``; entries outside the mask are
        ignored (even if not finite).
      clip_eps: ε (0.2 in InstructGPT App. C.4).

    Returns:
      ``(loss, stats)`` with stats ``clipfrac`` (fraction of tokens where the clipped term is the
      larger one), ``approx_kl`` (mean ½(log ρ)²), ``approx_kl_k3`` (mean (ρ − 1) − log ρ) and
      ``ratio_mean``.
    """
    for name, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        chex.assert_equal_shape([logprobs, x],
                                custom_message=f"ppo_policy_loss: `{name}` must be [batch, time] like `logprobs`")
    keep = mask != 0
    log_ratio = jnp.where(keep, logprobs - old_logprobs, 0)
    ratio = jnp.exp(log_ratio)
    adv = jnp.where(keep, advantages, 0)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).astype(ratio.dtype), mask),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
        "approx_kl_k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, jax.lax.stop_gradient(stats)


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float | jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped value loss ``½·masked_mean(max((v − R)², (clip(v, v_old ± ε) − R)²))``.

    The clipped form is Ziegler et al. 2019's (and TRL's); ``clip_eps=None`` gives the plain
    ``½·masked_mean((v − R)²)``.

    Args:
      values: ``[batch, time]`` new predictions; old_values: the rollout's predictions;
      returns: GAE returns; mask: ``[batch, time]``.

    Returns:
      ``(loss, stats)`` with stats ``vf_clipfrac`` (fraction of tokens where the clipped term is
      the larger one; 0 when unclipped).
    """
    for name, x in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        chex.assert_equal_shape([values, x],
                                custom_message=f"value_loss: `{name}` must be [batch, time] like `values`")
    keep = mask != 0
    v = jnp.where(keep, values, 0)
    ret = jnp.where(keep, returns, 0)
    unclipped = jnp.square(v - ret)
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"vf_clipfrac": jnp.zeros((), unclipped.dtype)}
    v_old = jnp.where(keep, old_values, 0)
    clipped = jnp.square(jnp.clip(v, v_old - clip_eps, v_old + clip_eps) - ret)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    stats = {"vf_clipfrac": masked_mean((clipped > unclipped).astype(unclipped.dtype), mask)}
    return loss, jax.lax.stop_gradient(stats)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """``1 − Var[R − V] / Var[R]`` over the masked entries (population variances).

    1 is a perfect value function, 0 no better than a constant. Undefined when the returns are
    constant; 0 is returned then, so a NaN check on metrics still means something.
    """
    chex.assert_equal_shape([values, returns, mask],
                            custom_message="explained_variance: `values`, `returns`, `mask` must share one shape")
    var_r = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), 0.0)
