"""Exponential moving average of parameters, as a pure update.

InstructGPT evaluates an EMA of the PPO policy's weights (Ouyang et al. 2022, App. C.4: "we use
an exponential moving average of the weights with a decay of 0.992"; not in the paper's
equations, so no bias correction and the EMA starts at the initial weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

INSTRUCTGPT_EMA_DECAY = 0.992  # InstructGPT App. C.4


def ema_update(ema_params: Any, params: Any, decay: float | jax.Array = INSTRUCTGPT_EMA_DECAY) -> Any:
    """``ema ← decay · ema + (1 − decay) · params``, leaf by leaf.

    Args:
      ema_params: the running average, a pytree (e.g. initialised as a copy of ``params``).
      params: the current weights, a pytree of the same structure and shapes.
      decay: in ``[0, 1]``; may be a traced scalar. 0 copies ``params``, 1 keeps ``ema_params``.

    Returns:
      The new average, with each leaf in its ``ema_params`` dtype (so a float32 EMA of bfloat16
      weights stays float32). Jittable; under ``jax.jit`` with sharded inputs each leaf keeps the
      sharding of its inputs, as the update is elementwise.
    """
    if isinstance(decay, (int, float)) and not 0 <= decay <= 1:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay!r}")
    if jax.tree_util.tree_structure(ema_params) != jax.tree_util.tree_structure(params):
        raise ValueError("ema_update: `ema_params` and `params` must be pytrees of one structure, got "
                         f"{jax.tree_util.tree_structure(ema_params)} and {jax.tree_util.tree_structure(params)}")

    def update(ema: jax.Array, p: jax.Array) -> jax.Array:
        if jnp.shape(ema) != jnp.shape(p):
            raise ValueError(f"ema_update: leaf shapes differ, {jnp.shape(ema)} (ema) vs {jnp.shape(p)} (params)")
        ema = jnp.asarray(ema)
        return (ema + (1 - decay) * (jnp.asarray(p, ema.dtype) - ema)).astype(ema.dtype)

    return jax.tree_util.tree_map(update, ema_params, params)
