"""A stage's train state and steps on the device mesh: the optimiser (one object per config),
the train state placed by the partition rules, and ``(tree, batch)`` functions jitted with
explicit shardings (``jit_on_mesh``); ``setup_training`` builds all three for one model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.configs import ConfigError
from rlhf_jax.model import Params, Transformer
from rlhf_jax.sharding import BATCH_AXES, place_batch, state_shardings
from rlhf_jax.stages.config import StageConfig
from rlhf_jax.stages.sources import load_model
from rlhf_jax.train import OptimizerConfig, TrainState, make_optimizer

Batch = Mapping[str, Any]


StepFn = Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]


@functools.lru_cache(maxsize=None)
def cached_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """``make_optimizer(cfg)``, one object per config: the optimiser is a static field of
    ``TrainState``, so an equal object lets a re-created stage reuse compiled steps."""
    return make_optimizer(cfg)


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, where: str) -> None:
    """``ConfigError`` unless ``batch_size`` divides over the mesh's data × fsdp batch shards."""
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if batch_size % shards:
        raise ConfigError(
            f"{where}.batch_size {batch_size} does not divide over the mesh's {shards} batch "
            f"shards (data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']}); use a multiple of {shards}"
        )


def init_train_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh) -> TrainState:
    """``TrainState.create(params, tx, rng)`` with every leaf (params, optimiser moments) placed on
    ``mesh`` by the partition rules of ``rlhf_jax.sharding``."""
    params = jax.device_put(params, state_shardings(params, mesh))
    state = TrainState.create(params, tx, rng)
    return jax.device_put(state, state_shardings(state, mesh))


@dataclasses.dataclass
class Setup:
    """What a stage's setup builds: the model to export (or the stage's models), the initial
    train state on the mesh, and the train step ``(state, host batch) -> (state, metrics)``."""

    model: Any
    state: Any
    train_step: Callable[[Any, Batch], tuple[Any, Mapping[str, Any]]]


def setup_training(
    cfg: StageConfig,
    head: str,
    optimizer: OptimizerConfig,
    step_fn: Callable[[Transformer, OptimizerConfig], StepFn],
    mesh: Mesh,
    score_pooling: str | None = None,
) -> Setup:
    """Model (``load_model(cfg.model, head, score_pooling=)``), train state with ``optimizer``
    placed on ``mesh``, and ``step_fn(model, optimizer)`` jitted on it (old state donated,
    process-local batches).  Keys: ``split(PRNGKey(cfg.seed))`` -> (model init, train-state rng)."""
    check_batch_fits_mesh(cfg.batch_size, mesh, type(cfg).__name__)
    init_key, state_key = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model, params = load_model(cfg.model, head, init_key, score_pooling)
    state = init_train_state(params, cached_optimizer(optimizer), state_key, mesh)
    train_step = jit_on_mesh(step_fn(model, optimizer), mesh, state, donate=True, process_local=True)
    return Setup(model, state, train_step)


def jit_on_mesh(
    fn: Callable[[Any, Batch], Any],
    mesh: Mesh,
    like: Any,
    *,
    returns_tree: bool = True,
    donate: bool = False,
    process_local: bool = False,
) -> Callable[[Any, Batch], Any]:
    """``fn(tree, batch)`` jitted with explicit shardings, callable with a host batch.

    ``tree`` (a train state or params, sharded like ``like`` by ``sharding.state_shardings``) and
    a dict of ``[batch, ...]`` arrays split over data × fsdp.  ``fn`` returns ``(tree, metrics)``
    (``returns_tree``; the tree keeps its shardings) or ``metrics`` alone; metrics come back
    replicated.  The same ``fn`` runs on one device or on a mesh and gives the same numbers.
    ``donate`` lets XLA reuse the input tree's buffers (a train step's old state).
    ``process_local``: the batch holds this process's rows only (``process_batches``), assembled
    into the global batch across processes (``sharding.place_batch``); otherwise it is the global
    batch, the same on every process.  The returned function's ``jitted`` attribute is the
    ``jax.jit`` (call its ``lower`` under ``jax.set_mesh(mesh)`` with a placed batch).
    """
    tree_sharding = state_shardings(like, mesh)
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        fn,
        in_shardings=(tree_sharding, NamedSharding(mesh, P(BATCH_AXES))),
        out_shardings=(tree_sharding, replicated) if returns_tree else replicated,
        donate_argnums=(0,) if donate else (),
    )

    def call(tree: Any, batch: Batch) -> Any:
        with jax.set_mesh(mesh):  # lets the model pin its activations to batch sharding
            return jitted(tree, place_batch(dict(batch), mesh, process_local=process_local))

    call.jitted = jitted  # the jax.jit itself: .lower(tree, placed_batch) to inspect the program
    return call
