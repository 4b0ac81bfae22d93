"""The generic train state: parameters, optimiser state, step counter and RNG key as one pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState"]


@flax.struct.dataclass
class TrainState:
    """params, opt_state, step (int32 scalar, counts ``apply_gradients`` calls) and rng (a PRNG key).

    ``tx`` is static (not a pytree leaf), so the state passes through ``jax.jit`` and orbax as arrays
    only. Stages add their own parts (frozen reference params, KL-controller state) by subclassing
    with ``@flax.struct.dataclass`` and passing the extra fields to ``create`` as keywords.
    """

    params: Any
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array, **extra: Any) -> "TrainState":
        """A fresh state at step 0 with ``tx.init(params)`` as optimiser state."""
        return cls(
            params=params,
            opt_state=tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=rng,
            tx=tx,
            **extra,
        )

    def apply_gradients(self, grads: Any) -> "TrainState":
        """One optimiser update: θ ← θ + tx.update(grads, opt_state, θ); step + 1."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1)
