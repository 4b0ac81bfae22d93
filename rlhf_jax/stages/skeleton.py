"""The one driver every training stage runs (``run_stage``) and the supervised update
(``make_step_fn``).

``run_stage(stage, cfg)`` holds ``cfg.workdir``'s lock and runs, in this order:

1. the model config (``stage.model_config``: a missing model directory names its config.json),
   the tokenizer (``cfg.tokenizer``, else the one in ``cfg.model.hf_dir``) and its check against
   the model's vocabulary;
2. the device mesh (``cfg.mesh``), built once;
3. ``stage.prepare(run)``: the stage's batches and anything else it reads up front (held-out
   sets, ...), as a ``StageData``;
4. the length (``loop.total_steps``, else ``epochs`` × ``StageData.steps_per_epoch``), the
   optimisers resolved for it (``stage.optimizers``) and the fingerprint; a finished stage with the
   same fingerprint is reused (``completed_model``) without building any model;
5. the memory check (``stage.memory_shape``, ``train.memory.check_memory``): a plan over the
   device's memory is refused with advice before anything is compiled (``memory.check=false``,
   ``rlhf-jax --force``, skips it); from here an out-of-memory error names the stage, step,
   batch shape and the plan (``MemoryGuard``);
6. ``stage.setup(run)``: model, train state on the mesh and the jitted step (``Setup``);
7. ``stage.evaluator(run)`` and ``train.run_loop`` (resumable, NaN-guarded checkpoints; the
   data's cut and skipped counts, ``StageData.stats``, go to ``metrics.jsonl`` at the start);
8. ``stage.export(run, state)``: the model exported to ``workdir/model`` with the stage record.

A stage is an object with the hooks of ``Stage``; ``SupervisedStage`` gives the defaults for a
stage whose update is the gradient of one loss (SFT, the reward model): it needs only ``loss``,
``prepare`` and a ``StageConfig``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import optax
from jax.sharding import Mesh

from rlhf_jax.model import ModelConfig, Params, Transformer
from rlhf_jax.sharding import make_mesh
from rlhf_jax.stages.config import StageConfig, stage_optimizer, total_steps
from rlhf_jax.stages.export import (STAGE_FILE, completed_model, export_model, recorded_as_today, stage_fingerprint,
                                   stage_record)
from rlhf_jax.stages.sources import check_vocab, load_tokenizer, model_config
from rlhf_jax.stages.steps import Batch, Setup, StepFn, setup_training
from rlhf_jax.data import TruncationStats, data_metrics
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train.memory import MemoryGuard, check_memory
from rlhf_jax.train.metrics import BatchCount, batch_count
from rlhf_jax.train import MetricsWriter, OptimizerConfig, StatefulIterator, TrainState, make_schedule, run_loop
from rlhf_jax.train.workdir import workdir_lock

LossFn = Callable[[Params, Batch], tuple[jax.Array, Mapping[str, jax.Array]]]


def make_step_fn(loss_fn: LossFn, optimizer: OptimizerConfig | None = None) -> StepFn:
    """The supervised update ``(state, batch) -> (state, metrics)`` (jit it, or ``jit_on_mesh``).

    ``loss_fn(params, batch) -> (loss, aux)``: a scalar loss, whose gradient the update applies
    (``TrainState.apply_gradients``), and a dict of scalar metrics computed with it.

    Metrics: ``loss``, the ``aux`` entries, ``grad_norm`` (global L2 norm of the
    gradient), and ``lr`` (the rate of this update, ``make_schedule(optimizer)`` at update
    ``step // grad_accum_steps``) when ``optimizer`` is given.
    """
    schedule = None if optimizer is None else make_schedule(optimizer)
    accum = 1 if optimizer is None else optimizer.grad_accum_steps

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        (loss, aux), grads = jax.value_and_grad(lambda p: loss_fn(p, batch), has_aux=True)(state.params)
        metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step // accum)
        return state.apply_gradients(grads), metrics

    return step


@dataclasses.dataclass
class StageData:
    """What ``Stage.prepare`` reads: ``batches`` for ``run_loop`` (a ``StatefulIterator``, e.g.
    ``data.agreement.process_batches``), the global batches in one epoch, ``held_out``:
    whatever else the stage's later hooks read (held-out sets, a resolved sub-config, ...), and
    ``stats``: what the truncation rule and ``skip_bad`` did to each input file (name ->
    ``data.TruncationStats``)."""

    batches: StatefulIterator
    steps_per_epoch: int
    held_out: Any = None
    stats: dict[str, TruncationStats] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageRun:
    """What ``run_stage`` has built so far, handed to every hook: the config, the tokenizer, the
    model config (before weights), the mesh, then ``data`` (after ``prepare``), ``steps`` and
    ``optimizers`` (resolved for ``steps``), ``fingerprint``, ``setup`` and the ``samples`` writer
    (``samples.jsonl``, for evaluators that log text)."""

    cfg: Any
    tokenizer: Tokenizer
    model_config: ModelConfig
    mesh: Mesh
    data: StageData | None = None
    steps: int = 0
    optimizers: dict[str, OptimizerConfig] = dataclasses.field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None
    setup: Setup | None = None
    samples: MetricsWriter | None = None


class Stage(Protocol):
    """The hooks ``run_stage`` calls (``SupervisedStage`` has defaults for all but ``prepare`` and
    its ``loss``).

    ``name``: the stage's name in ``model/rlhf_jax_stage.json`` (``"sft"``, ``"rm"``, ...).
    ``inputs``: config fields (dotted) naming input files or directories, hashed into the
    fingerprint instead of their paths (e.g. ``("model.hf_dir", "train_data", "tokenizer")``).
    """

    name: str
    inputs: tuple[str, ...]

    def model_config(self, cfg: Any) -> ModelConfig: ...

    def prepare(self, run: StageRun) -> StageData: ...

    def optimizers(self, run: StageRun) -> dict[str, OptimizerConfig]: ...

    def setup(self, run: StageRun) -> Setup: ...

    def evaluator(self, run: StageRun) -> Callable[[Any], Mapping[str, float]] | None: ...

    def tokens_in_batch(self, run: StageRun, batch: Batch) -> int | BatchCount: ...

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]] | None: ...

    def export(self, run: StageRun, state: Any) -> tuple[Transformer, Params, dict[str, Any]]: ...


def run_stage(stage: Stage, cfg: StageConfig) -> Path:
    """Run (or resume, or skip if complete) ``stage`` with ``cfg``; returns ``workdir/model``
    (the steps are in the module docstring).  Holds ``cfg.workdir``'s lock (``train.workdir``):
    a second process on the same workdir stops with a ``WorkdirError``."""
    with workdir_lock(cfg.workdir):
        workdir = Path(cfg.workdir)
        config = stage.model_config(cfg)  # first: a missing model directory names its config.json
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        check_vocab(tokenizer, config, f"{type(cfg).__name__}.tokenizer vs the model ({cfg.model.describe()})")
        run = StageRun(cfg, tokenizer, config, make_mesh(cfg.mesh))
        run.data = stage.prepare(run)
        run.steps = total_steps(cfg, run.data.steps_per_epoch)
        run.optimizers = stage.optimizers(run)
        run.fingerprint = stage_fingerprint(cfg, stage.inputs, run.optimizers)
        done = completed_model(workdir, run.steps, run.fingerprint, force=cfg.loop.force)
        if done is not None:
            return done

        planned = stage.memory_shape(run) if hasattr(stage, "memory_shape") else None  # an optional hook
        estimate = None if planned is None else check_memory(
            planned[0], config, cfg.mesh, cfg.memory, cfg.optimizer.grad_accum_steps, **planned[1])
        with MemoryGuard(stage.name, estimate) as guard:
            run.setup = stage.setup(run)
            run.samples = MetricsWriter(workdir, tensorboard=False)
            try:
                state, _ = run_loop(
                    state=run.setup.state,
                    train_step=guard.watch(run.setup.train_step),
                    batches=run.data.batches,
                    loop_cfg=cfg.loop.resolve(run.steps),
                    workdir=workdir,
                    eval_fn=stage.evaluator(run),
                    tokens_in_batch=lambda batch: stage.tokens_in_batch(run, batch),
                    fingerprint=run.fingerprint,
                    config=cfg,
                    start_record=data_metrics(run.data.stats),
                    read_recorded=recorded_as_today,
                )
            finally:
                run.samples.close()
        model, params, extra = stage.export(run, state)
        record = {STAGE_FILE: stage_record(stage.name, run.steps, cfg)}
        return export_model(workdir, model, params, tokenizer, {**extra, **record})


class SupervisedStage:
    """A stage whose update is the gradient of one loss (``make_step_fn``) on one model.

    A subclass sets ``name``, ``inputs`` and ``head`` (``"lm"`` or ``"scalar"``) and defines
    ``prepare`` (the batches) and ``loss(cfg, model, params, batch) -> (loss, aux metrics)``; it may
    override ``evaluator`` (held-out metrics), ``export`` (side files) or ``step_fn`` (e.g. a
    cached one, so that re-created stages reuse compiled steps).

    Keys: ``split(PRNGKey(cfg.seed))`` -> (model init, train-state rng) (``setup_training``).
    """

    name: str = "supervised"
    inputs: tuple[str, ...] = ("model.hf_dir", "train_data", "tokenizer")
    head: str = "lm"

    def score_pooling(self, cfg: Any) -> str | None:
        """``ModelConfig.score_pooling`` for a scalar head (None keeps the source's)."""
        return None

    def model_config(self, cfg: Any) -> ModelConfig:
        return model_config(cfg.model, self.head, self.score_pooling(cfg))

    def prepare(self, run: StageRun) -> StageData:
        raise NotImplementedError(f"{type(self).__name__}.prepare: the stage's batches")

    def loss(self, cfg: Any, model: Transformer, params: Params,
             batch: Batch) -> tuple[jax.Array, Mapping[str, jax.Array]]:
        raise NotImplementedError(f"{type(self).__name__}.loss: the stage's loss")

    def step_fn(self, cfg: Any, model: Transformer, optimizer: OptimizerConfig) -> StepFn:
        return make_step_fn(functools.partial(self.loss, cfg, model), optimizer)

    def optimizers(self, run: StageRun) -> dict[str, OptimizerConfig]:
        return {"optimizer": stage_optimizer(run.cfg, run.steps)}

    def setup(self, run: StageRun) -> Setup:
        return setup_training(run.cfg, self.head, run.optimizers["optimizer"],
                              functools.partial(self.step_fn, run.cfg), run.mesh, self.score_pooling(run.cfg))

    def evaluator(self, run: StageRun) -> Callable[[Any], Mapping[str, float]] | None:
        return None

    def tokens_in_batch(self, run: StageRun, batch: Batch) -> BatchCount:
        return batch_count(batch["mask"], run.model_config)

    def memory_shape(self, run: StageRun) -> tuple[str, dict[str, Any]] | None:
        """``(plan stage, PlanConfig batch fields)`` for the memory check before compiling
        (``train.memory.check_memory``), or None for no check."""
        return None

    def export(self, run: StageRun, state: TrainState) -> tuple[Transformer, Params, dict[str, Any]]:
        return run.setup.model, state.params, {}
