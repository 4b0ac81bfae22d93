"""Checkpointer: round trip, cadence, retention, shardings, crash atomicity; checksums and the
fallback past damaged checkpoints; failed saves end promptly; guard_finite.

`damage(step_dir, mode)` (the damage modes of a finished checkpoint seen in the field) is shared
with test_loop.py and test_workdir.py."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.train import (
    CheckpointError,
    Checkpointer,
    NonFiniteError,
    OptimizerConfig,
    TrainState,
    guard_finite,
    make_optimizer,
)
from rlhf_jax.train.checkpoint import checksums

REPO = Path(__file__).resolve().parents[1]
DAMAGE_MODES = ("truncate", "delete", "manifest", "metadata", "meta", "flip")
NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "was never awaited")


def damage(step_dir: Path, mode: str) -> None:
    """Damage a finished checkpoint `<dir>/<step>` as a disk, a copy or a sync tool might:
    truncate its data blobs to half, delete its largest file, overwrite the OCDBT manifest or the
    tree's `_METADATA` with garbage, delete the `meta` item, or flip one bit in the middle of each
    data blob.  Data blobs are OCDBT's `d/` files over 1 KiB (smaller values are stored inline in
    B-tree nodes, and a `d/` file may be a superseded node nobody reads), or every `d/` file when
    none is that large (a tiny state)."""
    state = step_dir / "state"
    files = sorted((p for p in state.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, str(p)))
    nodes = [p for p in files if p.parent.name == "d"]
    blobs = [p for p in nodes if p.stat().st_size > 1024] or nodes
    if mode == "truncate":
        for blob in blobs:
            blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    elif mode == "delete":
        files[-1].unlink()
    elif mode == "manifest":
        (state / "manifest.ocdbt").write_bytes(b"\x00garbage" * 8)
    elif mode == "metadata":
        (state / "_METADATA").write_text('{"tree_metadata": {"params"', encoding="utf-8")
    elif mode == "meta":
        (step_dir / "meta" / "metadata").unlink()
    elif mode == "flip":
        for blob in blobs:
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0x10
            blob.write_bytes(bytes(data))
    else:
        raise ValueError(mode)


def make_state(seed: int) -> TrainState:
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "bias": jnp.zeros(2)}}
    tx = make_optimizer(OptimizerConfig(lr=0.1, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=2))
    return TrainState.create(params, tx, jax.random.PRNGKey(seed))


@jax.jit
def apply(state: TrainState, grads) -> TrainState:
    return state.apply_gradients(grads)


def advanced_state(n: int) -> TrainState:
    state = make_state(0)
    for i in range(n):
        state = apply(state, jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), state.params))
    return state


def assert_trees_equal(a, b):
    """Same leaves at the same key paths (static fields such as `tx` are not compared)."""
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (_, x), (_, y) in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_into_fresh_target(tmp_path):
    state = advanced_state(3)
    meta = {"data": {"epoch": np.int64(1), "pos": 7}, "metrics": {"loss": np.float32(0.5)}, "config": {"lr": 0.1}}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(3, state, meta)
    with Checkpointer(tmp_path) as ckpt:  # a new process would build a new Checkpointer
        target = make_state(1)
        restored, got_meta = ckpt.restore(target=target)
    assert_trees_equal(restored, state)
    assert restored.tx is target.tx  # static fields come from the target
    assert got_meta == {"data": {"epoch": 1, "pos": 7}, "metrics": {"loss": 0.5}, "config": {"lr": 0.1}}
    assert int(restored.step) == 3


def test_typed_rng_key_round_trip(tmp_path):
    state = {"rng": jax.random.key(3), "x": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        restored, _ = ckpt.restore(target={"rng": jax.random.key(0), "x": jnp.zeros(4)})
    assert_trees_equal(restored, state)


def test_cadence_and_retention(tmp_path):
    state = make_state(0)
    with Checkpointer(tmp_path, keep=2, save_every=5) as ckpt:
        saved = [step for step in range(1, 17) if ckpt.save(step, state, {"step": step})]
        assert saved == [5, 10, 15]
        assert ckpt.save(16, state, {"step": 16}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [15, 16]
        assert ckpt.latest_step() == 16
        assert ckpt.restore(15, target=state)[1] == {"step": 15}
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 5 .* have \[15, 16\]"):
            ckpt.restore(5, target=state)


def test_restore_without_checkpoint_raises(tmp_path):
    with Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step None in .*empty"):
            ckpt.restore(target={"x": jnp.zeros(1)})


def test_restore_uses_target_shardings(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data", None))
    state = {"a": jnp.arange(8.0).reshape(4, 2), "b": jnp.ones(3)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
        ckpt.wait()
        target = {
            "a": jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=split),
            "b": jax.device_put(jnp.zeros(3), replicated),
        }
        restored, _ = ckpt.restore(target=target)
    assert restored["a"].sharding == split
    assert restored["b"].sharding == replicated
    assert_trees_equal(restored, state)


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"meta for step 2 is not JSON-serialisable"):
            ckpt.save(2, {"x": jnp.zeros(1)}, {"obj": object()})
        with pytest.raises(ValueError, match=r"meta for step 3 is not JSON-serialisable"):
            ckpt.save(3, {"x": jnp.zeros(1)}, {"loss": float("nan")})
        assert ckpt.latest_step() is None


def test_interrupted_save_leaves_last_good_step(tmp_path, monkeypatch):
    """A crash between writing a step and its atomic rename leaves a tmp dir that is ignored."""
    good, newer = advanced_state(1), advanced_state(2)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, good, {"step": 1})
    ckpt.wait()

    async def crash(self):
        raise RuntimeError("simulated crash before the rename")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    with pytest.raises(Exception, match="simulated crash"):
        ckpt.save(2, newer, {"step": 2})
        ckpt.wait()
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("2")]
    assert leftovers and all(".orbax-checkpoint-tmp" in name for name in leftovers)

    with Checkpointer(tmp_path) as fresh:  # the restarted process
        assert fresh.all_steps() == [1]
        restored, meta = fresh.restore(target=make_state(5))
        assert meta == {"step": 1}
        assert_trees_equal(restored, good)
        fresh.save(2, newer, {"step": 2})  # the step can be written again
        fresh.wait()
        assert fresh.all_steps() == [1, 2]
        assert_trees_equal(fresh.restore(2, target=make_state(5))[0], newer)


def test_step_dir_without_commit_marker_is_ignored(tmp_path):
    """On file systems without atomic rename a crash leaves `<step>/` without orbax's marker."""
    good = advanced_state(1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(4, good, {"step": 4})
    partial = tmp_path / "6"
    shutil.copytree(tmp_path / "4", partial)
    (partial / "commit_success.txt").unlink()
    for f in (partial / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 4
        restored, meta = ckpt.restore(target=make_state(5))
        assert meta == {"step": 4}
        assert_trees_equal(restored, good)
        ckpt.save(6, good, {"step": 6})  # moves the broken dir aside instead of failing
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6]
        assert ckpt.restore(6, target=make_state(5))[1] == {"step": 6}
    assert any(p.name.startswith("6.incomplete-") for p in tmp_path.iterdir())


def big_state(seed: int) -> dict:
    """Large enough that its data blob is mostly array bytes (a flipped bit lands in an array)."""
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.normal(size=(128, 96)), jnp.float32), "b": jnp.arange(7, dtype=jnp.int32) * seed,
            "rng": jax.random.key(seed)}


