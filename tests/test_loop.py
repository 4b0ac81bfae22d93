"""run_loop: resume determinism, NaN stop before saving, eval/save/log cadence, DONE marker;
the fallback past a damaged checkpoint, fingerprints on resume, force, the lock, failed saves."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rlhf_jax.configs import ConfigError
from rlhf_jax.train import (
    DONE_FILE,
    CheckpointError,
    Checkpointer,
    LoopConfig,
    NonFiniteError,
    OptimizerConfig,
    TrainState,
    WorkdirError,
    make_optimizer,
    run_loop,
)
from rlhf_jax.train.workdir import fingerprint
from test_checkpoint import DAMAGE_MODES, NOISE, damage

TESTS = Path(__file__).resolve().parent
DATA_RNG = np.random.default_rng(0)
X = DATA_RNG.normal(size=(24, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1).astype(np.float32)
TX = make_optimizer(OptimizerConfig(lr=0.05, warmup_steps=2, schedule="cosine", total_steps=12, weight_decay=0.01))


class FakeBatches:
    """The BatchIterator protocol: reshuffles every epoch with a key derived from (seed, epoch)."""

    def __init__(self, batch_size: int = 4, seed: int = 0, poison_at: int | None = None):
        self.batch_size, self.seed, self.poison_at = batch_size, seed, poison_at
        self.epoch, self.pos, self.served = 0, 0, []

    def __next__(self):
        if self.pos >= len(X):
            self.epoch, self.pos = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(X))
        idx = order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        self.served.append(idx.tolist())
        x = X[idx]
        if self.poison_at is not None and len(self.served) == self.poison_at:
            x = x * np.float32("nan")
        return {"x": x, "y": Y[idx]}

    def get_state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


class FiniteBatches(FakeBatches):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __next__(self):
        if len(self.served) == self.n:
            raise StopIteration
        return super().__next__()


def fresh_state() -> TrainState:
    """What a (re)started process builds before run_loop: the same init every time."""
    params = {"dense": {"kernel": jnp.zeros((3, 1)), "bias": jnp.zeros(1)}}
    return TrainState.create(params, TX, jax.random.PRNGKey(42))


@jax.jit
def train_step(state: TrainState, batch):
    rng, noise_key = jax.random.split(state.rng)
    # Input noise makes the result depend on the RNG carried in the state.
    x = batch["x"] + 0.01 * jax.random.normal(noise_key, batch["x"].shape)

    def loss_fn(params):
        pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
        return jnp.mean((pred - batch["y"]) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads).replace(rng=rng)
    return state, {"loss": loss, "grad_norm": jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))}


@jax.jit
def _eval(params):
    pred = X @ params["dense"]["kernel"] + params["dense"]["bias"]
    return {"loss": jnp.mean((pred - Y) ** 2)}


def eval_fn(state):
    return _eval(state.params)


def run(workdir, total, batches=None, step=train_step, **cfg):
    cfg = {"eval_every": 3, "save_every": 3, **cfg}
    batches = FakeBatches() if batches is None else batches
    extra = {k: cfg.pop(k) for k in ("fingerprint", "config") if k in cfg}
    state, history = run_loop(
        state=fresh_state(),
        train_step=step,
        batches=batches,
        loop_cfg=LoopConfig(total_steps=total, **cfg),
        workdir=workdir,
        eval_fn=eval_fn,
        **extra,
    )
    return state, history, batches


def lines(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def without_step(record):
    return {k: v for k, v in record.items() if k != "step"}


class CrashAt(Exception):
    pass


def crashing_step(at: int):
    def step(state, batch):
        if int(state.step) + 1 == at:
            raise CrashAt(f"killed at step {at}")
        return train_step(state, batch)

    return step


@pytest.mark.parametrize("interruption", ["stop", "crash"])
def test_resume_is_bitwise_identical(tmp_path, interruption):
    straight_state, straight_history, straight_batches = run(tmp_path / "a", total=12)

    workdir = tmp_path / "b"
    if interruption == "stop":  # a first run of 6 steps, then a new process continues to 12
        _, _, first_batches = run(workdir, total=6)
        assert (workdir / DONE_FILE).exists()
    else:  # the process dies at step 8, after the step-6 checkpoint and two logged steps
        first_batches = FakeBatches()
        with pytest.raises(CrashAt):
            run_loop(
                state=fresh_state(),
                train_step=crashing_step(8),
                batches=first_batches,
                loop_cfg=LoopConfig(total_steps=12, eval_every=3, save_every=3),
                workdir=workdir,
                eval_fn=eval_fn,
            )
        assert lines(workdir)[-1]["step"] == 7
        assert not (workdir / DONE_FILE).exists()
    resumed_state, resumed_history, second_batches = run(workdir, total=12)

    for a, b in zip(jax.tree.leaves(straight_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed_state.step) == 12
    assert (workdir / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()
    assert resumed_history == straight_history == lines(tmp_path / "a")
    assert first_batches.served[:6] + second_batches.served == straight_batches.served
    assert (workdir / DONE_FILE).read_text() == (tmp_path / "a" / DONE_FILE).read_text()
    assert straight_history[-1]["eval/loss"] < straight_history[0]["loss"]  # it does learn


def test_nan_stops_before_saving(tmp_path):
    cfg = LoopConfig(total_steps=10, eval_every=0, save_every=2, log_every=3)
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 5; stopped before saving; newest checkpoint: step 4"):
        run_loop(
            state=fresh_state(),
            train_step=train_step,
            batches=FakeBatches(poison_at=5),
            loop_cfg=cfg,
            workdir=tmp_path,
        )
    assert not (tmp_path / DONE_FILE).exists()
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4]
        state, meta = ckpt.restore(target=fresh_state())
    assert meta["step"] == 4 and meta["data"] == {"epoch": 0, "pos": 16}
    assert int(state.step) == 4
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
    assert [r["step"] for r in lines(tmp_path)] == [3]


def test_cadence_meta_and_done(tmp_path):
    logged, tokens = [], []
    batches = FakeBatches()

    def count_tokens(batch):
        tokens.append(batch["x"].shape[0])
        return batch["x"].shape[0]

    state, history = run_loop(
        state=fresh_state(),
        train_step=train_step,
        batches=batches,
        loop_cfg=LoopConfig(total_steps=7, eval_every=3, save_every=2, log_every=2, keep_checkpoints=10),
        workdir=tmp_path,
        eval_fn=eval_fn,
        tokens_in_batch=count_tokens,
        on_log=lambda step, record: logged.append(record),
    )
    records = lines(tmp_path)
    kinds = [(r["step"], "eval" if "eval/loss" in r else "train") for r in records]
    assert kinds == [(2, "train"), (3, "eval"), (4, "train"), (6, "train"), (6, "eval"), (7, "train"), (7, "eval")]
    assert records == history == logged
    assert set(records[0]) == {"step", "loss", "grad_norm"}
    assert len(tokens) == 7

    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4, 6, 7]
        _, meta4 = ckpt.restore(4, target=fresh_state())
        _, meta7 = ckpt.restore(7, target=fresh_state())
    # The iterator state after the batches consumed so far: 4 batches of 4 = position 16.
    assert meta4["step"] == 4 and meta4["data"] == {"epoch": 0, "pos": 16}
    assert meta4["metrics"] == without_step(records[2]) and meta4["eval"] == without_step(records[1])
    assert meta7["data"] == {"epoch": 1, "pos": 4}
    done = json.loads((tmp_path / DONE_FILE).read_text())
    assert done == {"step": 7, "metrics": without_step(records[5]), "eval": without_step(records[6])}
    assert int(state.step) == 7


def test_finished_stage_is_not_rerun(tmp_path):
    run(tmp_path, total=3)
    calls = []

    def step(state, batch):
        calls.append(1)
        return train_step(state, batch)

    state, history = run_loop(
        state=fresh_state(),
        train_step=step,
        batches=FakeBatches(),
        loop_cfg=LoopConfig(total_steps=3, eval_every=3, save_every=3),
        workdir=tmp_path,
    )
    assert calls == [] and int(state.step) == 3 and history == lines(tmp_path)


def test_resume_false_with_checkpoints_raises(tmp_path):
    run(tmp_path, total=3)
    with pytest.raises(ValueError, match=r"already has checkpoints \(newest: step 3\) and LoopConfig\.resume is False"):
        run(tmp_path, total=6, resume=False)


def test_batches_running_out_raises(tmp_path):
    with pytest.raises(RuntimeError, match=r"batches ran out after step 2 of 5"):
        run(tmp_path, total=5, batches=FiniteBatches(2))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"total_steps": 0}, r"LoopConfig\.total_steps must be an int >= 1, got 0"),
        ({"eval_every": -1}, r"LoopConfig\.eval_every must be an int >= 0, got -1"),
        ({"save_every": 1.5}, r"LoopConfig\.save_every must be an int >= 0, got 1\.5"),
        ({"keep_checkpoints": 0}, r"LoopConfig\.keep_checkpoints must be an int >= 1"),
        ({"log_every": 0}, r"LoopConfig\.log_every must be an int >= 1"),
    ],
)
def test_loop_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        LoopConfig(**{"total_steps": 5, "eval_every": 1, "save_every": 1, **kwargs})


# ------------------------------------------------------------------- fallback past damage


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """12 steps in one go (checkpoints at 3, 6, 9, 12): what every interrupted run must equal."""
    workdir = tmp_path_factory.mktemp("straight")
    state, history, batches = run(workdir, total=12)
    return workdir, state, history, batches


def assert_same_run(workdir, straight) -> None:
    ref_dir, ref_state, _, _ = straight
    with Checkpointer(workdir / "checkpoints") as ckpt:
        state, _ = ckpt.restore(12, target=fresh_state())
    for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (workdir / "metrics.jsonl").read_text() == (ref_dir / "metrics.jsonl").read_text()
    done, want = (json.loads((d / DONE_FILE).read_text()) for d in (workdir, ref_dir))
    assert {k: done[k] for k in want} == want


@pytest.mark.parametrize("mode", DAMAGE_MODES)
def test_damaged_checkpoint_resumes_from_the_previous_one(tmp_path, straight, mode, caplog, capfd):
    """Killed at step 11 (checkpoints 3, 6, 9), the step-9 checkpoint damaged: the re-run
    resumes from step 6, with step 6's data position and RNG, and ends bitwise equal."""
    with pytest.raises(CrashAt):
        run(tmp_path, total=12, step=crashing_step(11))
    damage(tmp_path / "checkpoints" / "9", mode)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        state, history, batches = run(tmp_path, total=12)
    assert batches.served == straight[3].served[6:]  # step 6's data position
    assert_same_run(tmp_path, straight)
    assert history == straight[2]
    assert (tmp_path / "checkpoints" / "9.corrupt").is_dir()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "checkpoints/9 does not restore" in warnings[0], warnings
    out, err = capfd.readouterr()
    assert not [n for n in NOISE if n in out + err], err[-2000:]


