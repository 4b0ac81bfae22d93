"""kl_control.py: config validation and the adaptive controller against hand-computed values."""

import jax
import numpy as np
import pytest

from rlhf_jax.kl_control import KLControllerConfig, KLState, init_kl_state, update_kl


def test_defaults_are_instructgpt_fixed_beta():
    cfg = KLControllerConfig()
    assert (cfg.kind, cfg.init_kl_coef) == ("fixed", 0.02)
    state = init_kl_state(cfg)
    assert isinstance(state, KLState) and state.coef.dtype == np.float32
    for kl in (0.0, 3.0, 100.0):
        state = update_kl(cfg, state, kl, 512)
    np.testing.assert_allclose(state.coef, 0.02)


def test_adaptive_matches_hand_computed_sequence():
    cfg = KLControllerConfig(kind="adaptive", init_kl_coef=0.1, target=6.0, horizon=10000)
    step = jax.jit(update_kl, static_argnums=0)
    state = init_kl_state(cfg)
    # KL 12 -> e = clip(1, ±0.2) = 0.2; 6 -> 0; 0 -> -0.2; 6.6 -> 0.1; 3 -> -0.2 (clipped from -0.5)
    # coef *= 1 + e * 500 / 10000:
    expected = [0.1 * 1.01, 0.101, 0.101 * 0.99, 0.09999 * 1.005, 0.10048995 * 0.99]
    for kl, want in zip([12.0, 6.0, 0.0, 6.6, 3.0], expected):
        state = step(cfg, state, kl, 500)
        np.testing.assert_allclose(state.coef, want, rtol=1e-6)
    np.testing.assert_allclose(state.coef, 0.0994850505, rtol=1e-6)


def test_state_is_a_pytree():
    state = init_kl_state(KLControllerConfig(init_kl_coef=0.5))
    leaves = jax.tree_util.tree_leaves(state)
    assert len(leaves) == 1 and float(leaves[0]) == 0.5


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"kind": "pid"}, "kind"),
        ({"init_kl_coef": -0.1}, "init_kl_coef"),
        ({"init_kl_coef": float("nan")}, "init_kl_coef"),
        ({"target": 0.0}, "target"),
        ({"target": float("inf")}, "target"),
        ({"horizon": 0}, "horizon"),
        ({"horizon": 10.5}, "horizon"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"KLControllerConfig.{field} must"):
        KLControllerConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        KLControllerConfig().target = 1.0
