"""GRPO-family losses and group advantages: parity with TRL 1.16.0 (golden numbers made by running
TRL's own trainer code, ``tests/golden/make_trl116_golden.py``) and independent checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multidevice import run_on_devices
from golden import trl116

from rlhf_jax.advantages import kl_penalty
from rlhf_jax.ema import ema_update
from rlhf_jax.generation import GenerateConfig
from rlhf_jax.group_advantages import group_advantages, rloo_advantages
from rlhf_jax.grpo import (
    GRPO_PRESETS,
    GRPOConfig,
    GRPOModels,
    group_experience,
    grpo_loss,
    init_grpo_state,
    make_grpo_iteration,
)
from rlhf_jax.losses import ppo_policy_loss
from rlhf_jax.model import ModelConfig, Transformer, init_params

TOL = 1e-6
GRPO = trl116()["grpo"]
ADV = trl116()["advantages"]


def _grpo_inputs() -> dict:
    inputs = {k: jnp.asarray(v) for k, v in GRPO["inputs"].items() if k not in ("clip_low", "clip_high")}
    return dict(inputs, clip_low=GRPO["inputs"]["clip_low"], clip_high=GRPO["inputs"]["clip_high"])


def _close(got, want, what: str) -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want, dtype=np.float64), rtol=0, atol=TOL, err_msg=what)


@pytest.mark.parametrize("case", GRPO["cases"],
                         ids=lambda c: f"{c['loss_type']}-{c['importance_level']}-beta{c['beta']}")
def test_grpo_loss_matches_trl(x64, case):
    x = _grpo_inputs()

    def loss_fn(logprobs):
        return grpo_loss(logprobs, x["old_logprobs"], x["ref_logprobs"], x["advantages"], x["mask"],
                         clip_low=x["clip_low"], clip_high=x["clip_high"], beta=case["beta"],
                         loss_type=case["loss_type"], importance_level=case["importance_level"],
                         max_len=case["max_completion_length"], num_items=case["num_items_in_batch"])

    (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(x["logprobs"])
    assert loss.dtype == jnp.float64
    _close(loss, case["loss"], "loss")
    _close(grad, case["grad"], "grad")  # TRL's gradient is 0 at padded positions, as ours
    for key in ("kl", "clip_low_frac", "clip_high_frac", "clip_frac"):
        _close(stats[key], case[key], key)


def test_rloo_loss_matches_trl(x64):
    """TRL's RLOO loss is the sequence-sum ratio's clipped surrogate, averaged over responses."""
    x, want = _grpo_inputs(), GRPO["rloo_loss"]

    def loss_fn(logprobs):
        return grpo_loss(logprobs, x["old_logprobs"], None, x["advantages"], x["mask"], clip_low=x["clip_low"],
                         clip_high=x["clip_high"], beta=0.0, importance_level="sequence_sum")

    (loss, stats), grad = jax.value_and_grad(loss_fn, has_aux=True)(x["logprobs"])
    _close(loss, want["loss"], "loss")
    _close(grad, want["grad"], "grad")
    for key in ("clip_low_frac", "clip_high_frac", "clip_frac"):
        _close(stats[key], want[key], key)


def _rewards():
    """The golden rewards with TRL's unscorable (NaN) entry as a mask."""
    r = np.array([np.nan if v is None else v for v in ADV["inputs"]["rewards"]])
    return jnp.asarray(np.nan_to_num(r, nan=123.0)), jnp.asarray(~np.isnan(r))


@pytest.mark.parametrize("case", ADV["grpo"], ids=lambda c: c["scale"])
def test_group_advantages_match_trl(x64, case):
    rewards, valid = _rewards()
    adv = group_advantages(rewards, case["group_size"], scale=case["scale"], mask=valid)
    _close(adv, case["advantages"], case["scale"])


@pytest.mark.parametrize("case", ADV["rloo"], ids=lambda c: f"beta{c['beta']}-norm{c['normalize']}")
def test_rloo_advantages_match_trl(x64, case):
    """TRL folds β·Σ_t k1 (old vs ref log-probs) into the reward, then takes the leave-one-out baseline."""
    rewards, valid = _rewards()
    mask = jnp.asarray(ADV["inputs"]["mask"])
    old, ref = (jnp.asarray(ADV["inputs"][k]) for k in ("old_logprobs", "ref_logprobs"))
    kl = jnp.sum(jnp.where(mask != 0, kl_penalty(old, ref, "k1"), 0), axis=1)
    adv = rloo_advantages(rewards - case["beta"] * kl, case["group_size"], normalize=case["normalize"], mask=valid)
    _close(adv, case["advantages"], "advantages")


