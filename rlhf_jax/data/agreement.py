"""Per-process data loading that every process agrees on.

With several processes each reads only its part of a training file (``data_shard``, from
``sharding.process_data_shard``) and its rows become its devices' shards of the global batch
(``sharding.global_batch_from_local``): the processes agree on the row count (``even_rows``), on
each batch's bucket cut (``process_batches``) and on the values they reduce (``across_processes``;
one host all-gather each).  One process reads the whole file and places global batches with
``sharding.shard_batch``.  Held-out sets are small and read whole by every process, as fixed-shape
batches (``fixed_batches``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rlhf_jax.configs import ConfigError
from rlhf_jax.data.iterator import BatchIterator
from rlhf_jax.sharding import process_data_shard

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
