"""The policy EMA (InstructGPT App. C.4) against a NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.ema import INSTRUCTGPT_EMA_DECAY, ema_update


def test_ema_matches_numpy_loop():
    rng = np.random.default_rng(0)
    shapes = {"layer_0": {"kernel": (3, 4), "bias": (4,)}, "head": {"kernel": (4, 2)}}
    steps = [jax.tree_util.tree_map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                                    is_leaf=lambda s: isinstance(s, tuple)) for _ in range(25)]
    ema = jax.tree_util.tree_map(jnp.asarray, steps[0])
    want = jax.tree_util.tree_map(lambda a: a.astype(np.float64), steps[0])
    update = jax.jit(ema_update)
    for params in steps[1:]:
        ema = update(ema, params, INSTRUCTGPT_EMA_DECAY)
        want = jax.tree_util.tree_map(lambda e, p: INSTRUCTGPT_EMA_DECAY * e + (1 - INSTRUCTGPT_EMA_DECAY) * p,
                                      want, params)
    for got, ref in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(want)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_ema_edges_and_dtype():
    ema = {"w": jnp.ones(3, jnp.float32)}
    params = {"w": jnp.full(3, 5.0, jnp.bfloat16)}
    np.testing.assert_array_equal(ema_update(ema, params, 0.0)["w"], 5.0)
    np.testing.assert_array_equal(ema_update(ema, params, 1.0)["w"], 1.0)
    out = jax.jit(ema_update)(ema, params, jnp.float32(0.5))  # traced decay
    assert out["w"].dtype == jnp.float32
    np.testing.assert_allclose(out["w"], 3.0)
    with pytest.raises(ValueError, match="decay"):
        ema_update(ema, params, 1.5)
    with pytest.raises(ValueError, match="structure"):
        ema_update(ema, {"v": params["w"]})
    with pytest.raises(ValueError, match="shapes"):
        ema_update(ema, {"w": jnp.ones(4)})
