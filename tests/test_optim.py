"""Optimiser: schedule closed forms, decay mask, AdamW vs a NumPy AdamW, accumulation, clipping."""

from __future__ import annotations

import dataclasses
import math

import flax.struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.configs import ConfigError, load_config
from rlhf_jax.train import OptimizerConfig, TrainState, decay_mask, make_optimizer, make_schedule


def reference_lr(step: int, lr, warmup, total, kind, init_frac, final_frac) -> float:
    if step < warmup:
        return lr * (init_frac + (1 - init_frac) * step / warmup)
    if kind == "constant":
        return lr
    progress = min(step - warmup, total - warmup) / (total - warmup)
    if kind == "cosine":
        return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr * (1 - (1 - final_frac) * progress)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_schedule_matches_closed_form(kind):
    cfg = OptimizerConfig(lr=2e-3, warmup_steps=10, schedule=kind, total_steps=110, warmup_init_fraction=0.1)
    schedule = make_schedule(cfg)
    for step in [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 500]:
        want = reference_lr(step, 2e-3, 10, 110, kind, 0.1, 0.1)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6, err_msg=f"step {step}")


def test_schedule_landmarks():
    cfg = OptimizerConfig(lr=1.0, warmup_steps=4, schedule="cosine", total_steps=14, warmup_init_fraction=0.0)
    schedule = make_schedule(cfg)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(2)), 0.5, rtol=1e-6)  # halfway through warmup
    np.testing.assert_allclose(float(schedule(4)), 1.0, rtol=1e-6)  # peak
    np.testing.assert_allclose(float(schedule(9)), 0.55, rtol=1e-6)  # cosine midpoint: (1 + 0.1) / 2
    np.testing.assert_allclose(float(schedule(14)), 0.1, rtol=1e-6)  # IG: 10% of peak
    np.testing.assert_allclose(float(schedule(1000)), 0.1, rtol=1e-6)


def toy_params():
    return {
        "ln_1": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "attn": {"q": {"kernel": jnp.ones((3, 3)), "bias": jnp.zeros(3)}},
        "mlp": {"up": {"kernel": jnp.ones((3, 4))}},
        "LayerNorm_0": {"weight2d": jnp.ones((2, 2))},
        "model": {"input_layernorm": {"weight": jnp.ones((2, 2))}},
        "wte": {"embedding": jnp.ones((5, 3))},
        "head": {"scale": jnp.ones((3, 3))},
        "layers": [{"w": jnp.ones((2, 2))}, {"w": jnp.ones(2)}],
    }


def test_decay_mask():
    mask = decay_mask(toy_params())
    assert mask == {
        "ln_1": {"scale": False, "bias": False},
        "attn": {"q": {"kernel": True, "bias": False}},
        "mlp": {"up": {"kernel": True}},
        "LayerNorm_0": {"weight2d": False},
        "model": {"input_layernorm": {"weight": False}},
        "wte": {"embedding": True},
        "head": {"scale": False},
        "layers": [{"w": True}, {"w": False}],
    }
    abstract = jax.eval_shape(toy_params)
    assert decay_mask(abstract) == mask


