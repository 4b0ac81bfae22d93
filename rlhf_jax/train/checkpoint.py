"""Checkpoints: a train-state pytree plus a JSON `meta` dict per step, written atomically by orbax.

Layout: `<directory>/<step>/{state,meta}` on a local or mounted file system. Orbax writes each
step into `<step>.orbax-checkpoint-tmp*`, adds a commit marker and renames it when complete, so a
crash mid-save leaves a tmp dir (or, on file systems without atomic rename, a step dir without
the marker) that is never listed as a step; the last complete step stays restorable.

Atomic rename does not protect a finished checkpoint from a disk, a copy or a sync tool.  Each
save therefore records a checksum of every array (`checksums`: a position-weighted sum of the
array's bits, computed on device) in `meta`, and a restore into a target verifies them, so a
flipped bit is caught like a truncated file.  `restore_newest_valid` walks back from the newest
step past those that fail to restore or verify, moving each aside to `<step>.corrupt` (never
deleting it), with one warning each.

`guard_finite` is the check a loop runs before saving so a NaN never replaces a good checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rlhf_jax.errors import CheckpointError, NonFiniteError

__all__ = ["CheckpointError", "Checkpointer", "NonFiniteError", "checksums", "guard_finite"]

log = logging.getLogger(__name__)

# Orbax writes this file into a step directory as the last act of a save, before the rename.
_COMMIT_FILE = getattr(ocp.path.atomicity_types, "COMMIT_SUCCESS_FILE", "commit_success.txt")


_CHECKSUMS = "_checksums"  # the key of `meta` holding the state's array checksums
_REASON_CHARS = 240


def guard_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raise NonFiniteError("loss is nan at step 12") if any metric has a NaN or ±inf element.

    `metrics` values are host scalars or arrays (jax arrays are fetched); non-float values are
    ignored. Every bad key is named, in the mapping's order: "grad_norm is nan, kl is inf at step 3".
    """
    bad = []
    for key, value in metrics.items():
        value = np.asarray(jax.device_get(value))
        if not np.issubdtype(value.dtype, np.inexact) or np.isfinite(value).all():
            continue
        bad.append(f"{key} is {'nan' if np.isnan(value).any() else 'inf'}")
    if bad:
        raise NonFiniteError(f"{', '.join(bad)} at step {step}")


