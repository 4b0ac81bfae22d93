"""The fit check: a plan that does not fit is refused with the ``--set`` overrides that would
make it fit, each re-planned analytically."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from rlhf_jax.errors import ConfigError, PlanError
from rlhf_jax.plan.config import RL_STAGES, GiB, PlanConfig
from rlhf_jax.plan.estimate import plan
from rlhf_jax.plan.result import Plan
from rlhf_jax.sharding import MeshConfig


def check_fits(result: Plan) -> None:
    """Raise ``PlanError`` if ``result`` needs more than the usable device memory; the message
    gives the shortfall and the ``--set`` overrides that would fit (each re-planned analytically)."""
    if result.fits:
        return
    cfg = result.config
    usable = result.usable_bytes / GiB
    need = (f"{cfg.stage} needs {result.total_bytes / GiB:.1f} GiB per device of {usable:.1f} GiB "
            f"usable ({cfg.headroom:g} × {cfg.device_memory_gib:g} GiB)")

    def text(option: tuple[tuple[str, ...], float]) -> str:
        return f"set {', '.join(option[0])} (→ {option[1]:.1f} GiB)"

    fitting = [o for o in _fixes(cfg) if o[1] <= usable]
    if fitting:
        raise PlanError(f"{need}: {'; or '.join(map(text, fitting))}", fitting)
    combined = _combined_fix(cfg)
    if combined is not None and combined[1] <= usable:
        raise PlanError(f"{need}: no single change fits; together: {text(combined)}", [combined])
    tried = f" (with {', '.join(combined[0])} it still needs {combined[1]:.1f} GiB)" if combined else ""
    raise PlanError(f"{need}{tried}: use more devices, devices with more memory, or a smaller model")


def _replan(cfg: PlanConfig, **changes: Any) -> float | None:
    try:
        new = dataclasses.replace(cfg, compile="none", **changes)
    except ConfigError:
        return None
    return plan(new).total_bytes / GiB


def _fixes(cfg: PlanConfig) -> list[tuple[tuple[str, ...], float]]:
    """Single changes that shrink the plan, each with the GiB per device it would need."""
    out: list[tuple[tuple[str, ...], float | None]] = []
    data, fsdp, tensor = cfg.mesh.shape(cfg.devices)
    if data > 1:
        sets = ("mesh.data=1", f"mesh.fsdp={data * fsdp}", f"mesh.tensor={tensor}")
        out.append((sets, _replan(cfg, mesh=MeshConfig(data=1, fsdp=data * fsdp, tensor=tensor))))
    if cfg.model is not None and cfg.model.attention_impl in ("xla", "auto") \
            and (cfg.backend or jax.default_backend()) == "tpu":  # the TPU's flash attention
        out.append((("model.attention_impl=splash",), _replan(cfg, model=cfg.model.replace(attention_impl="splash"))))
    if not cfg.remat and cfg.model is not None and cfg.model.remat_mode == "none":  # the matmuls' outputs kept
        out.append((("model.remat_policy=dots",), _replan(cfg, model=cfg.model.replace(remat_policy="dots"))))
    if not cfg.remat:
        out.append((("remat=true",), _replan(cfg, remat=True)))
    if cfg.stage in RL_STAGES and cfg.frozen_dtype == "float32":
        out.append((("frozen_dtype=bfloat16",), _replan(cfg, frozen_dtype="bfloat16")))
    out.append(_smaller_batch(cfg))
    return [(o, gib) for o, gib in out if gib is not None]


def _smaller_batch(cfg: PlanConfig, **changes: Any) -> tuple[tuple[str, ...], float | None]:
    """The largest halved ``batch_size`` that fits, else the smallest valid one (SFT and RM keep
    the effective batch by raising ``grad_accum_steps``; PPO and GRPO, whose batch is the
    rollout's, do not); ``((), None)`` if none is valid."""
    usable = cfg.device_memory_gib * cfg.headroom
    best: tuple[tuple[str, ...], float | None] = ((), None)
    factor = 2
    while cfg.batch_size % factor == 0:
        batch = {"batch_size": cfg.batch_size // factor}
        if cfg.stage not in RL_STAGES:
            batch["grad_accum_steps"] = cfg.grad_accum_steps * factor
        gib = _replan(cfg, **batch, **changes)
        if gib is None:
            break
        best = tuple(f"{k}={v}" for k, v in batch.items()), gib
        if gib <= usable:
            break
        factor *= 2
    return best


def _combined_fix(cfg: PlanConfig) -> tuple[tuple[str, ...], float] | None:
    """remat, FSDP over the data axis, bfloat16 frozen models, then the largest batch that fits."""
    data, fsdp, tensor = cfg.mesh.shape(cfg.devices)
    changes: dict[str, Any] = {"remat": True}
    sets = ["remat=true"]
    if data > 1:
        changes["mesh"] = MeshConfig(data=1, fsdp=data * fsdp, tensor=tensor)
        sets += ["mesh.data=1", f"mesh.fsdp={data * fsdp}", f"mesh.tensor={tensor}"]
    if cfg.stage in RL_STAGES:
        changes["frozen_dtype"] = "bfloat16"
        sets.append("frozen_dtype=bfloat16")
    gib = _replan(cfg, **changes)
    if gib is None:
        return None
    if gib > cfg.device_memory_gib * cfg.headroom:
        batch, smaller = _smaller_batch(cfg, **changes)
        if smaller is not None:
            return tuple(sets) + batch, smaller
    return tuple(sets), gib