def test_group_advantages_numpy_loop():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12).astype(np.float32)
    g = 3
    want_group, want_none, want_rloo = (np.zeros(12) for _ in range(3))
    for start in range(0, 12, g):
        grp = rewards[start:start + g].astype(np.float64)
        for i in range(g):
            want_none[start + i] = grp[i] - grp.mean()
            want_group[start + i] = (grp[i] - grp.mean()) / (grp.std(ddof=1) + 1e-4)
            want_rloo[start + i] = grp[i] - (grp.sum() - grp[i]) / (g - 1)
    want_batch = want_none / (rewards.astype(np.float64).std(ddof=1) + 1e-4)
    for scale, want in (("group", want_group), ("none", want_none), ("batch", want_batch)):
        np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), g, scale=scale), want, atol=1e-5)
    np.testing.assert_allclose(rloo_advantages(jnp.asarray(rewards), g), want_rloo, atol=1e-5)
    # jittable with the static arguments closed over; one response per prompt has no baseline
    np.testing.assert_allclose(jax.jit(lambda r: rloo_advantages(r, g))(jnp.asarray(rewards)), want_rloo, atol=1e-5)
    np.testing.assert_array_equal(group_advantages(jnp.asarray(rewards), 1), 0)
    np.testing.assert_array_equal(rloo_advantages(jnp.asarray(rewards), 1), 0)


def test_grpo_loss_with_symmetric_clip_is_ppo():
    """Token ratio, β = 0, ε_low = ε_high, bnpo (one token mean): the PPO clipped surrogate."""
    rng = np.random.default_rng(1)
    old = jnp.asarray(-rng.uniform(0.1, 2, (4, 6)), jnp.float32)
    new = old + jnp.asarray(rng.normal(0, 0.3, (4, 6)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=4), jnp.float32)
    mask = jnp.asarray(np.arange(6)[None] < np.array([6, 2, 4, 1])[:, None])
    loss, stats = jax.jit(lambda n: grpo_loss(n, old, None, adv, mask, clip_low=0.2, clip_high=0.2, beta=0.0,
                                              loss_type="bnpo"))(new)
    want, ppo_stats = ppo_policy_loss(new, old, jnp.broadcast_to(adv[:, None], (4, 6)), mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(stats["ratio_mean"], ppo_stats["ratio_mean"], rtol=1e-6)


def test_grpo_loss_ignores_padding_and_traced_beta():
    """Non-finite values at padded positions change nothing; β may be a traced scalar."""
    x = _grpo_inputs()
    pad = x["mask"] == 0
    args = dict(clip_low=0.2, clip_high=0.28, loss_type="grpo")
    clean = grpo_loss(x["logprobs"], x["old_logprobs"], x["ref_logprobs"], x["advantages"], x["mask"],
                      beta=0.04, **args)
    dirty_inputs = (jnp.where(pad, jnp.nan, x["logprobs"]), jnp.where(pad, jnp.inf, x["old_logprobs"]),
                    jnp.where(pad, -jnp.inf, x["ref_logprobs"]), x["advantages"], x["mask"])
    dirty = jax.jit(lambda beta: grpo_loss(*dirty_inputs, beta=beta, **args))(jnp.float32(0.04))
    for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(dirty)):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bad_arguments_are_named():
    x = _grpo_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(x["logprobs"], x["old_logprobs"], None, x["advantages"], x["mask"], clip_low=0.2,
                  clip_high=0.2, beta=0.0, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x["logprobs"], x["old_logprobs"], None, x["advantages"], x["mask"], clip_low=0.2,
                  clip_high=0.2, beta=0.1)
    with pytest.raises(ValueError, match="group_size=5"):
        group_advantages(jnp.zeros(12), 5)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(jnp.zeros(12), 4, scale="prompt")


# ------------------------------------------------------------------ the compiled iteration

VOCAB, TARGET, PAD = 16, 3, 0
TINY = ModelConfig(arch="gpt2", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_len=16)


def target_reward(params, tokens, mask, index):
    """Fraction of real tokens equal to TARGET (prompts never contain it): a verifiable reward."""
    return ((tokens == TARGET) & (mask != 0)).sum(axis=1).astype(jnp.float32) / 8.0


def _grpo_setup(preset: str, **overrides):
    cfg = GRPOConfig(**{"generation": GenerateConfig(max_new_tokens=8, pad_id=PAD), "group_size": 4,
                        **GRPO_PRESETS[preset], **overrides})
    models = GRPOModels(Transformer(TINY), target_reward)
    params = init_params(models.policy, jax.random.PRNGKey(0))
    return cfg, models, init_grpo_state(cfg, params, None, optax.adam(3e-3), jax.random.PRNGKey(1))


def _prompt_batch(rng, n=8):
    ids = jnp.asarray(rng.integers(4, VOCAB, size=(n, 4)), jnp.int32)
    return ids, jnp.ones_like(ids)


