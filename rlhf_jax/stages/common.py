"""What every training stage shares: model sources, tokenizer loading, the config fields common to
SFT / reward model / PPO, train-state placement on a device mesh, mesh-jitted steps, model export.

A stage's directory (``workdir``) holds what ``run_loop`` writes (``config.json``, the resolved
config; ``checkpoints/``, ``metrics.jsonl``, ``samples.jsonl``, ``DONE``) and, once finished,
``model/``: the final model in Hugging Face format (``save_pretrained`` + ``tokenizer.json`` +
stage side files such as ``reward_normalization.json``).  The next stage loads that directory as
its ``ModelSource(hf_dir=...)``.  A stage is complete when ``model/`` exists and records the same
number of steps as ``DONE`` (``completed_model``); it is reused only if its fingerprint
(``stage_fingerprint``: the config without operational fields, and the content of its input files
and models) is unchanged.  A stage holds its workdir's lock while it runs (``guarded``).

Data loading is per process (``process_batches``): with several processes each reads only its
part of the training file (``sharding.process_data_shard``) and its rows become its devices'
shards of the global batch (``sharding.global_batch_from_local``); one process reads the whole
file and places global batches with ``sharding.shard_batch``.  Held-out sets are small and read
whole by every process.  The export gathers the parameters to host memory on process 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import hf
from rlhf_jax.configs import ConfigError, to_dict
from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.errors import check
from rlhf_jax.model import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig, Params, Transformer, init_params
from rlhf_jax.data import BatchIterator
from rlhf_jax.sharding import BATCH_AXES, MeshConfig, place_batch, process_data_shard, state_shardings
from rlhf_jax.tokenizer import PAD_TOKEN, Tokenizer
from rlhf_jax.train import DONE_FILE, LoopConfig, OptimizerConfig, TrainState, make_optimizer
from rlhf_jax.train.memory import MemoryCheckConfig
from rlhf_jax.train.workdir import WorkdirError, describe_changes, fingerprint, fingerprint_changes

log = logging.getLogger(__name__)

MODEL_DIR = "model"
STAGE_FILE = "rlhf_jax_stage.json"  # inside model/: which stage wrote it, after how many steps

Batch = Mapping[str, Any]
StepFn = Callable[[Any, Batch], tuple[Any, dict[str, jax.Array]]]


# ---------------------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a stage's starting model comes from: exactly one of

    - ``hf_dir``: a Hugging Face directory (``config.json`` + safetensors), e.g. the previous
      stage's ``workdir/model``, loaded with ``hf.load_pretrained``;
    - ``init``: a ``ModelConfig`` to initialise randomly (tests, the synthetic task's base model).
      Its ``head`` and ``dtype`` stay at their defaults: the stage picks the head, ``dtype`` below
      the compute dtype.

    ``dtype`` is the compute dtype (``ModelConfig.dtype``); parameters are always float32.
    ``scan_layers``, ``remat``, ``remat_policy``, ``attention_impl`` and ``logits_chunk`` set the
    ``ModelConfig`` execution switches of the same names (see there; the weights do not change;
    ``remat=true`` is ``remat_policy="full"``: keep only each block's input for the backward pass).
    """

    hf_dir: str | None = None
    init: ModelConfig | None = None
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    logits_chunk: int = 0
    remat: bool = False

    def __post_init__(self) -> None:
        if (self.hf_dir is None) == (self.init is None):
            raise ConfigError(
                "ModelSource: set exactly one of 'hf_dir' (a Hugging Face directory) and 'init' "
                f"(a ModelConfig to initialise randomly); got hf_dir={self.hf_dir!r}, "
                f"init={'set' if self.init is not None else None}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"ModelSource.dtype must be one of float32, bfloat16, float16, got {self.dtype!r}"
            )
        if not isinstance(self.scan_layers, bool):
            raise ConfigError(f"ModelSource.scan_layers must be true or false, got {self.scan_layers!r}")
        if not isinstance(self.remat, bool) or (self.remat and self.remat_policy not in ("none", "full")):
            raise ConfigError(f"ModelSource.remat must be true or false and, when true, remat_policy 'none' or "
                              f"'full' (remat=true means 'full'); got remat={self.remat!r}, "
                              f"remat_policy={self.remat_policy!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"ModelSource.remat_policy must be one of {', '.join(REMAT_POLICIES)}, "
                              f"got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"ModelSource.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                              f"got {self.attention_impl!r}")
        if isinstance(self.logits_chunk, bool) or not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            raise ConfigError(f"ModelSource.logits_chunk must be an int >= 0 (0 = off), got {self.logits_chunk!r}")
        if self.init is not None and (self.init.head != "lm" or self.init.dtype != "float32"):
            raise ConfigError(
                "ModelSource.init.head/dtype must stay at their defaults ('lm', 'float32'): the "
                "stage picks the head and ModelSource.dtype sets the compute dtype"
            )

    def describe(self) -> str:
        return f"hf_dir {self.hf_dir}" if self.hf_dir is not None else "a random init"


