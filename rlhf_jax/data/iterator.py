"""A resumable, deterministic minibatch iterator over a dict of NumPy arrays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_TRIM_SIDES = ("right", "left")


class BatchIterator:
    """Endless minibatches over epochs, each epoch a fresh permutation.

    The permutation of epoch e is `np.random.default_rng([seed, e]).permutation(n)`, so the
    stream depends only on (seed, epoch, position): `get_state()` after any number of batches,
    `set_state()` on a new iterator, and it yields exactly the batches the original would have.

    With `buckets`, each batch's time axis is cut to the smallest bucket holding its longest
    sequence, read from `arrays[bucket_key]` (a 0/1 mask whose last axis is time). Every array of
    the same shape as that mask is cut the same way; `trim_side="right"` keeps the first columns
    (right-padded data), "left" the last ones (left-padded prompts).

    With `group_by`, batches hold examples of similar size, so that the cuts waste little padding
    (Hugging Face's `group_by_length`): each epoch's permutation is split into windows of
    `group_window` whole batches, each window is ordered by the examples' sizes (the nonzero
    count of their row of `arrays[group_by]`; a stable sort, so equal sizes stay shuffled) and its
    batches are dealt in a random order (from the epoch's seed).  Every example is still seen once
    per epoch and every batch still has `batch_size` examples.  With `group_buckets` as well,
    `arrays[group_by]` is a 0/1 mask `[n, items]` (e.g. the K responses of a comparison) and each
    batch's item axis (axis 1 of every array whose first two dims are that mask's) is cut to the
    smallest group bucket holding its last used item, before the time cut.

    Args:
      arrays: equal-length arrays `[n, ...]`.
      batch_size: examples per batch.
      seed: shuffling seed (pass a distinct seed per stage and run).
      shuffle: permute each epoch; otherwise examples come in order.
      drop_last: skip an epoch's final partial batch (keeps shapes static).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        buckets: Sequence[int] | None = None,
        bucket_key: str = "mask",
        trim_side: str = "right",
        group_by: str | None = None,
        group_window: int = 32,
        group_buckets: Sequence[int] | None = None,
    ):
        if not arrays:
            raise ValueError("arrays must hold at least one array")
        self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: v.shape[0] if v.ndim else None for k, v in self._arrays.items()}
        self._n = next(iter(sizes.values()))
        if self._n is None or any(s != self._n for s in sizes.values()):
            raise ValueError(f"arrays must share their first dimension, got sizes {sizes}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if drop_last and batch_size > self._n:
            raise ValueError(
                f"batch_size {batch_size} exceeds the {self._n} examples with drop_last=True"
            )
        if self._n == 0:
            raise ValueError("arrays hold no examples")
        if buckets is not None and bucket_key not in self._arrays:
            raise ValueError(f"bucket_key {bucket_key!r} is not one of {sorted(self._arrays)}")
        if trim_side not in _TRIM_SIDES:
            raise ValueError(f"trim_side must be one of {_TRIM_SIDES}, got {trim_side!r}")
        if group_by is not None and group_by not in self._arrays:
            raise ValueError(f"group_by {group_by!r} is not one of {sorted(self._arrays)}")
        if not isinstance(group_window, int) or group_window < 1:
            raise ValueError(f"group_window must be an int >= 1, got {group_window!r}")
        if group_buckets is not None and (group_by is None or self._arrays[group_by].ndim != 2):
            raise ValueError("group_buckets needs group_by naming a 2-D [n, items] mask")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.buckets = tuple(buckets) if buckets is not None else None
        self.bucket_key = bucket_key
        self.trim_side = trim_side
        self.group_by = group_by
        self.group_window = group_window
        self.group_buckets = tuple(group_buckets) if group_buckets is not None else None
        self._sizes = None
        if group_by is not None:
            self._sizes = np.count_nonzero(self._arrays[group_by].reshape(self._n, -1), axis=1)
        self._epoch = 0
        self._position = 0
        self._order_epoch = -1
        self._order = np.arange(self._n)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from (0-based)."""
        if self._position + (self.batch_size if self.drop_last else 1) > self._n:
            return self._epoch + 1
        return self._epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._n // self.batch_size if self.drop_last else -(-self._n // self.batch_size)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epoch != self._epoch:
            self._epoch, self._position = self.epoch, 0
        idx = self._permutation()[self._position : self._position + self.batch_size]
        self._position += len(idx)
        batch = {k: v[idx] for k, v in self._arrays.items()}
        if self.group_buckets:
            batch = self._trim_items(batch)
        return self._trim(batch) if self.buckets else batch

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream: {"epoch", "position"}."""
        return {"epoch": self._epoch, "position": self._position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state()` of an iterator built with the same arrays and seed."""
        for key in ("epoch", "position"):
            value = state.get(key) if isinstance(state, Mapping) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"state[{key!r}] must be an int >= 0, got {value!r}")
        if state["position"] > self._n:
            raise ValueError(f"state['position'] must be <= {self._n}, got {state['position']}")
        self._epoch, self._position = state["epoch"], state["position"]

    def _permutation(self) -> np.ndarray:
        if self.shuffle and self._order_epoch != self._epoch:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._order = rng.permutation(self._n)
            if self._sizes is not None:
                self._order = self._grouped(self._order, rng)
            self._order_epoch = self._epoch
        return self._order

    def _grouped(self, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``order`` with each window of whole batches sorted by size, its batches dealt in a
        random order; the epoch's final partial batch (if any) stays last."""
        size, whole = self.batch_size, (self._n // self.batch_size) * self.batch_size
        step = size * self.group_window
        parts = []
        for start in range(0, whole, step):
            window = order[start : min(start + step, whole)]
            batches = window[np.argsort(self._sizes[window], kind="stable")].reshape(-1, size)
            parts.append(batches[rng.permutation(len(batches))].reshape(-1))
        return np.concatenate([*parts, order[whole:]])

    def _trim_items(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        valid = batch[self.group_by]
        used = np.nonzero(np.any(valid != 0, axis=0))[0]
        count = int(used[-1]) + 1 if used.size else 0
        fitting = [b for b in self.group_buckets if b >= count]
        count = min(min(fitting), valid.shape[1]) if fitting else valid.shape[1]
        return {k: v[:, :count] if v.shape[:2] == valid.shape else v for k, v in batch.items()}

    def _trim(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key_mask = batch[self.bucket_key]
        time = key_mask.shape[-1]
        used = np.any(key_mask.reshape(-1, time) != 0, axis=0)
        real = np.nonzero(used)[0]
        if real.size == 0:
            length = 0
        elif self.trim_side == "right":
            length = int(real[-1]) + 1
        else:
            length = time - int(real[0])
        fitting = [b for b in self.buckets if b >= length]
        length = min(min(fitting), time) if fitting else time
        cut = slice(0, length) if self.trim_side == "right" else slice(time - length, time)
        return {
            k: v[..., cut] if v.shape == key_mask.shape else v for k, v in batch.items()
        }


class ZipIterator:
    """Several named iterators advanced together: each batch is the union of their batches with
    keys prefixed by the name (``{"prompt_tokens", ..., "ptx_tokens", ...}``); the state is the
    dict of their states, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, **iterators: Any):
        if not iterators:
            raise ValueError("ZipIterator needs at least one iterator")
        self._iterators = iterators

    def __iter__(self) -> ZipIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return {f"{name}_{k}": v for name, it in self._iterators.items() for k, v in next(it).items()}

    def get_state(self) -> dict[str, Any]:
        return {name: it.get_state() for name, it in self._iterators.items()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        missing = set(self._iterators) - set(state)
        if missing:
            raise ValueError(f"ZipIterator state lacks {sorted(missing)}")
        for name, it in self._iterators.items():
            it.set_state(state[name])