@pytest.mark.parametrize("preset", ["dapo", "rloo"])
def test_group_experience(preset):
    cfg, models, state = _grpo_setup(preset)
    ids, mask = _prompt_batch(np.random.default_rng(0), n=2)
    exp = group_experience(models, cfg, state, ids, mask, jax.random.PRNGKey(2))
    # each prompt is sampled G = 4 times, in consecutive rows
    np.testing.assert_array_equal(exp.tokens[:, :4], np.repeat(np.asarray(ids), 4, axis=0))
    scores = np.asarray(target_reward(None, exp.tokens, exp.mask, None))
    np.testing.assert_allclose(exp.scores, scores)
    if cfg.algorithm == "grpo":
        want = group_advantages(jnp.asarray(scores), 4)
    else:  # the k1 KL folded into the reward before the leave-one-out baseline
        kl = np.where(exp.response_mask, exp.old_logprobs - exp.ref_logprobs, 0).sum(1)
        want = rloo_advantages(jnp.asarray(scores - cfg.beta * kl), 4)
    np.testing.assert_allclose(exp.advantages, want, atol=1e-6)


def test_iteration_updates_policy_and_ema():
    cfg, models, state = _grpo_setup("dapo", num_minibatches=2, ema_decay=0.9)
    ids, mask = _prompt_batch(np.random.default_rng(0), n=2)
    before = jax.tree_util.tree_map(np.asarray, state)
    new, metrics = make_grpo_iteration(models, cfg)(state, ids, mask)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    assert int(new.policy.step) == 2 and int(new.iteration) == 1
    want_ema = ema_update(before.ema_params, new.policy.params, 0.9)
    for got, ref in zip(jax.tree_util.tree_leaves(new.ema_params), jax.tree_util.tree_leaves(want_ema)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_grpo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="GRPOConfig.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="GRPOConfig.loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="GRPOConfig.ema_decay"):
        dataclasses.replace(GRPOConfig(), ema_decay=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dapo", "rloo"])
def test_grpo_and_rloo_raise_a_verifiable_reward(preset):
    cfg, models, state = _grpo_setup(preset)
    step = make_grpo_iteration(models, cfg)
    rng = np.random.default_rng(0)
    scores = []
    for _ in range(30):
        state, metrics = step(state, *_prompt_batch(rng))
        scores.append(float(metrics["score"]))
    assert np.mean(scores[-5:]) > np.mean(scores[:3]) + 0.3, scores


@pytest.mark.slow
def test_grpo_iteration_sharded_equals_single_device():
    """One GRPO iteration with ptx and EMA (2 epochs x 2 minibatches) on (2,2,2) and (1,4,2) meshes
    equals one device's; the EMA weights stay sharded like the policy's."""
    out = run_on_devices("""
        import jax, numpy as np
        from rlhf_jax.generation import GenerateConfig
        from rlhf_jax.grpo import GRPOConfig, GRPOModels, grpo_iteration, init_grpo_state
        from rlhf_jax.model import ModelConfig, Transformer, init_params
        from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
        from rlhf_jax.stages.steps import jit_on_mesh
        from rlhf_jax.train import OptimizerConfig, make_optimizer

        cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=96,
                          max_len=16)
        policy, rm = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
        models = GRPOModels(policy, rm)
        grpo = GRPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=5, pad_id=0), group_size=4,
                          num_minibatches=2, epochs=2, ptx_coef=0.5, beta=0.04, ema_decay=0.9)
        rng = np.random.default_rng(0)
        mask = (np.arange(8)[None] >= 8 - rng.integers(3, 9, 4)[:, None]).astype(np.int32)
        batch = {"prompt_tokens": np.where(mask, rng.integers(6, 64, (4, 8)), 0).astype(np.int32),
                 "prompt_mask": mask, "ptx_tokens": rng.integers(1, 64, (16, 12)).astype(np.int32),
                 "ptx_mask": np.ones((16, 12), np.int32)}

        def step(state, b):
            ptx = b["ptx_tokens"].reshape(4, 4, 12), b["ptx_mask"].reshape(4, 4, 12)
            return grpo_iteration(models, grpo, state, b["prompt_tokens"], b["prompt_mask"], *ptx)

        pp, rp = init_params(policy, jax.random.PRNGKey(0)), init_params(rm, jax.random.PRNGKey(1))
        ref = None
        meshes = [make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]), make_mesh(MeshConfig(2, 2, 2)),
                  make_mesh(MeshConfig(1, 4, 2))]
        for mesh in meshes:
            state = init_grpo_state(grpo, pp, rp, make_optimizer(OptimizerConfig(lr=1e-2)), jax.random.PRNGKey(2))
            state = jax.device_put(state, state_shardings(state, mesh))
            new, metrics = jit_on_mesh(step, mesh, state)(state, batch)
            kernel = new.ema_params["layer_0"]["mlp"]["up"]["kernel"]
            if mesh.size > 1:
                assert kernel.addressable_shards[0].data.size < kernel.size, "EMA kernel is not sharded"
                assert kernel.sharding == new.policy.params["layer_0"]["mlp"]["up"]["kernel"].sharding
            result = jax.device_get((new.policy.params, new.ema_params)), {k: float(v) for k, v in metrics.items()}
            if ref is None:
                ref = result
                continue
            for k in ref[1]:
                np.testing.assert_allclose(result[1][k], ref[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), ref[0], result[0])
        print("ok", ref[1]["response_length"] > 0)
    """, timeout=600)
    assert out.split() == ["ok", "True"]