def model_config(source: ModelSource, head: str = "lm", score_pooling: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` that ``load_model(source, head, score_pooling=)`` builds, without
    reading weights."""
    config = with_execution(source, _source_config(source, head))
    return config if score_pooling is None else config.replace(score_pooling=score_pooling)


def with_execution(source: ModelSource, config: ModelConfig) -> ModelConfig:
    """``config`` with ``source``'s execution switches (a bad value is a ConfigError naming it)."""
    try:
        return config.replace(scan_layers=source.scan_layers, remat=source.remat, remat_policy=source.remat_policy,
                              attention_impl=source.attention_impl, logits_chunk=source.logits_chunk)
    except ValueError as e:
        raise ConfigError(f"ModelSource: {e}") from e


def _source_config(source: ModelSource, head: str) -> ModelConfig:
    if source.init is not None:
        return source.init.replace(head=head, dtype=source.dtype)
    config_file = Path(source.hf_dir) / hf.CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (ModelSource.hf_dir)")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from e
    return hf.config_from_hf(data, dtype=source.dtype, head=head, source=config_file)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model: Transformer, key: jax.Array) -> Params:
    return init_params(model, key)


def load_model(
    source: ModelSource, head: str, key: jax.Array, score_pooling: str | None = None
) -> tuple[Transformer, Params]:
    """``(model, float32 params)`` from ``source`` with ``head`` ``"lm"`` or ``"scalar"``.

    ``head="scalar"`` on an LM checkpoint builds a reward/value model: the backbone's weights and
    a fresh scalar head initialised from ``key`` (InstructGPT §3.5: the RM is "the SFT model with
    the final unembedding layer removed" and a scalar projection added).  A checkpoint that
    already has a scalar head (a reward model) keeps it.  ``init`` sources draw every parameter
    from ``key`` (pass a fresh one per model: no default key is reused silently).
    ``score_pooling``: set ``ModelConfig.score_pooling`` (None keeps the source's).
    """
    if source.init is not None:
        model = Transformer(model_config(source, head, score_pooling))
        return model, _init_params(model, key)
    model, params = hf.load_pretrained(source.hf_dir, dtype=source.dtype, head=head, key=key)
    model = Transformer(with_execution(source, model.config))
    if score_pooling is not None:
        model = Transformer(model.config.replace(score_pooling=score_pooling))
    return model, params


def load_tokenizer(path: str | os.PathLike | None, source: ModelSource) -> Tokenizer:
    """``Tokenizer`` from ``path`` (a ``tokenizer.json`` or a directory holding one); ``None``
    takes the one in ``source.hf_dir``."""
    if path is None:
        if source.hf_dir is None:
            raise ConfigError("tokenizer: required when the model is a random init (no hf_dir)")
        path = source.hf_dir
    return Tokenizer.from_file(path)


def check_vocab(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    """Raise ``ConfigError`` unless every id, the pad id included, fits the model's embedding:
    the pad never grows the vocabulary past it (``rlhf_jax.tokenizer``'s docstring)."""
    if tokenizer.vocab_size > config.vocab_size:
        added = (f" (its pad {PAD_TOKEN!r}, id {tokenizer.pad_id}, was added: the tokenizer has no spare "
                 "special token; name an existing token as pad_token in tokenizer_config.json)"
                 if tokenizer.added_pad and tokenizer.pad_id >= config.vocab_size else "")
        raise ConfigError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{config.vocab_size}{added}"
        )


# --------------------------------------------------------------------------------------- config


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


# Config fields that change how a stage runs or reports, not what it computes: left out of its
# fingerprint.  (Its length, ``epochs``/``loop.total_steps``, may grow on resume; a schedule that
# follows it shows up as a changed ``optimizer.total_steps``, see ``stage_optimizer``.)  Input
# paths are left out too: the inputs' content stands for them.
OPERATIONAL_FIELDS = (
    "workdir", "epochs", "loop", "eval_data", "eval_batches", "mesh", "distributed",
    "sample_prompts", "sample_max_new_tokens", "eval_samples", "phase_timing",
    "memory", "model.scan_layers", "model.remat", "model.remat_policy", "model.attention_impl", "model.logits_chunk",
)


def stage_optimizer(cfg: StageConfig, steps: int) -> OptimizerConfig:
    """``cfg.optimizer`` resolved for a stage of ``steps`` loop steps (one update per
    ``grad_accum_steps`` of them): a decaying schedule without its own ``total_steps`` decays
    over the whole stage."""
    return cfg.optimizer.resolve(math.ceil(steps / cfg.optimizer.grad_accum_steps))


def stage_fingerprint(cfg: StageConfig, inputs: tuple[str, ...], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What defines the stage's result (``train.workdir.fingerprint``): ``cfg`` without
    ``OPERATIONAL_FIELDS`` and without the ``inputs`` fields (dotted keys such as
    ``"model.hf_dir"``, ``"train_data"``), whose files or directories are hashed instead, and
    with the fields of ``resolved`` (e.g. ``{"optimizer": stage_optimizer(cfg, steps)}``)
    replaced by those values.  The hashes recorded in ``workdir/DONE`` are reused for inputs
    whose size and modification time are unchanged."""
    data = to_dict(cfg)
    paths = {key: _pop(data, key) for key in inputs}
    for key in OPERATIONAL_FIELDS:
        _pop(data, key)
    data.update({key: to_dict(value) for key, value in resolved.items()})
    done = _read_json(Path(cfg.workdir) / DONE_FILE) or {}
    return fingerprint(data, paths, previous=done.get("fingerprint"))


def _pop(data: dict[str, Any], dotted: str) -> Any:
    """Remove ``data[a][b]`` for ``"a.b"`` and return it (None if absent)."""
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.get(key)
        if not isinstance(data, dict):
            return None
    return data.pop(last, None)


# ------------------------------------------------------------------------------------- devices


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


# ------------------------------------------------------------------------ per-process data


def data_shard(mesh: Mesh) -> dict[str, int]:
    """Reader arguments for this process's part of a training file (``shard_index``,
    ``shard_count`` from ``sharding.process_data_shard``); one process reads everything."""
    index, count = process_data_shard(mesh)
    return {"shard_index": index, "shard_count": count}


def across_processes(value: int, reduce: Callable[[Any], Any] = max) -> int:
    """``reduce`` (``max``/``min``) of an int over all processes (one host all-gather); ``value``
    itself in one process.  Every process must call it."""
    if jax.process_count() == 1:
        return value
    return int(reduce(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def local_batch_size(batch_size: int, mesh: Mesh, where: str) -> int:
    """Rows of each ``batch_size`` global batch that this process loads: ``batch_size / count``
    (``ConfigError`` naming ``where`` unless it divides)."""
    count = process_data_shard(mesh)[1]
    if batch_size % count:
        raise ConfigError(f"{where} {batch_size} does not divide over the {count} processes' data parts; "
                          f"use a multiple of {count}")
    return batch_size // count


def _pad_axis(x: np.ndarray, width: int, value: int, axis: int = -1) -> np.ndarray:
    """``x`` right-padded with ``value`` along ``axis`` (the last) to ``width``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def even_rows(arrays: Mapping[str, np.ndarray], pad_values: Mapping[str, int] | None = None,
              time_key: str = "mask") -> dict[str, np.ndarray]:
    """This process's rows made to agree with every other process's: the same number of rows
    (the fewest any process holds; the rest are dropped) and, for arrays shaped like
    ``arrays[time_key]``, the same right-padded time axis (the widest; filled with
    ``pad_values[key]``, default 0).  One process: ``arrays`` unchanged."""
    arrays = dict(arrays)
    if jax.process_count() == 1:
        return arrays
    rows = across_processes(len(arrays[time_key]), min)
    width = across_processes(arrays[time_key].shape[-1], max)
    like = arrays[time_key].shape
    pad_values = pad_values or {}
    return {k: _pad_axis(v[:rows], width, pad_values.get(k, 0)) if v.shape == like else v[:rows]
            for k, v in arrays.items()}


class _AgreedWidth:
    """A per-process ``BatchIterator`` whose bucket-cut batches are right-padded to the widest
    cut of any process, so that the global batch has one shape: the bucket of its longest
    sequence (and, with ``group_buckets``, of its most items), as one process holding every row
    would cut it (one host all-gather per cut axis and batch)."""

    def __init__(self, iterator: BatchIterator, pad_values: Mapping[str, int]):
        self.iterator = iterator
        self.pad_values = pad_values

    def __len__(self) -> int:
        return len(self.iterator)

    def __iter__(self) -> _AgreedWidth:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self.iterator)
        if self.iterator.group_buckets:
            like = batch[self.iterator.group_by].shape
            count = across_processes(like[1], max)
            batch = {k: _pad_axis(v, count, self.pad_values.get(k, 0), axis=1) if v.shape[:2] == like else v
                     for k, v in batch.items()}
        like = batch[self.iterator.bucket_key].shape
        width = across_processes(like[-1], max)
        return {k: _pad_axis(v, width, self.pad_values.get(k, 0)) if v.shape == like else v
                for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.iterator.set_state(state)


def process_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    mesh: Mesh,
    *,
    seed: int,
    buckets: tuple[int, ...] | None = None,
    pad_values: Mapping[str, int] | None = None,
    where: str = "batch_size",
    group_by: str | None = None,
    group_buckets: tuple[int, ...] | None = None,
) -> BatchIterator | _AgreedWidth:
    """Training batches of ``batch_size`` rows (global) for a train step jitted with
    ``process_local=True``.

    One process: ``BatchIterator(arrays, batch_size, seed=seed, buckets=buckets,
    group_by=group_by, group_buckets=group_buckets)``.  Several: ``arrays`` are this process's
    rows (read with ``data_shard(mesh)``, made equal with ``even_rows``); each batch takes
    ``local_batch_size`` of them (every process shuffles its own rows with the same seed, so their
    iterator states agree and process 0's checkpoint resumes all) and, with ``buckets`` or
    ``group_buckets``, is padded to the cut every process agrees on (right-padded data;
    ``pad_values`` as for ``even_rows``)."""
    grouping = {"buckets": buckets, "group_by": group_by, "group_buckets": group_buckets}
    if jax.process_count() == 1:
        return BatchIterator(arrays, batch_size, seed=seed, **grouping)
    iterator = BatchIterator(arrays, local_batch_size(batch_size, mesh, where), seed=seed, **grouping)
    return _AgreedWidth(iterator, pad_values or {}) if buckets or group_buckets else iterator


def pad_rows(arrays: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Append all-zero rows so the row count is a multiple of ``multiple`` (zero masks make them
    count for nothing in a masked mean; ``tokens`` rows are zeros too, masked out)."""
    n = len(next(iter(arrays.values())))
    extra = -n % multiple
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in arrays.items()}


def fixed_batches(arrays: Mapping[str, np.ndarray], batch_size: int, limit: int | None) -> list[dict[str, np.ndarray]]:
    """The held-out set as fixed-shape batches of ``batch_size`` rows (the last one padded with
    zero rows), at most ``limit`` of them."""
    padded = pad_rows(arrays, batch_size)
    n = len(next(iter(padded.values())))
    starts = range(0, n, batch_size)[:limit]
    return [{k: v[s : s + batch_size] for k, v in padded.items()} for s in starts]


# -------------------------------------------------------------------------------------- export


def model_dir(workdir: str | os.PathLike) -> Path:
    """``workdir/model``: where a stage exports its final model."""
    return Path(workdir) / MODEL_DIR


def export_model(
    workdir: str | os.PathLike,
    model: Transformer,
    params: Params,
    tokenizer: Tokenizer | None,
    extra_json: Mapping[str, Any] | None = None,
) -> Path:
    """Write the final model to ``workdir/model/`` in Hugging Face format, atomically.

    ``save_pretrained`` (config.json + safetensors + the tokenizer's files) and one JSON file per
    ``extra_json`` item (file name -> JSON-able value, e.g. ``{"reward_normalization.json":
    {"gain": 1.0, "bias": -0.3}}``) go into a temporary directory that then replaces
    ``workdir/model`` by rename, so readers never see a half-written model.  Process 0 writes;
    every process returns the path.
    """
    target = model_dir(workdir)
    if jax.process_index() != 0:
        return target
    params = jax.device_get(params)
    tmp = target.with_name(f"{MODEL_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(model, params, tmp, tokenizer=tokenizer)
    for name, value in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    old = target.with_name(f"{MODEL_DIR}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def stage_record(stage: str, steps: int, cfg: Any) -> dict[str, Any]:
    """The ``STAGE_FILE`` content ``completed_model`` checks: stage name, steps, config, and from
    ``DONE`` the inputs' hashes and, if the config changed during the run, ``config_changes``."""
    done = _read_json(Path(cfg.workdir) / DONE_FILE) or {}
    record = {"stage": stage, "steps": int(steps), "config": to_dict(cfg)}
    if done.get("fingerprint"):
        record["inputs"] = done["fingerprint"].get("inputs", {})
    if done.get("config_changes"):
        record["config_changes"] = done["config_changes"]
    return record


def completed_model(workdir: str | os.PathLike, steps: int, fingerprint: Mapping[str, Any] | None = None,
                    force: bool = False) -> Path | None:
    """``workdir/model`` when the stage ran ``steps`` steps (``DONE``) and exported them, else
    None (not started, interrupted, exported before ``steps`` grew, or killed before export).

    With ``fingerprint`` (``stage_fingerprint``) a complete stage is reused only if ``DONE``
    records the same one; ``force`` (``loop.force``) always gives None, to train it again.

    Raises:
      WorkdirError: the stage is complete but its fingerprint differs, naming what changed.
    """
    workdir = Path(workdir)
    done, record = _read_json(workdir / DONE_FILE), _read_json(model_dir(workdir) / STAGE_FILE)
    if done is None or record is None or force:
        return None
    if done.get("step") != steps or record.get("steps") != steps:
        return None
    if fingerprint is None:
        return model_dir(workdir)
    if done.get("fingerprint") is None:
        log.warning("%s: DONE records no fingerprint (an older version wrote it); reusing the stage unchecked",
                    workdir)
        return model_dir(workdir)
    changes = fingerprint_changes(done["fingerprint"], fingerprint)
    if changes:
        raise WorkdirError(f"{workdir} holds a finished run with another config or input: "
                           f"{describe_changes(changes)}; use a new workdir, or set loop.force=true to train "
                           "it again here")
    return model_dir(workdir)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


