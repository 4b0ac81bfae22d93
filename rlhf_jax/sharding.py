"""GSPMD sharding: a ``("data", "fsdp", "tensor")`` device mesh, path-matched partition rules for
parameter and optimizer-state pytrees, and batch placement.

One mechanism runs on 1 CPU, 8 simulated CPU devices, a GPU or a TPU pod slice: arrays carry a
``NamedSharding`` and ``jax.jit`` propagates it (the mesh axes are ``AxisType.Auto``, so XLA's
sharding propagation inserts the collectives).

* ``data``: pure data parallelism (parameters replicated along it).
* ``fsdp``: the batch is split along it *and* parameters are sharded along it (ZeRO-3 / FSDP,
  Rajbhandari et al. 2020); XLA all-gathers a weight where it is used.
* ``tensor``: Megatron-style tensor parallelism (Shoeybi et al. 2019, §3): column-parallel
  ``[d, out]`` kernels (q/k/v, fc/gate/up, lm_head) are split on ``out`` (the fused decode
  kernels: ``qkv`` on its key/value heads, ``gate_up`` on ``d_ff``), row-parallel ``[in, d]``
  kernels (o, proj/down) on ``in``, the embedding on the vocabulary.

Rules are ``(regex, PartitionSpec)`` pairs matched with ``re.search`` on the leaf's ``/``-joined
path (``layer_0/attn/q/kernel``); the first match wins.  Patterns are anchored at the end of the
path, so an optax state whose leaves mirror the parameters (``0/mu/layer_0/attn/q/kernel``) gets
the parameter's spec.  Scalars (``count``, a typed PRNG key) are always replicated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.errors import check

logger = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, P]]

DEFAULT_RULES: Rules = (
    # Column-parallel: [d_model, out] split on out over ``tensor``, on d_model over ``fsdp``.
    (r"(^|/)attn/(q|k|v)/kernel$", P("fsdp", "tensor")),
    (r"(^|/)mlp/(fc|gate|up)/kernel$", P("fsdp", "tensor")),
    (r"(^|/)attn/(q|k|v)/bias$", P("tensor")),
    # ``model.fuse_projections``' decode weights: qkv [d, kv_heads, (groups + 2)·head_dim] split on
    # the key/value heads (each keeps its query heads), gate_up [d, 2, d_ff] on d_ff.
    (r"(^|/)attn/qkv/kernel$", P("fsdp", "tensor")),
    (r"(^|/)attn/qkv/bias$", P("tensor")),
    (r"(^|/)mlp/gate_up/kernel$", P("fsdp", None, "tensor")),
    (r"(^|/)mlp/fc/bias$", P("tensor")),
    # Row-parallel: [in, d_model] split on in over ``tensor`` (its output is summed over ``tensor``).
    (r"(^|/)attn/o/kernel$", P("tensor", "fsdp")),
    (r"(^|/)mlp/(proj|down)/kernel$", P("tensor", "fsdp")),
    # Vocabulary-parallel embedding [V, d] (tied unembedding gives logits split on V) and head [d, V].
    (r"(^|/)embed/embedding$", P("tensor", "fsdp")),
    (r"(^|/)pos_embed/embedding$", P(None, "fsdp")),
    (r"(^|/)lm_head/kernel$", P("fsdp", "tensor")),
    # Norms, row-parallel biases, the scalar score head, anything else: replicated.
    (r".*", P()),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; ``-1`` (at most one axis) takes all the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in AXES:
            size = getattr(self, name)
            check(isinstance(size, int) and not isinstance(size, bool) and (size >= 1 or size == -1),
                  self, name, "a positive int or -1")
        check(sum(getattr(self, name) == -1 for name in AXES) <= 1, self, "fsdp",
              f"the only axis set to -1: at most one axis may be -1 ({self})")

    def shape(self, n_devices: int) -> tuple[int, int, int]:
        """``(data, fsdp, tensor)`` sizes for ``n_devices``, with the ``-1`` axis resolved."""
        sizes = [getattr(self, name) for name in AXES]
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % fixed:
                named = "×".join(f"{n}={s}" for n, s in zip(AXES, sizes) if s != -1)
                raise ValueError(
                    f"{self}: the fixed axes ({named}, product {fixed}) do not divide the "
                    f"{n_devices} devices; choose sizes whose product divides {n_devices}"
                )
            sizes[sizes.index(-1)] = n_devices // fixed
        elif fixed != n_devices:
            raise ValueError(
                f"{self}: mesh shape data×fsdp×tensor = {'×'.join(map(str, sizes))} = {fixed} "
                f"does not match the {n_devices} devices; make the product {n_devices} "
                f"(or set one axis to -1 to take the remaining devices)"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all of
    ``jax.devices()``, every process's), laid out by ``jax.make_mesh`` for the topology."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _shape(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(np.shape(leaf) if shape is None else shape)


def _fit(spec: P, shape: tuple[int, ...], path: str, axis_sizes: Mapping[str, int] | None) -> P:
    """``spec`` with every entry that cannot shard its dimension replaced by ``None``."""
    if len(spec) > len(shape):
        logger.warning("sharding: %s has shape %s, fewer dims than its rule's %s; replicated",
                       path, shape, spec)
        return P()
    if axis_sizes is None:
        return spec
    entries = []
    for dim, entry in zip(shape, spec):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [n for n in names if n not in axis_sizes]
        if unknown:
            raise ValueError(f"sharding: rule for {path} names mesh axes {unknown}, "
                             f"the mesh has {tuple(axis_sizes)}")
        size = math.prod(axis_sizes[n] for n in names)
        if dim % size:
            logger.warning("sharding: %s dim of size %d is not divisible by mesh axes %s "
                           "(size %d); replicated on that dim", path, dim, entry, size)
            entry = None
        entries.append(entry)
    return P(*entries)


def partition_specs(tree: Any, rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None) -> Any:
    """A pytree of ``PartitionSpec`` matching ``tree`` (parameters, an optax state, a train state).

    Leaves may be arrays or ``jax.ShapeDtypeStruct``.  With ``mesh`` (a ``Mesh`` or
    ``AbstractMesh``), a dimension that the mesh axes do not divide is left unsharded (logged).
    Raises ``ValueError`` for a non-scalar leaf that no rule matches.
    """
    axis_sizes = None if mesh is None else dict(mesh.shape)
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path: tuple[Any, ...], leaf: Any) -> P:
        shape = _shape(leaf)
        if not shape:
            return P()
        name = _path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return _fit(spec, shape, name, axis_sizes)
        raise ValueError(f"sharding: no partition rule matches {name!r} (shape {shape}); "
                         f"add a rule for it, e.g. (r'.*', PartitionSpec()) to replicate the rest")

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A pytree of ``NamedSharding`` for any parameter-like pytree (params, optax state, train
    state); usable as ``jax.jit``'s ``in_shardings``/``out_shardings``."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(tree, rules, mesh),
                        is_leaf=lambda x: isinstance(x, P))


param_shardings = state_shardings


_HOST_ALIGNMENT = 64  # bytes: XLA:CPU reads a NumPy buffer in place (no copy) at such an address


def _on_host_devices(sharding: NamedSharding) -> bool:
    """Whether ``sharding`` spans several CPU devices, all of them this process's."""
    devices = sharding.device_set
    return len(devices) > 1 and all(d.platform == "cpu" and d.process_index == jax.process_index()
                                    for d in devices)


