"""Masked reductions shared by the losses and the advantage code.

Masks are float or bool arrays broadcastable to ``x`` (usually both ``[batch, time]``); a
position counts when its mask is non-zero. Masked-out entries are excluded with ``jnp.where``,
so a NaN or inf sitting at a padded position never leaks into the result.

Under ``jax.jit`` with sharded inputs the reductions are global (GSPMD inserts the
cross-device sums), so a sharded call returns what the unsharded call returns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Axis = int | tuple[int, ...] | None


def _float(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def _select(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(x with masked-out entries set to 0, 0/1 weights)``, both in ``x``'s float dtype."""
    x = _float(x)
    keep = jnp.broadcast_to(jnp.asarray(mask) != 0, x.shape)
    return jnp.where(keep, x, 0), keep.astype(x.dtype)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None, *, keepdims: bool = False) -> jax.Array:
    """Mean of ``x`` over the positions where ``mask`` is non-zero.

    ``axis=None`` averages over every masked entry of the array (a token mean, not a mean of
    per-row means). Where no entry is selected the result is 0, not NaN.
    """
    xs, w = _select(x, mask)
    total = jnp.sum(xs, axis=axis, keepdims=keepdims)
    count = jnp.sum(w, axis=axis, keepdims=keepdims)
    return total / jnp.maximum(count, 1)


def masked_var(x: jax.Array, mask: jax.Array, axis: Axis = None, *, unbiased: bool = True) -> jax.Array:
    """Variance of ``x`` over the positions where ``mask`` is non-zero.

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` (TRL's ``masked_var``);
    ``unbiased=False`` is the population variance (Ziegler et al. 2019, ``tf.nn.moments``).
    With one selected entry (or none) the variance is 0.
    """
    x = _float(x)
    mean = masked_mean(x, mask, axis, keepdims=True)
    var = masked_mean(jnp.square(x - mean), mask, axis)
    if unbiased:
        n = jnp.sum(_select(x, mask)[1], axis=axis)
        var = var * n / jnp.maximum(n - 1, 1)
    return var
