"""Checkpoints: a train-state pytree plus a JSON `meta` dict per step, written atomically by orbax.

Layout: `<directory>/<step>/{state,meta}` on a local or mounted file system. Orbax writes each
step into `<step>.orbax-checkpoint-tmp*`, adds a commit marker and renames it when complete, so a
crash mid-save leaves a tmp dir (or, on file systems without atomic rename, a step dir without
the marker) that is never listed as a step; the last complete step stays restorable.
`guard_finite` is the check a loop runs before saving so a NaN never replaces a good checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "NonFiniteError", "guard_finite"]

log = logging.getLogger(__name__)

# Orbax writes this file into a step directory as the last act of a save, before the rename.
_COMMIT_FILE = getattr(ocp.path.atomicity_types, "COMMIT_SUCCESS_FILE", "commit_success.txt")


class NonFiniteError(FloatingPointError):
    """A metric is NaN or infinite; raised before anything is saved."""


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
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> bool:
        """Save `state` (a pytree of arrays) and `meta` (JSON-able; numpy/jax scalars converted).

        Returns True if a checkpoint was started (step on the `save_every` cadence, or `force`).
        """
        if not force and step % self.save_every != 0:
            return False
        try:
            meta = json.loads(json.dumps(dict(meta), default=_json_default, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}") from e
        if step in self._mgr.all_steps() and not self._complete(step):
            self._move_aside(step)
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
        result takes its structure, dtypes and shardings, and its static fields (e.g. `tx`).
        With `target=None` the state comes back as saved (nested dicts of arrays).

        Raises:
          FileNotFoundError: no complete checkpoint in `directory` (or `step` is not one of them).
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
        return out.state, dict(out.meta)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's resources."""
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _complete(self, step: int) -> bool:
        return (self.directory / str(step) / _COMMIT_FILE).exists()

    def _move_aside(self, step: int) -> None:
        path = self.directory / str(step)
        moved = path.with_name(f"{step}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        log.warning("checkpoint step %d in %s was never completed; moving it to %s", step, self.directory, moved)
        if jax.process_index() == 0:
            path.rename(moved)
        self._mgr.reload()


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} {value!r}")
