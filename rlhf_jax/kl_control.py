"""KL coefficient control: a fixed β or Ziegler et al. 2019's adaptive controller (§2.2).

The controller's state is a pytree (``KLState``) carried in the PPO train state; ``update_kl`` is
a pure function of it, so a whole PPO iteration can stay one compiled program. ``cfg`` is a
frozen (hashable) dataclass: pass it as a static argument or close over it under ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.errors import check

KL_CONTROLLER_KINDS: tuple[str, ...] = ("fixed", "adaptive")


@dataclasses.dataclass(frozen=True)
class KLControllerConfig:
    """How β, the weight of the per-token KL penalty, evolves.

    Attributes:
      kind: ``"fixed"`` (InstructGPT, App. C.4) or ``"adaptive"`` (Ziegler et al. 2019, §2.2).
      init_kl_coef: β at the start; 0.02 is InstructGPT's fixed β (App. C.4).
      target: the adaptive controller's target KL in nats per sequence (Ziegler et al. 2019 use
        6 for stylistic continuation).
      horizon: the adaptive controller's horizon K_β in episodes (10000 in Ziegler et al. 2019).
    """

    kind: Literal["fixed", "adaptive"] = "fixed"
    init_kl_coef: float = 0.02
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        check(self.kind in KL_CONTROLLER_KINDS, self, "kind", f"one of {KL_CONTROLLER_KINDS}")
        check(math.isfinite(self.init_kl_coef) and self.init_kl_coef >= 0, self, "init_kl_coef", "finite and >= 0")
        check(math.isfinite(self.target) and self.target > 0, self, "target", "finite and > 0")
        check(isinstance(self.horizon, int) and not isinstance(self.horizon, bool) and self.horizon > 0,
              self, "horizon", "an int > 0")


@flax.struct.dataclass
class KLState:
    """The controller's state: ``coef`` is the current β (a float32 scalar array)."""

    coef: jax.Array


def init_kl_state(cfg: KLControllerConfig) -> KLState:
    """β = ``cfg.init_kl_coef``."""
    return KLState(coef=jnp.asarray(cfg.init_kl_coef, jnp.float32))


def update_kl(
    cfg: KLControllerConfig,
    state: KLState,
    observed_kl: float | jax.Array,
    n_steps: int | jax.Array,
) -> KLState:
    """One controller step after ``n_steps`` episodes with mean per-sequence KL ``observed_kl``.

    Adaptive (Ziegler et al. 2019, §2.2): ``e = clip(KL / target − 1, −0.2, 0.2)``,
    ``β ← β · (1 + e · n_steps / horizon)``. Fixed: β is unchanged.
    """
    if cfg.kind == "fixed":
        return state
    error = jnp.clip(observed_kl / cfg.target - 1.0, -0.2, 0.2)
    coef = state.coef * (1.0 + error * n_steps / cfg.horizon)
    return state.replace(coef=coef.astype(state.coef.dtype))
