"""Next-token sampling: temperature, top-k and nucleus (top-p) filtering of logits.

Pure functions of arrays; ``top_k``/``top_p`` are static Python numbers (they fix shapes or
select code paths), ``temperature`` may be a Python float or a traced scalar.

The filters are applied in Hugging Face ``transformers``' order: divide by the temperature,
keep the top-k, then keep the nucleus of the *renormalised* top-k distribution (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration").

Which log-probs are recorded for training: the rollout stores ``log softmax(logits / T)`` of the
sampled token under the temperature-scaled *unfiltered* distribution, not under the top-k/top-p
distribution it was actually drawn from. Training recomputes exactly that quantity from a
forward pass (``losses.logprobs_of(logits, targets, T)``), which is what TRL and the N+
reproduction do; with ``top_k=0, top_p=1`` (InstructGPT's temperature-1 sampling, App. C.4) the
two coincide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check(temperature: float | Array, top_k: int, top_p: float) -> None:
    if isinstance(temperature, (int, float)) and temperature < 0:
        raise ValueError(f"sampling: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sampling: top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling: top_p must be in (0, 1] (1 = off), got {top_p!r}")


def filter_logits(
    logits: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Array:
    """Temperature-scaled logits with every token outside the kept set at ``-inf``.

    Args:
      logits: ``[..., vocab]``.
      temperature: ``logits / temperature``; 0 keeps only the argmax (the T -> 0 limit) and
        leaves its logit unscaled.
      top_k: keep exactly the ``min(top_k, vocab)`` largest logits, ties broken towards the lower
        token id; 0 keeps all.
      top_p: keep the smallest set of most probable tokens whose probability (under the
        top-k-filtered softmax) sums to at least ``top_p``; the most probable token is always
        kept; ties are ordered by token id. 1 keeps all.

    Returns:
      ``[..., vocab]`` float32 logits; ``softmax`` of them is the sampling distribution.
    """
    _check(temperature, top_k, top_p)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    vocab = logits.shape[-1]
    if isinstance(temperature, (int, float)) and temperature == 0:
        top_k, top_p = 1, 1.0
    else:
        logits = logits / temperature
    if 0 < top_k < vocab:
        _, idx = jax.lax.top_k(logits, top_k)
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, True, axis=-1, inplace=False)
        logits = jnp.where(keep, logits, -jnp.inf)
    if top_p < 1.0:
        sorted_logits, idx = jax.lax.top_k(logits, vocab)  # descending, ties by lower id
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # the first token always has mass_before = 0
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), idx, keep_sorted, axis=-1, inplace=False)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def greedy_token(logits: Array, row_max: Array | None = None) -> Array:
    """``argmax`` over the last axis, the lowest id among ties (like ``torch.argmax``).

    Computed as the row max, then the smallest index holding it: two plain reductions, which
    XLA:CPU runs several times faster than ``jnp.argmax``'s (value, index) pair reduction.

    Args:
      logits: ``[..., vocab]``.
      row_max: ``logits.max(-1, keepdims=True)`` when the caller already has it (``[..., 1]``).

    Returns:
      ``[...]`` int32 token ids.
    """
    if row_max is None:
        row_max = jnp.max(logits, axis=-1, keepdims=True)
    vocab = logits.shape[-1]
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    first = jnp.min(jnp.where(logits == row_max, ids, vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)  # a NaN row matches nothing; keep the id in range


def sample_token(
    key: Array,
    logits: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> Array:
    """Draw one token per row from ``softmax(filter_logits(logits, ...))``.

    Args:
      key: a PRNG key (unused when greedy).
      logits: ``[batch, vocab]``.
      greedy: take the argmax (lowest id among ties, like ``torch.argmax``); so does
        ``temperature == 0``.

    Returns:
      ``[batch]`` int32 token ids.
    """
    _check(temperature, top_k, top_p)
    if greedy or (isinstance(temperature, (int, float)) and temperature == 0):
        return greedy_token(logits)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
