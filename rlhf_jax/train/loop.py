"""The loop every stage runs: feed batches, check, log, evaluate, checkpoint, resume.

Files under `workdir`: `checkpoints/<step>/` (orbax; state + meta), `metrics.jsonl`,
`samples.jsonl`, TensorBoard events if available, `config.json` (the run's config, when given),
the lock `.lock` while running, and `DONE` (JSON of the final metrics and the run's fingerprint)
once the last step is saved, so a pipeline can skip a finished stage.

The workdir is guarded (`train.workdir`): one process at a time, orphaned temporaries removed at
start, a damaged newest checkpoint set aside for the newest good one
(`Checkpointer.restore_newest_valid`), and a resumed run whose fingerprint (config and inputs)
differs from the checkpoint's refused unless `LoopConfig.allow_config_change`, which records the
change point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
from jax.experimental import multihost_utils

from rlhf_jax.configs import ConfigError, to_dict
from rlhf_jax.train.checkpoint import Checkpointer, NonFiniteError, guard_finite
from rlhf_jax.train.metrics import METRICS_FILE, SAMPLES_FILE, BatchCount, MetricsWriter, ProgressBar
from rlhf_jax.train.workdir import WorkdirError, describe_changes, fingerprint_changes, workdir_lock

__all__ = ["CONFIG_FILE", "DONE_FILE", "LoopConfig", "StatefulIterator", "run_loop"]

DONE_FILE = "DONE"
CONFIG_FILE = "config.json"

log = logging.getLogger(__name__)

Metrics = Mapping[str, Any]


class StatefulIterator(Protocol):
    """What `run_loop` needs from `batches` (rlhf_jax.data.BatchIterator has this shape)."""

    def __next__(self) -> dict[str, Any]: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Cadences are in loop steps (one `train_step` call each); 0 means "only at the last step".

    `resume`: continue from the newest good checkpoint in `workdir/checkpoints`.
    `force`: start over; the previous run's files are moved to `workdir/replaced-<time>/`.
    `allow_config_change`: resume even though the run's fingerprint differs from the
    checkpoint's; the change point (step, what changed) goes into `config.json`, `metrics.jsonl`,
    later checkpoints and `DONE`.
    """

    total_steps: int
    eval_every: int
    save_every: int
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: bool = True
    force: bool = False
    allow_config_change: bool = False

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
        for name in ("resume", "force", "allow_config_change"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LoopConfig.{name} must be true or false, got {getattr(self, name)!r}")


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
    fingerprint: Mapping[str, Any] | None = None,
    config: Any = None,
    start_record: Mapping[str, Any] | None = None,
    read_recorded: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Run `train_step` from the current (or resumed) step to `loop_cfg.total_steps`.

    Args:
      state: a freshly initialised state; with `resume` and a checkpoint on disk it only serves as
        the restore target (structure, dtypes, shardings, static fields).
      train_step: `(state, batch) -> (state, metrics)`, jitted by the caller; metrics are scalars.
      batches: `next(batches)` gives a batch; `get_state()`/`set_state()` carry its position,
        saved with each checkpoint so a resumed run sees the same data in the same order.
      loop_cfg: cadences, total steps, and how to treat an existing run (`resume`, `force`,
        `allow_config_change`).
      workdir: the stage's output directory, locked for the call (`train.workdir.workdir_lock`).
      eval_fn: `state -> metrics`, run every `eval_every` steps and at the end; logged as `eval/<k>`.
      tokens_in_batch: tokens per batch (int, or a function of the batch returning an int or a
        `metrics.BatchCount`, which adds padding efficiency and MFU) for the progress line.
      on_log: called as `on_log(step, record)` after each metrics line is written.
      fingerprint: what defines the run's result (`train.workdir.fingerprint`), saved in every
        checkpoint and in `DONE`; a resume compares it with the restored checkpoint's.
      config: the run's config (a config dataclass or a dict), written to `workdir/config.json`
        once the run is known to start or resume (with its `config_changes`, if any).
      start_record: scalars written to metrics.jsonl at the start step when training starts or
        resumes (e.g. the data's cut and skipped records, `data.data_metrics`).
      read_recorded: how this version reads a fingerprint an earlier run recorded (e.g. without
        the fields that have since stopped defining the result), applied to the restored
        checkpoint's fingerprint before the comparison; None compares it as recorded.

    Returns:
      The final state and the history: every record of metrics.jsonl (train and eval lines,
      including those of earlier runs of a resumed stage; only this run's on non-primary hosts).

    Raises:
      NonFiniteError: a train or eval metric is NaN/inf; raised before that step is saved, and the
        message names the step and the newest checkpoint still on disk.
      WorkdirError: another process holds the workdir, or the checkpoint to resume was written
        under a different fingerprint (and `allow_config_change` is off).
      CheckpointError: no checkpoint restores (each named with its reason), or a save failed.
      ValueError: `resume=False` but workdir already has checkpoints.
      RuntimeError: `batches` ran out before `total_steps`.
    """
    workdir = Path(workdir)
    with workdir_lock(workdir):
        if loop_cfg.force:
            _set_previous_run_aside(workdir)
        return _run(state, train_step, batches, loop_cfg, workdir, eval_fn, tokens_in_batch, on_log,
                    fingerprint, config, start_record, read_recorded)


def _run(state, train_step, batches, loop_cfg, workdir, eval_fn, tokens_in_batch, on_log, fingerprint, config,
         start_record, read_recorded):
    """`run_loop`'s body, run holding the workdir lock."""
    primary = jax.process_index() == 0
    total = loop_cfg.total_steps
    ckpt = Checkpointer(workdir / "checkpoints", keep=loop_cfg.keep_checkpoints)
    writer = MetricsWriter(workdir)
    progress = None
    ok = False
    try:
        start, last_train, last_eval, changes, config_changes = 0, {}, {}, [], []
        latest = ckpt.latest_step()
        if latest is not None and not loop_cfg.resume:
            raise ValueError(
                f"{workdir / 'checkpoints'} already has checkpoints (newest: step {latest}) and "
                "LoopConfig.resume is False; resume or use a fresh workdir"
            )
        restored = None if latest is None else ckpt.restore_newest_valid(state)
        if restored is not None:
            state, meta = restored
            changes = _resume_changes(meta, fingerprint, loop_cfg, workdir, read_recorded)
            batches.set_state(meta["data"])
            start, last_train, last_eval = meta["step"], meta["metrics"], meta["eval"]
            config_changes = list(meta.get("config_changes", []))
        writer.rewind(start)
        if changes:
            log.warning("%s: continuing from step %d with a changed config (loop.allow_config_change): %s",
                        workdir, start, "; ".join(changes))
            config_changes.append({"step": start, "changes": changes})
            if primary:
                _append_jsonl(workdir / METRICS_FILE, {"step": start, "config_changes": changes})
        if config is not None and primary:
            data = dict(config) if isinstance(config, Mapping) else to_dict(config)
            changed = {"config_changes": config_changes} if config_changes else {}
            _write_json_atomic(workdir / CONFIG_FILE, {**data, **changed}, indent=2)
        history = writer.read()
        identity = {} if fingerprint is None else {"fingerprint": fingerprint, "config_changes": config_changes}
        done_path = workdir / DONE_FILE
        if start >= total:  # finished before (maybe killed between the last save and DONE)
            if primary and not done_path.exists():
                _write_json_atomic(done_path, {"step": start, "metrics": last_train, "eval": last_eval, **identity})
            ok = True
            return state, history
        if primary and done_path.exists():
            done_path.unlink()  # total_steps grew since the stage last finished
        if start_record:
            history.append(writer.write(start, start_record))

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

        def log_line(step: int, metrics: Mapping[str, Any]) -> None:
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
                log_line(step, last_train)
            if eval_due:
                last_eval = checked(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                log_line(step, last_eval)
            if save_due:
                meta = {"step": step, "data": batches.get_state(), "metrics": last_train, "eval": last_eval,
                        **identity}
                ckpt.save(step, state, meta, force=True)
            progress.update(step, _count_tokens(tokens_in_batch, batch))
        ckpt.wait()
        if primary:
            _write_json_atomic(done_path, {"step": total, "metrics": last_train, "eval": last_eval, **identity})
        ok = True
        return state, history
    finally:
        if progress is not None:
            progress.close()
        writer.close()
        if ok:
            ckpt.close()
        else:  # already failing: close without letting a second error hide the first
            with contextlib.suppress(Exception):
                ckpt.close()


def _resume_changes(meta: Mapping[str, Any], fingerprint: Mapping[str, Any] | None, loop_cfg: LoopConfig,
                    workdir: Path, read_recorded: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None
                    ) -> list[str]:
    """What differs between the restored checkpoint's fingerprint (read by `read_recorded`) and
    this run's; WorkdirError unless nothing or `allow_config_change`."""
    if fingerprint is None:
        return []
    saved = meta.get("fingerprint")
    if saved is None:
        log.warning("%s: checkpoint step %s records no fingerprint (an older version wrote it); resuming "
                    "without checking the config", workdir, meta.get("step"))
        return []
    changes = fingerprint_changes(saved if read_recorded is None else read_recorded(saved), fingerprint)
    if changes and not loop_cfg.allow_config_change:
        raise WorkdirError(
            f"{workdir} has a checkpoint (step {meta['step']}) of a run with another config or input: "
            f"{describe_changes(changes)}; use a new workdir, set loop.force=true to start over here, or "
            f"loop.allow_config_change=true to continue from step {meta['step']} with the new config"
        )
    return changes


def _set_previous_run_aside(workdir: Path) -> None:
    """`loop.force`: move an earlier run's files into `workdir/replaced-<time>/` (nothing is
    deleted), so the run starts over."""
    names = ["checkpoints", DONE_FILE, METRICS_FILE, SAMPLES_FILE, CONFIG_FILE, "model"]
    found = [workdir / n for n in names if (workdir / n).exists()] + sorted(workdir.glob("events.out.tfevents.*"))
    if found and jax.process_index() == 0:
        target = workdir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while target.exists():
            n += 1
            target = workdir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        target.mkdir()
        for path in found:
            shutil.move(str(path), str(target / path.name))
        log.warning("loop.force: moved the previous run in %s to %s (delete it when no longer needed)",
                    workdir, target.name)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rlhf_jax loop.force")


def _every(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _count_tokens(tokens_in_batch: int | Callable[[dict[str, Any]], int | BatchCount] | None,
                  batch: dict) -> int | BatchCount | None:
    if tokens_in_batch is None or isinstance(tokens_in_batch, int):
        return tokens_in_batch
    count = tokens_in_batch(batch)
    return count if isinstance(count, BatchCount) else int(count)


def _append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_json_atomic(path: Path, data: Any, indent: int | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jax.tree.map(_python, data), indent=indent) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _python(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
