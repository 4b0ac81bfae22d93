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


def test_ppo_ema_matches_numpy_loop_and_leaves_training_unchanged():
    """PPOConfig.ema_decay: after each compiled iteration the state's EMA is the NumPy loop
    ``ema = d·ema + (1 − d)·policy`` from the initial weights, and the policy, value and metrics
    are bitwise those of the same run without an EMA."""
    import dataclasses

    from test_ppo import _prompts, _setup

    from rlhf_jax.generation import GenerateConfig
    from rlhf_jax.ppo import PPOConfig, make_ppo_iteration

    decay = 0.8
    off = PPOConfig(generation=GenerateConfig(max_new_tokens=4, pad_id=0), num_minibatches=2, ptx_coef=0.0)
    on = dataclasses.replace(off, ema_decay=decay)
    ids, mask = _prompts()
    runs = {}
    for name, cfg in (("off", off), ("on", on)):
        models, state = _setup(cfg, lr=1e-2)
        assert (state.ema_params is None) == (cfg.ema_decay is None)
        want = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), state.policy.params)
        step = make_ppo_iteration(models, cfg)
        history = []
        for _ in range(3):
            state, metrics = step(state, ids, mask)
            history.append({k: np.asarray(v) for k, v in metrics.items()})
            want = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * np.asarray(p, np.float64),
                                          want, state.policy.params)
            if cfg.ema_decay is not None:
                for got, ref in zip(jax.tree_util.tree_leaves(state.ema_params), jax.tree_util.tree_leaves(want)):
                    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        runs[name] = (jax.device_get((state.policy.params, state.value.params)), history)
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs["off"], runs["on"])
    with pytest.raises(ValueError, match="PPOConfig.ema_decay"):
        PPOConfig(ema_decay=1.5)


def test_ppo_stage_evaluates_and_exports_the_ema_when_kept():
    """PPOStageConfig.use_ema: the stage's evaluation and model/ take the EMA weights when the
    state keeps them, else the policy's."""
    import dataclasses

    from test_ppo import _setup

    from rlhf_jax.generation import GenerateConfig
    from rlhf_jax.ppo import PPOConfig
    from rlhf_jax.stages.ppo import PPOStageConfig, _evaluated
    from rlhf_jax.stages.sources import ModelSource

    ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=4, pad_id=0), ptx_coef=0.0, ema_decay=0.5)
    _, state = _setup(ppo)
    state = state.replace(ema_params=jax.tree_util.tree_map(lambda x: x + 1.0, state.ema_params))
    cfg = PPOStageConfig(workdir="w", model=ModelSource(hf_dir="sft"), train_data="p.jsonl", reward_model="rm", ppo=ppo)
    leaf = lambda s: jax.tree_util.tree_leaves(s.policy.params)[0]  # noqa: E731
    np.testing.assert_array_equal(leaf(_evaluated(cfg, state)), jax.tree_util.tree_leaves(state.ema_params)[0])
    np.testing.assert_array_equal(leaf(_evaluated(dataclasses.replace(cfg, use_ema=False), state)), leaf(state))
    np.testing.assert_array_equal(leaf(_evaluated(cfg, state.replace(ema_params=None))), leaf(state))