@pytest.mark.parametrize("mode", DAMAGE_MODES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, mode, caplog, capfd):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, big_state(step), {"step": step})
    damage(tmp_path / "3", mode)
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        state, meta = ckpt.restore_newest_valid(big_state(0))
        assert ckpt.all_steps() == [1, 2]
    assert meta == {"step": 2}
    assert_trees_equal(state, big_state(2))
    assert (tmp_path / "3.corrupt").is_dir() and not (tmp_path / "3").exists()  # kept, not deleted
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"{tmp_path / '3'} does not restore" in warnings[0]
    assert "moved it to 3.corrupt" in warnings[0] and "resuming from step 2" in warnings[0]
    if mode == "flip":  # orbax reads the flipped bit without complaint; the checksum catches it
        assert "checksum mismatch in 1 array(s) of step 3: w" in warnings[0]
    out, err = capfd.readouterr()
    assert not [n for n in NOISE if n in out + err], err[-2000:]


def test_no_checkpoint_restores_names_each_and_moves_none(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, big_state(step), {"step": step})
    damage(tmp_path / "2", "meta")
    damage(tmp_path / "1", "flip")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores \(step 2: .*metadata.*; step 1: "
                                                  r"checksum mismatch .*\); move them away to start over"):
            ckpt.restore_newest_valid(big_state(0))
        assert ckpt.all_steps() == [1, 2]
    with Checkpointer(tmp_path / "empty") as ckpt:
        assert ckpt.restore_newest_valid(big_state(0)) is None