def _index_key(index: tuple[slice, ...]) -> tuple[tuple[Any, Any, Any], ...]:
    return tuple((i.start, i.stop, i.step) for i in index)


def host_shared(leaf: Any, sharding: NamedSharding) -> jax.Array:
    """``leaf`` placed by ``sharding`` over this process's CPU devices with **one** host buffer per
    distinct shard, which every device holding that shard reads in place, instead of a copy per
    device (``jax.device_put``): a leaf replicated over the ``data`` axis is one buffer.

    With one host device per core (``jax_num_cpu_devices``), a data-parallel decode then streams
    one copy of the weights through the cores' shared cache instead of one per device (the tiny
    decode step over 2 devices: ``docs/performance.md``, "one copy of the weights").  Safe to
    donate: XLA:CPU writes a program's outputs to new buffers when an input borrows host memory,
    and never writes to inputs it was not given.  Each host buffer is a private, 64-byte-aligned
    copy of its shard.  ``sharding``'s devices: several CPU devices of this process
    (``_on_host_devices``)."""
    host = np.asarray(leaf)
    buffers: dict[Any, np.ndarray] = {}

    def buffer(index: tuple[slice, ...]) -> np.ndarray:
        key = _index_key(index)
        if key not in buffers:
            shard = host[index]
            raw = np.empty(shard.nbytes + _HOST_ALIGNMENT, np.uint8)
            start = -raw.ctypes.data % _HOST_ALIGNMENT
            buffers[key] = raw[start:start + shard.nbytes].view(host.dtype).reshape(shard.shape)
            buffers[key][...] = shard
        return buffers[key]

    return jax.make_array_from_single_device_arrays(
        host.shape, sharding,
        [jax.device_put(buffer(index), d) for d, index in sharding.devices_indices_map(host.shape).items()])


def _place_leaf(leaf: Any, sharding: NamedSharding) -> Any:
    """``leaf`` on ``sharding``: ``host_shared`` where its devices are host CPU devices and some
    shard sits on several of them, else ``jax.device_put``."""
    if (isinstance(leaf, (np.ndarray, np.generic, jax.Array)) and leaf.size > 0
            and _on_host_devices(sharding)
            and not getattr(leaf, "weak_type", False)  # keep device_put's typing of those
            and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended)  # typed PRNG keys
            and jax.dtypes.canonicalize_dtype(leaf.dtype) == leaf.dtype):  # no 64 → 32-bit cast
        indices = sharding.devices_indices_map(np.shape(leaf))
        if len({_index_key(i) for i in indices.values()}) < len(indices):
            return host_shared(leaf, sharding)
    return jax.device_put(leaf, sharding)