class Checkpointer:
    """Saves/restores (state pytree, meta dict) pairs under `directory`, keeping the newest `keep`.

    `save(step, ...)` writes only when `step % save_every == 0` (or `force=True`). Saves are
    asynchronous: arrays are copied to host before `save` returns, so the caller may donate or
    overwrite them; call `wait()` before reading the files and `close()` at the end.
    Multi-host: every process calls `save`/`restore` (orbax coordinates the writes).
    """

    def __init__(
        self, directory: str | Path, *, keep: int = 3, save_every: int = 1, async_save: bool = True
    ) -> None:
        if keep < 1:
            raise ValueError(f"Checkpointer keep must be >= 1, got {keep}")
        if save_every < 1:
            raise ValueError(f"Checkpointer save_every must be >= 1, got {save_every}")
        self.directory = Path(directory).absolute()
        self.save_every = save_every
        try:
            self._mgr = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=True, enable_async_checkpointing=async_save
                ),
                item_names=("state", "meta"),
            )
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint directory {self.directory}: {_reason(e)}") from e

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and `meta` (JSON-able; numpy/jax scalars converted),
        with the checksums of `state`'s arrays.

        Returns True if a checkpoint was started (step on the `save_every` cadence, or `force`).

        Raises:
          CheckpointError: the directory is not writable, or an earlier asynchronous save failed.
        """
        if not force and step % self.save_every != 0:
            return False
        if _CHECKSUMS in meta:
            raise ValueError(f"checkpoint meta for step {step}: the key {_CHECKSUMS!r} is reserved")
        try:
            meta = json.loads(json.dumps(dict(meta), default=_json_default, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from e
        self._check_writable(step)
        if step in self._mgr.all_steps() and not self._complete(step):
            self._set_aside(step, f"incomplete-{time.strftime('%Y%m%d-%H%M%S')}", "was never completed")
        meta[_CHECKSUMS] = checksums(state)
        with self._failures(f"saving checkpoint step {step} in {self.directory} failed"):
            return self._mgr.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def latest_step(self) -> int | None:
        """The newest completely written step, or None if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps written completely (with orbax's commit marker), oldest first.

        Tmp dirs of interrupted saves are never listed by orbax; a step directory without the
        marker (a crash mid-save where the file system cannot rename atomically) is skipped too.
        """
        self._mgr.reload()
        return sorted(s for s in self._mgr.all_steps() if self._complete(s))

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict[str, Any]]:
        """Load `(state, meta)` of `step` (None: the newest complete step).

        `target` is a pytree like the saved state (real arrays or `jax.ShapeDtypeStruct`s); the
        result takes its structure, dtypes and shardings, and its static fields (e.g. `tx`), and
        its arrays are verified against the checksums recorded at save (when there are some:
        checkpoints of older versions have none).  With `target=None` the state comes back as
        saved (nested dicts of arrays), unverified.

        Raises:
          FileNotFoundError: no complete checkpoint in `directory` (or `step` is not one of them).
          CheckpointError: an array's checksum differs from the one recorded at save.
          Exception: whatever orbax or TensorStore raise for a damaged checkpoint.
        """
        steps = self.all_steps()
        if step is None and steps:
            step = steps[-1]
        if step is None or step not in steps:
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory}; have {steps}")
        if target is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
        out = self._mgr.restore(step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore()))
        meta = dict(out.meta)
        saved = meta.pop(_CHECKSUMS, None)
        if target is not None and saved is not None:
            read = checksums(out.state)
            bad = [k for k in saved.keys() | read.keys() if saved.get(k) != read.get(k)]
            if bad:
                raise CheckpointError(f"checksum mismatch in {len(bad)} array(s) of step {step}: {', '.join(sorted(bad)[:3])}")
        return out.state, meta

    def restore_newest_valid(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`restore(step, target)` of the newest step that restores and verifies; None if there
        is no checkpoint.

        Each newer step that fails is moved aside to `<step>.corrupt` (kept for inspection) with
        one warning naming it and the reason, once an older step has restored.  The noise a failed
        orbax read leaves behind is silenced (`_silence_abandoned_io`).  Multi-host: every process calls it; a step counts as restored only if it
        restored on every process.

        Raises:
          CheckpointError: no step restores; names each step tried and why (nothing is moved).
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            restored, reason = self._try_restore(step, target)
            if not _on_all_processes(restored is not None):
                failed.append((step, reason or "failed on another process"))
                continue
            for bad, why in failed:
                self._set_aside(bad, "corrupt", f"does not restore ({why}); resuming from step {step}")
            return restored
        if failed:
            tried = "; ".join(f"step {s}: {why}" for s, why in failed)
            raise CheckpointError(f"no checkpoint in {self.directory} restores ({tried}); move them away to "
                                  "start over, or use a new workdir")
        return None

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk.

        Raises:
          CheckpointError: a pending save failed (e.g. the disk filled up).
        """
        with self._failures(f"saving a checkpoint in {self.directory} failed"):
            self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources (also when the wait fails)."""
        try:
            self.wait()
        finally:
            self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _complete(self, step: int) -> bool:
        return (self.directory / str(step) / _COMMIT_FILE).exists()

    def _set_aside(self, step: int, suffix: str, why: str) -> None:
        """Rename `<step>` to `<step>.<suffix>` (`-2`, `-3`, ... appended if taken), logging why."""
        path = self.directory / str(step)
        moved = path.with_name(f"{step}.{suffix}")
        n = 1
        while moved.exists():
            n += 1
            moved = path.with_name(f"{step}.{suffix}-{n}")
        log.warning("checkpoint %s %s; moved it to %s", path, why, moved.name)
        if jax.process_index() == 0:
            path.rename(moved)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rlhf_jax checkpoint set aside {step}")
        self._mgr.reload()

    def _check_writable(self, step: int) -> None:
        """Fail before orbax starts a save that cannot create its directory: orbax's threads
        would wait for that directory until their timeout (minutes) and hold up the exit."""
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=self.directory))
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint step {step} in {self.directory}: {_reason(e)}") from e

    @contextlib.contextmanager
    def _failures(self, what: str) -> Iterator[None]:
        """Turn an orbax save failure into a one-line CheckpointError and release the orbax
        threads still waiting on the failed save (so the process can exit).  The noise of the
        writes a failing save abandons is filtered from before the save starts
        (``_silence_abandoned_io``): TensorStore reports them as soon as orbax closes its loop,
        before the failure reaches this thread."""
        _silence_abandoned_io()
        try:
            yield
        except Exception as e:
            _release_orbax_threads()
            raise CheckpointError(f"{what}: {_reason(e)}") from e

    def _try_restore(self, step: int, target: Any) -> tuple[tuple[Any, dict[str, Any]] | None, str | None]:
        hook = sys.unraisablehook
        _silence_abandoned_io()  # TensorStore's callbacks hit the closed loop during the failing read
        try:
            restored = self.restore(step, target)
        except Exception as e:  # any failure to read the step back means: try an older one
            reason = _reason(e)
        else:
            sys.unraisablehook = hook  # a read that succeeded abandons nothing
            return restored, None
        _close_unstarted_orbax_coroutines()
        gc.collect()  # the failed read's abandoned coroutines, now, under the filter
        return None, reason


def checksums(state: Any) -> dict[str, int]:
    """`{leaf path: checksum}` of a pytree of arrays, e.g. `{"params/dense/kernel": 2718...}`.

    A leaf's checksum is `sum_i bits_i * (2654435761 * i + 1 | 1) mod 2**32` over its elements'
    bits as uint32 words (narrower dtypes widened, 64-bit ones split; typed PRNG keys by their key
    data), computed on device in one jitted program (sharded arrays stay in place; every process
    of a multi-host run gets the same numbers).  Integer arithmetic makes it independent of the
    reduction order, and with odd weights any single flipped bit changes it.
    """
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    names = ["/".join(_key_name(k) for k in path) for path, _ in leaves]
    sums = jax.device_get(_leaf_checksums([leaf for _, leaf in leaves]))
    return {name: int(value) for name, value in zip(names, sums)}


@jax.jit
def _leaf_checksums(leaves: list[Any]) -> list[jax.Array]:
    return [_checksum(x) for x in leaves]


def _checksum(x: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size < 4:
        words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte dtypes gain a trailing axis of 2
    words = words.reshape(-1)
    weights = jax.lax.iota(jnp.uint32, words.size) * jnp.uint32(2654435761) + jnp.uint32(1) | jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _reason(e: BaseException) -> str:
    """The innermost cause of `e` as one line (orbax wraps TensorStore's error in a message
    that dumps the whole store spec)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror + (f": {e.filename}" if e.filename else "")
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def _on_all_processes(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _silence_abandoned_io() -> None:
    """Filter what a failed orbax read or write leaves behind: "Exception ignored in
    <coroutine>" when its abandoned coroutines are collected, asyncio's "Task (or Future) exception was
    never retrieved" for its abandoned tasks, and "Event loop is closed" when TensorStore reads
    or writes still in flight complete after orbax closed their event loop (TensorStore's threads
    report it through ``sys.unraisablehook`` with no object, as a bare traceback, during the
    failing call or at any later time, e.g. while the process exits after a failed save: seen in
    2 to 3 of 10 runs of a save onto a full disk).  Other unraisable exceptions reach the
    previous hook.  Installed for each restore attempt (once per hook) and kept after a failed
    one, and before every save (``Checkpointer._failures``)."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _AbandonedTasks) for f in asyncio_log.filters):
        asyncio_log.addFilter(_AbandonedTasks())
    previous = sys.unraisablehook
    if getattr(previous, "_abandoned_io_filter", False):
        return

    def hook(unraisable: Any) -> None:
        obj, exc = unraisable.object, unraisable.exc_value
        if inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename:
            return
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._abandoned_io_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class _AbandonedTasks(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" reports of orbax's tasks and
    TensorStore's reads (the failing read has already been reported as one warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        abandoned = message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
        return not (abandoned and ("orbax" in message or "tensorstore" in message))


def _release_orbax_threads() -> None:
    """After a failed save: wake orbax's signalling threads that wait for a step directory that
    will never exist (they are not daemons and would hold the process at exit until orbax's 300 s
    coordination timeout), then close the orbax coroutines that will now never run.  Affects every orbax save of the process (one at a time in a run).  Uses
    orbax internals (0.11-0.12); without them it does nothing."""
    try:
        from orbax.checkpoint._src.futures import future as ocp_future

        thread_type, set_signals = ocp_future._SignalingThread, ocp_future.set_signals
    except (ImportError, AttributeError):
        return
    threads = [t for t in threading.enumerate() if isinstance(t, thread_type) and t.is_alive()]
    for thread in threads:
        with contextlib.suppress(Exception):
            thread.cancel()
            set_signals(thread._receive_signals, operation_id=thread._operation_id)
    for thread in threads:
        threading.Thread.join(thread, timeout=5)  # orbax's join() raises CancelledError now
    _close_unstarted_orbax_coroutines()


def _close_unstarted_orbax_coroutines() -> None:
    """Close orbax coroutines that a failed save or read will never run, so that collecting them
    warns of nothing ("coroutine ... was never awaited")."""
    for obj in gc.get_objects():
        if (inspect.iscoroutine(obj) and "orbax" in obj.cr_code.co_filename
                and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED):
            obj.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} {value!r}")