def test_no_good_checkpoint_is_one_error(tmp_path):
    with pytest.raises(CrashAt):
        run(tmp_path, total=12, step=crashing_step(8))  # checkpoints 3 and 6
    damage(tmp_path / "checkpoints" / "6", "truncate")
    damage(tmp_path / "checkpoints" / "3", "metadata")
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints restores \(step 6: .*; step 3: .*\)"):
        run(tmp_path, total=12)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]


# ------------------------------------------------------------------------ fingerprints


def identity(tmp_path, lr=0.05, data="abc"):
    path = tmp_path / "data.txt"
    path.write_text(data)
    return fingerprint({"optimizer": {"lr": lr}}, {"train_data": path})


def test_resume_with_another_fingerprint_is_refused(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(CrashAt):
        run(workdir, total=12, step=crashing_step(8), fingerprint=identity(tmp_path), config={"lr": 0.05})
    before = {p: (workdir / p).read_text() for p in ("metrics.jsonl", "config.json")}
    with pytest.raises(WorkdirError, match=r"has a checkpoint \(step 6\) of a run with another config or input: "
                                           r"optimizer\.lr 0\.05 -> 0\.1; use a new workdir, set loop\.force=true "
                                           r"to start over here, or loop\.allow_config_change=true to continue from "
                                           r"step 6 with the new config"):
        run(workdir, total=12, fingerprint=identity(tmp_path, lr=0.1), config={"lr": 0.1})
    with pytest.raises(WorkdirError, match=r"another config or input: train_data \(.*data\.txt\) content changed"):
        run(workdir, total=12, fingerprint=identity(tmp_path, data="abd"), config={"lr": 0.05})
    assert {p: (workdir / p).read_text() for p in before} == before  # nothing rewritten
    # The same fingerprint, with the input moved elsewhere (same content): resumes.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "data.txt").write_text("abc")
    _, history, _ = run(workdir, total=12, fingerprint=fingerprint({"optimizer": {"lr": 0.05}},
                                                                  {"train_data": moved / "data.txt"}))
    assert history[-1]["step"] == 12


def test_allowed_config_change_records_the_change_point(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(CrashAt):
        run(workdir, total=12, step=crashing_step(8), fingerprint=identity(tmp_path), config={"lr": 0.05})
    new = identity(tmp_path, lr=0.1)
    run(workdir, total=12, allow_config_change=True, fingerprint=new, config={"lr": 0.1})
    change = {"step": 6, "changes": ["optimizer.lr 0.05 -> 0.1"]}
    assert json.loads((workdir / "config.json").read_text()) == {"lr": 0.1, "config_changes": [change]}
    records = lines(workdir)
    assert {"step": 6, "config_changes": change["changes"]} in records
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    done = json.loads((workdir / DONE_FILE).read_text())
    assert done["fingerprint"] == new and done["config_changes"] == [change]
    with Checkpointer(workdir / "checkpoints") as ckpt:
        assert ckpt.restore(12, target=fresh_state())[1]["config_changes"] == [change]
    # Resuming again with the new config: no new change, the history stays.
    run(workdir, total=15, fingerprint=new, config={"lr": 0.1})
    assert json.loads((workdir / "config.json").read_text())["config_changes"] == [change]


def test_finished_run_with_another_fingerprint_is_refused(tmp_path):
    run(tmp_path, total=3, fingerprint=identity(tmp_path))
    with pytest.raises(WorkdirError, match=r"optimizer\.lr 0\.05 -> 0\.2"):
        run(tmp_path, total=3, fingerprint=identity(tmp_path, lr=0.2))


def test_force_starts_over_and_keeps_the_previous_run(tmp_path, straight):
    with pytest.raises(CrashAt):
        run(tmp_path, total=12, step=crashing_step(8), fingerprint=identity(tmp_path, lr=0.3))
    run(tmp_path, total=12, force=True, fingerprint=identity(tmp_path))
    assert_same_run(tmp_path, straight)
    (kept,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in kept.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert [r["step"] for r in lines(kept)][-1] == 7


# ------------------------------------------------------------------- lock, failed saves


def test_second_writer_is_refused(tmp_path):
    """While one run holds the workdir (here: its first step starts another on the same
    workdir), the other stops with one line naming the holder."""
    seen = []

    def step(state, batch):
        if not seen:
            with pytest.raises(WorkdirError) as e:
                import subprocess, sys  # noqa: E401  (a real second process)

                code = ("from rlhf_jax.train import workdir_lock\n"
                        f"with workdir_lock({str(tmp_path)!r}): pass")
                proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
                raise WorkdirError(proc.stderr.strip().splitlines()[-1])
            seen.append(str(e.value))
        return train_step(state, batch)

    run(tmp_path, total=2, step=step)
    assert "is in use by pid" in seen[0] and "wait for it to finish or use another workdir" in seen[0]
    assert not (tmp_path / ".lock").exists()


def test_failed_save_raises_and_releases_orbax(tmp_path, monkeypatch):
    async def read_only(self, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(self.get()))

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "create", read_only)
    with pytest.raises(CheckpointError, match=r"saving .* failed: Read-only file system"):
        run(tmp_path, total=3)
    assert not (tmp_path / DONE_FILE).exists()
    from orbax.checkpoint._src.futures.future import _SignalingThread

    assert not [t for t in threading.enumerate() if isinstance(t, _SignalingThread) and t.is_alive()]
    with warnings.catch_warnings(record=True) as caught:  # no "coroutine ... was never awaited"
        warnings.simplefilter("always")
        gc.collect()
    assert not [str(w.message) for w in caught if "never awaited" in str(w.message)]


def test_fallback_in_a_fresh_process_prints_one_line(tmp_path):
    """As a user re-runs it: a new process resumes past the truncated step-9 checkpoint, and its
    stderr holds the warning and the progress lines, nothing else (TensorStore's callbacks into
    orbax's closed event loop print "Event loop is closed" tracebacks unless filtered)."""
    with pytest.raises(CrashAt):
        run(tmp_path, total=12, step=crashing_step(11))
    damage(tmp_path / "checkpoints" / "9", "truncate")
    code = f"from test_loop import run; run({str(tmp_path)!r}, total=12); print('finished')"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "finished", proc.stderr[-3000:]
    lines_ = [line for line in proc.stderr.splitlines() if "steps/s" not in line]
    assert len(lines_) == 1 and "checkpoints/9 does not restore (OUT_OF_RANGE" in lines_[0], proc.stderr[-3000:]