def shard_params(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """``tree`` (params, an optax state, a train state) placed on ``mesh`` by ``rules``
    (``jax.device_put``).  Host (NumPy) leaves go straight to their shards; moving leaves that
    already live on one device compiles a small reshard per leaf shape the first time.  On a
    mesh of this process's CPU devices each distinct shard of a leaf is one host buffer that all
    its devices read (``host_shared``), not a copy per device.  To initialise a large model
    sharded, jit the initialiser with ``out_shardings=state_shardings(jax.eval_shape(init, key),
    mesh)`` instead."""
    return jax.tree.map(_place_leaf, tree, state_shardings(tree, mesh, rules))


def _batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """``[batch, ...]`` split on ``batch`` over ``data`` × ``fsdp``, replicated over ``tensor``."""
    if ndim < 1:
        raise ValueError(f"batch_sharding: ndim must be >= 1 (got {ndim})")
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _check_batch(path: str, shape: tuple[int, ...], shards: int, where: str) -> None:
    if not shape:
        raise ValueError(f"batch: {path or 'array'} is a scalar; every batch entry needs a "
                         f"leading batch dimension")
    if shape[0] % shards:
        raise ValueError(
            f"batch: {path or 'array'} has batch size {shape[0]}, not divisible by the {shards} "
            f"batch shards {where}; use a multiple of {shards} or change MeshConfig.data/fsdp"
        )


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place a global batch (an array or a dict/pytree of ``[batch, ...]`` arrays, identical on
    every process) on ``mesh``, split over ``data`` × ``fsdp``."""
    shards = _batch_shards(mesh)
    where = f"(mesh data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']})"

    def put(path: tuple[Any, ...], x: Any) -> jax.Array:
        shape = _shape(x)
        _check_batch(_path_str(path), shape, shards, where)
        return jax.device_put(x, batch_sharding(mesh, len(shape)))

    return jax.tree_util.tree_map_with_path(put, batch)


def _owned_batch_shards(mesh: Mesh, process: int) -> frozenset[tuple[int, int]]:
    """The ``(data, fsdp)`` mesh positions (batch shards) that ``process``'s devices hold."""
    return frozenset(idx[:2] for idx, d in np.ndenumerate(mesh.devices) if d.process_index == process)


def process_data_shard(mesh: Mesh) -> tuple[int, int]:
    """``(index, count)``: which part of the training data this process loads (per-process data
    loading; pass them to the readers' ``shard_index``/``shard_count``).

    Processes whose devices hold the same batch shards (e.g. when ``tensor`` spans hosts) load
    the same part; the ``count`` parts are disjoint and each feeds ``1/count`` of every global
    batch.  One process: ``(0, 1)``.  Raises ``ValueError`` for a mesh whose processes hold
    overlapping or unequal sets of batch shards (no per-process split exists).
    """
    owned = {p: _owned_batch_shards(mesh, p) for p in sorted({d.process_index for d in mesh.devices.flat})}
    groups = sorted(set(owned.values()), key=min)
    sizes = {len(g) for g in groups}
    if len(sizes) > 1 or sum(map(len, groups)) != _batch_shards(mesh):
        raise ValueError(f"sharding: the processes hold overlapping or unequal batch shards of the "
                         f"mesh {dict(mesh.shape)} ({ {p: sorted(g) for p, g in owned.items()} }); "
                         f"lay the mesh out so each process holds whole data × fsdp rows")
    return groups.index(owned[jax.process_index()]), len(groups)


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble the global batch from each process's own rows (per-process data loading).

    Each process passes its ``[local_batch, ...]`` arrays, whose rows fill, in order, the batch
    shards held by its own devices (``jax.make_array_from_process_local_data``); the global batch
    is ``local_batch * data * fsdp / local_shards`` rows.  In one process local == global.
    """
    process = jax.process_index()
    local_shards = len(_owned_batch_shards(mesh, process))
    shards = _batch_shards(mesh)
    where = f"of process {process} (mesh data×fsdp = {mesh.shape['data']}×{mesh.shape['fsdp']})"

    def make(path: tuple[Any, ...], x: Any) -> jax.Array:
        shape = _shape(x)
        _check_batch(_path_str(path), shape, local_shards, where)
        global_shape = (shape[0] * shards // local_shards, *shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(mesh, len(shape)), x,
                                                      global_shape)

    return jax.tree_util.tree_map_with_path(make, local_batch)


def place_batch(batch: Any, mesh: Mesh, *, process_local: bool) -> Any:
    """A host batch on ``mesh``: ``global_batch_from_local`` when ``process_local`` (each process
    loaded its own rows) and there are several processes, else ``shard_batch`` (a global batch,
    identical on every process)."""
    if process_local and jax.process_count() > 1:
        return global_batch_from_local(batch, mesh)
    return shard_batch(batch, mesh)
