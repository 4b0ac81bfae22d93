"""The config fields every stage shares (``StageConfig``, with the loop and optimiser configs
whose length may be left to the stage), and the stage's length, sequence buckets and resolved
optimiser.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.errors import check
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.train import LoopConfig, OptimizerConfig
from rlhf_jax.train.memory import MemoryCheckConfig
from rlhf_jax.configs import ConfigError


@dataclasses.dataclass(frozen=True)
class StageLoopConfig(LoopConfig):
    """``LoopConfig`` whose ``total_steps`` may be left out (``None``): the stage then derives it
    from its ``epochs``.  Cadences default to "only at the last step" (0)."""

    total_steps: int | None = None
    eval_every: int = 0
    save_every: int = 0

    def __post_init__(self) -> None:
        self.resolve(1 if self.total_steps is None else self.total_steps)  # validates the rest

    def resolve(self, total_steps: int) -> LoopConfig:
        """The plain ``LoopConfig`` with ``total_steps`` filled in (this one's, if set)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(LoopConfig)}
        fields["total_steps"] = self.total_steps if self.total_steps is not None else total_steps
        return LoopConfig(**fields)


@dataclasses.dataclass(frozen=True)
class StageOptimizerConfig(OptimizerConfig):
    """``OptimizerConfig`` whose decay length ``total_steps`` may be left out (``None``): a
    cosine/linear schedule then decays over the whole stage (``resolve``)."""

    def __post_init__(self) -> None:
        self.resolve(self.warmup_steps + 1)  # validates every field

    def resolve(self, total_updates: int) -> OptimizerConfig:
        """The plain ``OptimizerConfig`` with ``total_steps`` = this one's, else ``total_updates``
        (optimiser updates, i.e. loop steps / ``grad_accum_steps``) for a decaying schedule."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(OptimizerConfig)}
        if self.total_steps is None and self.schedule != "constant":
            fields["total_steps"] = total_updates
        return OptimizerConfig(**fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Fields every stage has.  Stage configs subclass this and override the defaults with the
    paper's values for that stage.

    ``epochs`` sets the length unless ``loop.total_steps`` is given; a batch is ``batch_size``
    examples (the global batch over all devices; it must divide over the mesh's data × fsdp
    axes).  ``eval_batches`` caps the held-out batches per evaluation (None: the whole file).
    ``tokenizer`` defaults to the one in ``model.hf_dir``.  ``memory``: the check of the memory
    plan against the device before compiling (``train.memory``; ``rlhf-jax --force`` skips it).
    """

    workdir: str
    model: ModelSource
    train_data: str
    eval_data: str | None = None
    tokenizer: str | None = None
    seed: int = 0
    batch_size: int = 32
    epochs: float = 1.0
    eval_batches: int | None = None
    optimizer: StageOptimizerConfig = StageOptimizerConfig()
    loop: StageLoopConfig = StageLoopConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    memory: MemoryCheckConfig = MemoryCheckConfig()

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        for field in ("workdir", "train_data"):
            check(isinstance(getattr(self, field), str) and getattr(self, field), self, field, "a non-empty path")
        check(is_int(self.seed) and self.seed >= 0, self, "seed", "an int >= 0")
        check(is_int(self.batch_size) and self.batch_size >= 1, self, "batch_size", "an int >= 1")
        check(isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0,
              self, "epochs", "a finite number > 0")
        check(self.eval_batches is None or (is_int(self.eval_batches) and self.eval_batches >= 1),
              self, "eval_batches", "None or an int >= 1")


def total_steps(cfg: StageConfig, steps_per_epoch: int) -> int:
    """Loop steps of the stage: ``cfg.loop.total_steps``, else ``ceil(epochs · steps_per_epoch)``."""
    if cfg.loop.total_steps is not None:
        return cfg.loop.total_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def length_buckets(buckets: tuple[int, ...], max_len: int | None, context: int, where: str) -> tuple[int, ...]:
    """The sequence lengths a stage pads to: ``buckets`` below ``max_len`` plus ``max_len`` itself
    (``None``: the model's ``context``), ascending; ``ConfigError`` if ``max_len > context``."""
    max_len = max_len or context
    if max_len > context:
        raise ConfigError(f"{where}.max_len {max_len} exceeds the model's context {context}")
    return tuple(sorted({b for b in buckets if b < max_len} | {max_len}))


def stage_optimizer(cfg: StageConfig, steps: int) -> OptimizerConfig:
    """``cfg.optimizer`` resolved for a stage of ``steps`` loop steps (one update per
    ``grad_accum_steps`` of them): a decaying schedule without its own ``total_steps`` decays
    over the whole stage."""
    return cfg.optimizer.resolve(math.ceil(steps / cfg.optimizer.grad_accum_steps))
