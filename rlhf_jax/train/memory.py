"""Memory before compute: a stage's planned per-device memory checked against the device before
anything is compiled, and an out-of-memory failure turned into one message that names the stage,
the step, the batch shape and the plan.

The estimate is ``rlhf_jax.plan``'s analytic plan (``plan.plan`` with ``compile="none"``: exact
parameter and optimizer bytes, analytic activations, an upper bound) of the stage's own model,
mesh and batch shape.  The device's memory is, in order:

1. ``MemoryCheckConfig.limit_gib`` when set (any backend);
2. ``bytes_limit`` of ``jax.local_devices()[0].memory_stats()`` (GPU, TPU: what the allocator
   may use, i.e. after ``XLA_PYTHON_CLIENT_MEM_FRACTION``);
3. on a backend without memory statistics (CPU): the host's physical memory divided by its
   local devices, since CPU "devices" share the host's RAM.

A plan over ``headroom`` × that memory is refused with a ``PlanError`` saying which config
changes would fit (``model.remat``, ``batch_size`` with ``optimizer.grad_accum_steps``, the mesh,
``max_len``), each re-planned.  ``MemoryCheckConfig.check = false`` (``rlhf-jax --force``)
skips the check.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
from jax.errors import JaxRuntimeError

from rlhf_jax.errors import ConfigError, DeviceMemoryError, PlanError
from rlhf_jax.model import ModelConfig
from rlhf_jax.plan import GiB, Plan, PlanConfig, check_fits, plan
from rlhf_jax.sharding import MeshConfig

# PlanConfig's names for a stage's fields, in the advice.
_STAGE_NAMES = {"remat": "model.remat", "grad_accum_steps": "optimizer.grad_accum_steps"}


@dataclasses.dataclass(frozen=True)
class MemoryCheckConfig:
    """The check before compiling (module docstring): ``check`` it at all; ``limit_gib``: memory
    per device (None: the device's own, or on CPU the host's RAM over its devices); ``headroom``:
    the usable fraction of it."""

    check: bool = True
    limit_gib: float | None = None
    headroom: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.check, bool):
            raise ConfigError(f"MemoryCheckConfig.check must be true or false, got {self.check!r}")
        if self.limit_gib is not None and not (isinstance(self.limit_gib, (int, float)) and self.limit_gib > 0):
            raise ConfigError(f"MemoryCheckConfig.limit_gib must be None or > 0, got {self.limit_gib!r}")
        if not (isinstance(self.headroom, (int, float)) and 0 < self.headroom <= 1):
            raise ConfigError(f"MemoryCheckConfig.headroom must be in (0, 1], got {self.headroom!r}")


def device_memory(limit_gib: float | None = None) -> tuple[float, str]:
    """``(GiB per device, where that number came from)`` (module docstring, in that order)."""
    if limit_gib is not None:
        return float(limit_gib), "memory.limit_gib"
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return stats["bytes_limit"] / GiB, f"{device.platform} memory_stats"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / jax.local_device_count() / GiB, "host RAM / local devices"


def stage_plan(stage: str, model: ModelConfig, mesh: MeshConfig, memory: MemoryCheckConfig,
               grad_accum_steps: int = 1, **shape: Any) -> Plan:
    """The analytic ``plan.Plan`` of a stage: ``stage`` one of ``plan.STAGES`` (RLOO is ``"grpo"``),
    ``model`` as the stage builds it (its ``dtype`` is the compute dtype; ``remat_mode`` "full"
    counts as remat, "dots" as its policy: ``plan.activation_bytes``), on all
    ``jax.device_count()`` devices of ``mesh``; ``shape``: ``PlanConfig``'s batch fields
    (``batch_size``, ``seq_len``, ``k_responses``, ``prompt_len``, ``max_new_tokens``,
    ``ppo_minibatches``, ``ptx_batch_size``, ``frozen_dtype``, ``group_size``, ``reward_model``,
    ``ema``)."""
    gib, _ = device_memory(memory.limit_gib)
    base = model.replace(remat=False, remat_policy="none") if model.remat_mode == "full" else model
    cfg = PlanConfig(model=base, mesh=mesh, devices=jax.device_count(), device_memory_gib=gib,
                     headroom=memory.headroom, stage=stage, grad_accum_steps=grad_accum_steps,
                     compute_dtype=model.dtype, remat=model.remat_mode == "full", compile="none", **shape)
    return plan(cfg)


def check_memory(stage: str, model: ModelConfig, mesh: MeshConfig, memory: MemoryCheckConfig,
                 grad_accum_steps: int = 1, **shape: Any) -> Plan:
    """``stage_plan``, refused with advice when it does not fit, unless ``memory.check`` is off
    (the plan is still returned, for ``MemoryGuard``'s message).

    Raises:
      PlanError: the plan exceeds the usable memory; one line with the estimate, the limit and
        where it came from, the config changes that would fit (stage config names), ``max_len``,
        and how to skip the check.
    """
    result = stage_plan(stage, model, mesh, memory, grad_accum_steps, **shape)
    if not memory.check:
        return result
    try:
        check_fits(result)
    except PlanError as e:
        _, source = device_memory(memory.limit_gib)
        fixes = [f"{', '.join(_stage_name(o) for o in overrides)} (→ {gib:.2f} GiB)"
                 for overrides, gib in e.suggestions]
        advice = "set " + "; or ".join(fixes) if fixes else "use more devices or a smaller model"
        batch = ", ".join(f"{k} {v}" for k, v in shape.items())
        raise PlanError(
            f"{stage} stage: the memory plan needs {result.total_bytes / GiB:.2f} GiB per device for {batch}, "
            f"more than the {result.usable_bytes / GiB:.2f} GiB usable ({memory.headroom:g} × "
            f"{result.config.device_memory_gib:.2f} GiB, {source}); to fit, {advice}; or lower max_len; "
            "`rlhf-jax plan` shows the table; --force (memory.check=false) runs anyway", e.suggestions) from None
    return result


def _stage_name(override: str) -> str:
    key, _, value = override.partition("=")
    return f"{_STAGE_NAMES.get(key, key)}={value}"


class MemoryGuard:
    """A context manager: turns an out-of-memory ``JaxRuntimeError`` (``RESOURCE_EXHAUSTED``)
    raised inside ``with MemoryGuard(stage, plan) as guard:`` into a ``DeviceMemoryError`` naming
    the stage, the step (the train step being run, or "setup" before the first), that step's
    batch shape and the plan's estimate.

    ``watch(train_step)`` wraps a ``(state, batch) -> (state, metrics)`` step so the guard knows
    the step and batch (a counter from the state's ``step``/``iteration``, read once)."""

    def __init__(self, stage: str, estimate: Plan | None):
        self.stage = stage
        self.estimate = estimate
        self.step: int | None = None
        self.shape: dict[str, tuple[int, ...]] = {}

    def watch(self, train_step: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def step(state: Any, batch: Any) -> Any:
            if self.step is None:
                counter = getattr(state, "step", getattr(state, "iteration", 0))
                self.step = int(jax.device_get(counter))
            self.step += 1
            self.shape = {k: tuple(v.shape) for k, v in batch.items() if hasattr(v, "shape")}
            return train_step(state, batch)

        return step

    def __enter__(self) -> MemoryGuard:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if isinstance(error, JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
            raise DeviceMemoryError(self.describe(error)) from error

    def describe(self, error: BaseException) -> str:
        """The one-line message for ``error``."""
        where = "during setup (before step 1)" if self.step is None else f"at step {self.step}"
        shape = ", ".join(f"{k} {list(v)}" for k, v in self.shape.items() if k.endswith("tokens"))
        cause = " ".join(str(error).split("\n")[0].split())[:160]
        parts = [f"out of device memory in the {self.stage} stage {where}" + (f" (batch {shape})" if shape else ""),
                 f"({cause})"]
        if self.estimate is not None:
            e = self.estimate
            parts.append(f"the planner estimated {e.total_bytes / GiB:.2f} GiB per device of "
                         f"{e.usable_bytes / GiB:.2f} usable")
        return "; ".join([" ".join(parts[:2]), *parts[2:],
                          "to fit: model.remat=true (or model.remat_policy=dots), lower batch_size with a higher "
                          "optimizer.grad_accum_steps, lower max_len, or shard over more devices (mesh.fsdp)"])