def numpy_adamw(params, grads_seq, cfg: OptimizerConfig, mask):
    """Decoupled-weight-decay Adam (Loshchilov & Hutter 2019), float64, with optional clipping."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_seq, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        if cfg.clip_norm is not None:
            norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
            g = {k: x * min(1.0, cfg.clip_norm / norm) for k, x in g.items()}
        lr = reference_lr(
            t - 1, cfg.lr, cfg.warmup_steps, cfg.total_steps, cfg.schedule, cfg.warmup_init_fraction, cfg.final_lr_fraction
        )
        for k in p:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g[k] ** 2
            m_hat = m[k] / (1 - cfg.b1**t)
            v_hat = v[k] / (1 - cfg.b2**t)
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * mask[k] * p[k])
    return p


def flat_problem():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)).astype(np.float32), "bias": rng.normal(size=2).astype(np.float32)}
    grads = [
        {"w": rng.normal(size=(3, 2)).astype(np.float32) * 10, "bias": rng.normal(size=2).astype(np.float32) * 10},
        {"w": rng.normal(size=(3, 2)).astype(np.float32) * 0.1, "bias": rng.normal(size=2).astype(np.float32) * 0.1},
    ]
    return params, grads


@jax.jit
def apply(state: TrainState, grads) -> TrainState:
    return state.apply_gradients(grads)


def run_optax(cfg, params, grads_seq):
    state = TrainState.create({k: jnp.asarray(v) for k, v in params.items()}, make_optimizer(cfg), jax.random.PRNGKey(0))
    for g in grads_seq:
        state = apply(state, {k: jnp.asarray(v) for k, v in g.items()})
    return state


def test_adamw_matches_numpy_with_mask():
    cfg = OptimizerConfig(
        lr=0.05, warmup_steps=2, schedule="cosine", total_steps=5, weight_decay=0.3, eps=1e-3, b1=0.8, b2=0.9
    )
    params, grads = flat_problem()
    state = run_optax(cfg, params, grads)
    want = numpy_adamw(params, grads, cfg, mask={"w": 1.0, "bias": 0.0})
    assert int(state.step) == 2
    for k in params:
        np.testing.assert_allclose(np.asarray(state.params[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The mask matters: decaying the bias too gives a different answer.
    unmasked = numpy_adamw(params, grads, cfg, mask={"w": 1.0, "bias": 1.0})
    assert not np.allclose(unmasked["bias"], np.asarray(state.params["bias"]), rtol=1e-5, atol=1e-7)


def test_clipping_matches_numpy():
    cfg = OptimizerConfig(lr=0.1, clip_norm=1.0, weight_decay=0.1)
    params, grads = flat_problem()
    state = run_optax(cfg, params, grads)
    want = numpy_adamw(params, grads, cfg, mask={"w": 1.0, "bias": 0.0})
    for k in params:
        np.testing.assert_allclose(np.asarray(state.params[k]), want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    unclipped = numpy_adamw(params, grads, dataclasses.replace(cfg, clip_norm=None), mask={"w": 1.0, "bias": 0.0})
    assert not np.allclose(unclipped["w"], np.asarray(state.params["w"]), rtol=1e-4)


def test_grad_accumulation_equals_mean_gradient_step():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 1)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(3, 1)), jnp.float32), "b": jnp.zeros(1)}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    grad = jax.jit(jax.grad(loss))
    cfg = OptimizerConfig(lr=0.1, weight_decay=0.1, clip_norm=0.5)

    accum = TrainState.create(params, make_optimizer(dataclasses.replace(cfg, grad_accum_steps=2)), jax.random.PRNGKey(0))
    single = TrainState.create(params, make_optimizer(cfg), jax.random.PRNGKey(0))
    for _ in range(2):  # two optimiser steps = four micro-steps
        g1, g2 = grad(accum.params, x[:4], y[:4]), grad(accum.params, x[4:], y[4:])
        accum = apply(accum, g1)
        np.testing.assert_array_equal(np.asarray(accum.params["w"]), np.asarray(single.params["w"]))  # no update yet
        accum = apply(accum, g2)
        single = apply(single, grad(single.params, x, y))  # full batch = mean of the halves
        for k in params:
            np.testing.assert_allclose(np.asarray(accum.params[k]), np.asarray(single.params[k]), rtol=1e-5, atol=1e-7)
    assert int(accum.step) == 4 and int(single.step) == 2
    assert not np.allclose(np.asarray(single.params["w"]), np.asarray(params["w"]))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"lr": 0.0}, r"OptimizerConfig\.lr must be finite and > 0, got 0\.0"),
        ({"lr": float("nan")}, r"OptimizerConfig\.lr must be finite"),
        ({"warmup_steps": -1}, r"OptimizerConfig\.warmup_steps must be >= 0"),
        ({"schedule": "exp"}, r"OptimizerConfig\.schedule must be one of"),
        ({"schedule": "cosine"}, r"OptimizerConfig\.total_steps must be an int > warmup_steps \(0\)"),
        ({"schedule": "linear", "warmup_steps": 5, "total_steps": 5}, r"OptimizerConfig\.total_steps must be an int > warmup_steps \(5\)"),
        ({"final_lr_fraction": 1.5}, r"OptimizerConfig\.final_lr_fraction must be in \[0, 1\]"),
        ({"warmup_init_fraction": -0.1}, r"OptimizerConfig\.warmup_init_fraction must be in \[0, 1\]"),
        ({"b1": 1.0}, r"OptimizerConfig\.b1 must be in \[0, 1\)"),
        ({"b2": -0.5}, r"OptimizerConfig\.b2 must be in \[0, 1\)"),
        ({"eps": 0.0}, r"OptimizerConfig\.eps must be > 0"),
        ({"weight_decay": -1.0}, r"OptimizerConfig\.weight_decay must be finite and >= 0"),
        ({"clip_norm": 0.0}, r"OptimizerConfig\.clip_norm must be None or finite and > 0"),
        ({"grad_accum_steps": 0}, r"OptimizerConfig\.grad_accum_steps must be >= 1"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        OptimizerConfig(**kwargs)


def test_paper_defaults():
    cfg = OptimizerConfig()
    assert (cfg.b1, cfg.b2, cfg.eps, cfg.final_lr_fraction, cfg.warmup_init_fraction) == (0.9, 0.95, 1e-5, 0.1, 0.1)
    assert isinstance(make_optimizer(cfg), optax.GradientTransformation)


def test_config_from_overrides():
    cfg = load_config(OptimizerConfig, None, ["schedule=cosine", "total_steps=100", "clip_norm=1", "lr=3e-4"])
    assert cfg == OptimizerConfig(schedule="cosine", total_steps=100, clip_norm=1.0, lr=3e-4)
    with pytest.raises(ConfigError, match=r"config: OptimizerConfig\.total_steps must be an int > warmup_steps"):
        load_config(OptimizerConfig, None, ["schedule=linear"])


@flax.struct.dataclass
class StateWithRef(TrainState):
    ref_params: dict


def test_train_state_subclass_keeps_extra_fields():
    params = {"w": jnp.ones((2, 2))}
    state = StateWithRef.create(params, make_optimizer(OptimizerConfig(lr=0.1)), jax.random.PRNGKey(0), ref_params=params)
    state = apply(state, {"w": jnp.ones((2, 2))})
    assert isinstance(state, StateWithRef) and int(state.step) == 1
    np.testing.assert_array_equal(np.asarray(state.ref_params["w"]), np.ones((2, 2)))
    np.testing.assert_allclose(np.asarray(state.params["w"]), np.full((2, 2), 0.9), rtol=1e-5)  # Adam's first step is lr