def reference_checksum(x: np.ndarray) -> int:
    """The documented formula in NumPy: uint32 words of the bits (narrow dtypes widened), weights
    2654435761·i + 1 | 1, sum mod 2**32 (Python integers: no overflow to trust)."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        x = x.astype(np.uint8)
    if x.dtype.itemsize < 4:
        words = x.view(f"uint{8 * x.dtype.itemsize}").astype(np.uint32)
    else:
        words = x.view(np.uint32)
    words = [int(w) for w in words.reshape(-1)]
    return sum(w * ((2654435761 * i + 1) % 2**32 | 1) for i, w in enumerate(words)) % 2**32


def test_checksums_match_numpy_and_see_every_single_bit():
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.normal(size=(5, 3)).astype(np.float32),
        "bf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "i8": rng.integers(-128, 127, size=(6,)).astype(np.int8),
        "mask": rng.integers(0, 2, size=(3, 2)).astype(bool),
        "step": np.int32(7),
    }
    got = checksums({k: jnp.asarray(v) for k, v in tree.items()})
    assert got == {k: reference_checksum(v) for k, v in tree.items()}
    key = jax.random.key(3)
    assert checksums({"rng": key}) == {"rng": reference_checksum(np.asarray(jax.random.key_data(key)))}
    x = tree["f32"]
    bits = x.view(np.uint32).reshape(-1)
    original = reference_checksum(x)
    for i in range(bits.size):  # every element, every bit: one flip always changes the sum
        for b in range(32):
            flipped = bits.copy()
            flipped[i] ^= np.uint32(1 << b)
            assert reference_checksum(flipped.view(np.float32)) != original, (i, b)


def run_script(body: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    return proc, time.monotonic() - start


def test_failed_save_ends_the_process_promptly(tmp_path):
    """A save whose step directory cannot be created (here: orbax's mkdir fails as on a read-only
    disk) raises one CheckpointError, and the process exits at once: without releasing orbax's
    waiting threads it stays alive for orbax's 300 s timeout."""
    proc, seconds = run_script(f"""
        import errno, jax.numpy as jnp, orbax.checkpoint as ocp
        from rlhf_jax.train import CheckpointError, Checkpointer

        async def read_only(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", str(self.get()))

        ocp.path.atomicity.AtomicRenameTemporaryPath.create = read_only
        ckpt = Checkpointer({str(tmp_path)!r})
        try:
            ckpt.save(1, {{"x": jnp.ones(3)}}, {{}})
            ckpt.close()
        except CheckpointError as e:
            print("ERROR:", e)
        print("exiting")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ERROR: saving a checkpoint in {tmp_path} failed: Read-only file system" in proc.stdout
    assert proc.stdout.strip().endswith("exiting") and "never awaited" not in proc.stderr
    assert seconds < 60, seconds


def test_saves_filter_tensorstore_reports_into_a_closed_event_loop(tmp_path, monkeypatch):
    """After a failed save, TensorStore's threads finish the writes orbax abandoned and call into
    orbax's closed event loop; they report the RuntimeError through ``sys.unraisablehook`` (a bare
    traceback on stderr, in 2 to 3 of 10 CLI runs onto a full disk).  From a checkpointer's first
    save on, that report is dropped; any other unraisable exception still reaches the previous
    hook.  (Here raised from a ``__del__``, which CPython reports through the same hook.)"""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))

    class Raises:
        def __init__(self, error: BaseException):
            self.error = error

        def __del__(self):
            raise self.error

    def report_unraisable(error: BaseException) -> None:
        Raises(error)  # collected at once: its __del__'s error goes to sys.unraisablehook

    report_unraisable(RuntimeError("Event loop is closed"))
    assert [str(e) for e in seen] == ["Event loop is closed"]  # before any save: not filtered
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)}, {})
    report_unraisable(RuntimeError("Event loop is closed"))
    report_unraisable(ValueError("something else"))
    assert [str(e) for e in seen] == ["Event loop is closed", "something else"]


@pytest.mark.skipif(sys.platform != "linux", reason="a read-only bind mount needs Linux")
def test_read_only_checkpoint_dir_is_one_error(tmp_path):
    """A really read-only checkpoint directory (a read-only bind mount when root, else chmod):
    the save is refused before orbax starts, and the process exits promptly."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    body = f"""
        import jax.numpy as jnp
        from rlhf_jax.train import CheckpointError, Checkpointer
        ckpt = Checkpointer({str(ckpts)!r})
        try:
            ckpt.save(1, {{"x": jnp.ones(3)}}, {{}})
        except CheckpointError as e:
            print("ERROR:", e)
        ckpt.close()
    """
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a directory read-only")
        mount = (f"mount --bind {ckpts} {ckpts} && mount -o remount,bind,ro {ckpts} && "
                 f"{sys.executable} -c {shlex.quote(textwrap.dedent(body))}")
        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip("unshare -m is not permitted here")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        start = time.monotonic()
        proc = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True, timeout=120,
                              env=env, cwd=REPO)
        seconds = time.monotonic() - start
    else:
        ckpts.chmod(0o555)
        proc, seconds = run_script(body)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ERROR: cannot write checkpoint step 1 in {ckpts}" in proc.stdout
    assert "Read-only file system" in proc.stdout or "Permission denied" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert seconds < 60, seconds


def test_guard_finite():
    guard_finite({"loss": 1.0, "acc": np.float32(0.5), "n": np.int32(3), "v": jnp.ones(3)}, 1)
    with pytest.raises(NonFiniteError, match=r"^loss is nan at step 12$"):
        guard_finite({"loss": jnp.float32(jnp.nan), "acc": 1.0}, 12)
    with pytest.raises(NonFiniteError, match=r"^kl is inf at step 3$"):
        guard_finite({"kl": np.array([0.0, -np.inf]), "loss": 0.1}, 3)
    with pytest.raises(NonFiniteError, match=r"^b is inf, a is nan at step 5$"):
        guard_finite({"b": float("inf"), "ok": 1.0, "a": float("nan")}, 5)
