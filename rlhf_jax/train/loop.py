"""The loop every stage runs: feed batches, check, log, evaluate, checkpoint, resume.

Files under `workdir`: `checkpoints/<step>/` (orbax; state + meta), `metrics.jsonl`,
`samples.jsonl`, TensorBoard events if available, and `DONE` (JSON of the final metrics) once the
last step is saved, so a pipeline can skip a finished stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax

from rlhf_jax.configs import ConfigError
from rlhf_jax.train.checkpoint import Checkpointer, NonFiniteError, guard_finite
from rlhf_jax.train.metrics import MetricsWriter, ProgressBar

__all__ = ["LoopConfig", "StatefulIterator", "run_loop", "DONE_FILE"]

DONE_FILE = "DONE"

Metrics = Mapping[str, Any]


class StatefulIterator(Protocol):
    """What `run_loop` needs from `batches` (rlhf_jax.data.BatchIterator has this shape)."""

    def __next__(self) -> dict[str, Any]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Cadences are in loop steps (one `train_step` call each); 0 means "only at the last step"."""

    total_steps: int
    eval_every: int
    save_every: int
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: bool = True  # continue from the newest checkpoint in workdir/checkpoints

    def __post_init__(self) -> None:
        rules = {
            "total_steps": (1, self.total_steps),
            "eval_every": (0, self.eval_every),
            "save_every": (0, self.save_every),
            "keep_checkpoints": (1, self.keep_checkpoints),
            "log_every": (1, self.log_every),
        }
        for name, (low, value) in rules.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"LoopConfig.{name} must be an int >= {low}, got {value!r}")


def run_loop(
    *,
    state: Any,
    train_step: Callable[[Any, dict[str, Any]], tuple[Any, Metrics]],
    batches: StatefulIterator,
    loop_cfg: LoopConfig,
    workdir: str | Path,
    eval_fn: Callable[[Any], Metrics] | None = None,
    tokens_in_batch: int | Callable[[dict[str, Any]], int] | None = None,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run `train_step` from the current (or resumed) step to `loop_cfg.total_steps`.

    Args:
      state: a freshly initialised state; with `resume` and a checkpoint on disk it only serves as
        the restore target (structure, dtypes, shardings, static fields).
      train_step: `(state, batch) -> (state, metrics)`, jitted by the caller; metrics are scalars.
      batches: `next(batches)` gives a batch; `get_state()`/`set_state()` carry its position,
        saved with each checkpoint so a resumed run sees the same data in the same order.
      loop_cfg: cadences and total steps.
      workdir: the stage's output directory.
      eval_fn: `state -> metrics`, run every `eval_every` steps and at the end; logged as `eval/<k>`.
      tokens_in_batch: tokens per batch (int, or a function of the batch) for the tokens/s display.
      on_log: called as `on_log(step, record)` after each metrics line is written.

    Returns:
      The final state and the history: every record of metrics.jsonl (train and eval lines,
      including those of earlier runs of a resumed stage; only this run's on non-primary hosts).

    Raises:
      NonFiniteError: a train or eval metric is NaN/inf; raised before that step is saved, and the
        message names the step and the newest checkpoint still on disk.
      ValueError: `resume=False` but workdir already has checkpoints.
      RuntimeError: `batches` ran out before `total_steps`.
    """
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    total = loop_cfg.total_steps
    ckpt = Checkpointer(workdir / "checkpoints", keep=loop_cfg.keep_checkpoints)
    writer = MetricsWriter(workdir)
    progress = None
    try:
        start, last_train, last_eval = 0, {}, {}
        latest = ckpt.latest_step()
        if latest is not None and not loop_cfg.resume:
            raise ValueError(
                f"{workdir / 'checkpoints'} already has checkpoints (newest: step {latest}) and "
                "LoopConfig.resume is False; resume or use a fresh workdir"
            )
        if latest is not None:
            state, meta = ckpt.restore(latest, target=state)
            batches.set_state(meta["data"])
            start, last_train, last_eval = meta["step"], meta["metrics"], meta["eval"]
        writer.rewind(start)
        history = writer.read()
        done_path = workdir / DONE_FILE
        if start >= total:  # finished before (maybe killed between the last save and DONE)
            if primary and not done_path.exists():
                _write_json_atomic(done_path, {"step": start, "metrics": last_train, "eval": last_eval})
            return state, history
        if primary and done_path.exists():
            done_path.unlink()  # total_steps grew since the stage last finished

        def checked(step: int, metrics: Metrics) -> dict[str, Any]:
            host = dict(zip(metrics, jax.device_get(list(metrics.values()))))  # keeps the key order
            try:
                guard_finite(host, step)
            except NonFiniteError as e:
                ckpt.wait()
                raise NonFiniteError(
                    f"{e}; stopped before saving; newest checkpoint: step {ckpt.latest_step()} in "
                    f"{ckpt.directory}"
                ) from None
            return host

        def log(step: int, metrics: Mapping[str, Any]) -> None:
            record = writer.write(step, metrics)
            history.append(record)
            if on_log is not None:
                on_log(step, record)

        progress = ProgressBar(total, workdir.name, initial=start)
        pending: list[tuple[int, Metrics]] = []  # device metrics not yet fetched (keeps dispatch async)
        for step in range(start + 1, total + 1):
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"batches ran out after step {step - 1} of {total}") from None
            state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            final = step == total
            log_due = step % loop_cfg.log_every == 0 or final
            eval_due = eval_fn is not None and (_every(step, loop_cfg.eval_every) or final)
            save_due = _every(step, loop_cfg.save_every) or final
            if log_due or eval_due or save_due:
                for s, m in pending:
                    last_train = checked(s, m)
                pending.clear()
            if log_due:
                log(step, last_train)
            if eval_due:
                last_eval = checked(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                log(step, last_eval)
            if save_due:
                meta = {"step": step, "data": batches.get_state(), "metrics": last_train, "eval": last_eval}
                ckpt.save(step, state, meta, force=True)
            progress.update(step, _count_tokens(tokens_in_batch, batch))
        ckpt.wait()
        if primary:
            _write_json_atomic(done_path, {"step": total, "metrics": last_train, "eval": last_eval})
        return state, history
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        ckpt.close()


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _count_tokens(tokens_in_batch: int | Callable[[dict[str, Any]], int] | None, batch: dict) -> int | None:
    if tokens_in_batch is None or isinstance(tokens_in_batch, int):
        return tokens_in_batch
    return int(tokens_in_batch(batch))


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jax.tree.map(_python, data)) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _python(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
