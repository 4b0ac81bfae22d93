"""Optimiser: AdamW with warmup + constant/cosine/linear schedule, clipping, accumulation.

InstructGPT (Ouyang et al. 2022, App. C) uses Adam with β1 = 0.9, β2 = 0.95; SFT and RM decay the
learning rate with a cosine to 10% of its peak (C.1, C.2); the PPO policy uses a constant rate
after a 10-iteration warmup starting from 0.1× the peak (C.4). Adam ε = 1e-5 follows the
reproductions (see shared/instructgpt.md, "N").
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.errors import check

__all__ = ["OptimizerConfig", "make_schedule", "make_optimizer", "decay_mask"]

SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters; steps count optimiser updates (after gradient accumulation)."""

    lr: float = 9e-6  # IG App. C.2: RM and value-function lr 9e-6
    warmup_steps: int = 0  # IG C.1/C.2: no warmup for SFT/RM; C.4: 10 PPO iterations
    schedule: Literal["constant", "cosine", "linear"] = "constant"  # IG C.4 policy: constant
    total_steps: int | None = None  # needed by cosine/linear: the step where decay ends
    final_lr_fraction: float = 0.1  # IG App. C.1/C.2: cosine decay to 10% of the peak
    warmup_init_fraction: float = 0.1  # IG C.4: warmup starts from 0.1 x the peak
    b1: float = 0.9  # IG App. C
    b2: float = 0.95  # IG App. C
    eps: float = 1e-5  # reproductions "N" (shared/instructgpt.md): TF-style Adam eps
    weight_decay: float = 0.0  # IG silent
    clip_norm: float | None = None  # global-norm clipping of the (accumulated) gradient; None = off
    grad_accum_steps: int = 1  # > 1: optax.MultiSteps averages this many micro-batch gradients

    def __post_init__(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, self, "lr", "finite and > 0")
        check(self.warmup_steps >= 0, self, "warmup_steps", ">= 0")
        check(self.schedule in SCHEDULES, self, "schedule", f"one of {SCHEDULES}")
        if self.schedule != "constant":
            check(self.total_steps is not None and self.total_steps > self.warmup_steps,
                  self, "total_steps", f"an int > warmup_steps ({self.warmup_steps}) for schedule={self.schedule!r}")
        else:
            check(self.total_steps is None or self.total_steps >= 1, self, "total_steps", "None or >= 1")
        for name in ("final_lr_fraction", "warmup_init_fraction"):
            check(0.0 <= getattr(self, name) <= 1.0, self, name, "in [0, 1]")
        for name in ("b1", "b2"):
            check(0.0 <= getattr(self, name) < 1.0, self, name, "in [0, 1)")
        check(self.eps > 0, self, "eps", "> 0")
        check(math.isfinite(self.weight_decay) and self.weight_decay >= 0, self, "weight_decay", "finite and >= 0")
        check(self.clip_norm is None or (math.isfinite(self.clip_norm) and self.clip_norm > 0),
              self, "clip_norm", "None or finite and > 0")
        check(self.grad_accum_steps >= 1, self, "grad_accum_steps", ">= 1")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate at optimiser update ``step`` (0-based count of updates already applied).

    With W = warmup_steps, f0 = warmup_init_fraction, f1 = final_lr_fraction, D = total_steps − W,
    t = min(step − W, D):
      step < W:  lr · (f0 + (1 − f0) · step / W)            (linear warmup)
      constant:  lr
      cosine:    lr · (f1 + (1 − f1) · ½(1 + cos(π t / D)))  (IG App. C.1/C.2)
      linear:    lr · (1 − (1 − f1) · t / D)
    and the rate stays at lr · f1 after total_steps.
    """
    lr, warmup, f0, f1 = cfg.lr, cfg.warmup_steps, cfg.warmup_init_fraction, cfg.final_lr_fraction
    decay = None if cfg.total_steps is None else cfg.total_steps - warmup

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * (f0 + (1.0 - f0) * step / max(warmup, 1))
        if cfg.schedule == "constant":
            after = jnp.full_like(step, lr)
        else:
            frac = jnp.clip((step - warmup) / decay, 0.0, 1.0)
            if cfg.schedule == "cosine":
                after = lr * (f1 + (1.0 - f1) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
            else:
                after = lr * (1.0 - (1.0 - f1) * frac)
        return jnp.where(step < warmup, warm, after)

    return schedule


_NORM_NAME = re.compile(r"norm|(^|_)ln(_|\d|$)")


def decay_mask(params: Any) -> Any:
    """Pytree of bools like ``params``: True where weight decay applies.

    Excluded (False): every parameter with ndim < 2 (biases, norm scales), any leaf named ``bias``
    or ``scale``, and anything under a path component that names a norm (``ln_1``, ``ln_f``,
    ``LayerNorm_0``, ``input_layernorm``, ``norm``, ...). Works on arrays or `jax.ShapeDtypeStruct`s.
    """

    def keep(path: tuple, leaf: Any) -> bool:
        names = [_key_name(k).lower() for k in path]
        ndim = len(leaf.shape) if hasattr(leaf, "shape") else jnp.ndim(leaf)
        if ndim < 2:
            return False
        if names and names[-1] in ("bias", "scale"):
            return False
        return not any(_NORM_NAME.search(n) for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (optional) -> AdamW(schedule, mask=decay_mask), wrapped in MultiSteps.

    AdamW update (Loshchilov & Hutter; optax.adamw): with bias-corrected moments m̂, v̂,
    Δθ = −lr_t · (m̂ / (√v̂ + ε) + wd · mask · θ).
    With grad_accum_steps = k > 1, ``update`` must be called k times per optimiser step; the first
    k − 1 calls return zero updates and the k-th applies the mean of the k gradients.
    """
    parts = []
    if cfg.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return tx
