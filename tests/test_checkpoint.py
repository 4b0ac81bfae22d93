"""Checkpointer: round trip, cadence, retention, shardings, crash atomicity; guard_finite."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rlhf_jax.train import Checkpointer, NonFiniteError, OptimizerConfig, TrainState, guard_finite, make_optimizer


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


def test_guard_finite():
    guard_finite({"loss": 1.0, "acc": np.float32(0.5), "n": np.int32(3), "v": jnp.ones(3)}, 1)
    with pytest.raises(NonFiniteError, match=r"^loss is nan at step 12$"):
        guard_finite({"loss": jnp.float32(jnp.nan), "acc": 1.0}, 12)
    with pytest.raises(NonFiniteError, match=r"^kl is inf at step 3$"):
        guard_finite({"kl": np.array([0.0, -np.inf]), "loss": 0.1}, 3)
    with pytest.raises(NonFiniteError, match=r"^b is inf, a is nan at step 5$"):
        guard_finite({"b": float("inf"), "ok": 1.0, "a": float("nan")}, 5)
