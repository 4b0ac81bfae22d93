"""The PPO-ptx iteration (rlhf_jax.ppo) against independent NumPy transcriptions, and learning tests."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest

from rlhf_jax.generation import GenerateConfig
from rlhf_jax.kl_control import KLControllerConfig
from rlhf_jax.losses import ptx_loss
from rlhf_jax.model import ModelConfig, Transformer, forward, init_params
from rlhf_jax.ppo import (
    PPOConfig,
    PPOModels,
    experience_phase,
    init_ppo_state,
    make_ppo_iteration,
    rollout_phase,
    truncate_at,
    update_phase,
)

VOCAB, TARGET, EOS, PAD = 16, 3, 2, 0
TINY = ModelConfig(arch="gpt2", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_len=48)


def target_reward(params, tokens, mask, index):
    """Fraction of real tokens equal to TARGET (prompts never contain it)."""
    hits = ((tokens == TARGET) & (mask != 0)).sum(axis=1)
    return hits.astype(jnp.float32) / 8.0


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _setup(cfg: PPOConfig, *, reward_model: bool = True, lr: float = 1e-3, seed: int = 0, tx=None):
    policy = Transformer(TINY)
    value = Transformer(TINY.replace(head="scalar"))
    p = init_params(policy, jax.random.PRNGKey(seed))
    v = init_params(value, jax.random.PRNGKey(seed + 1))
    r = init_params(value, jax.random.PRNGKey(seed + 2))
    models = PPOModels(policy, value, value if reward_model else target_reward)
    tx = tx or optax.adam(lr)
    state = init_ppo_state(cfg, p, v, r, tx, tx, jax.random.PRNGKey(seed + 3), reward_gain=1.5, reward_bias=-0.25)
    return models, state


def _prompts(b=8, p=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, VOCAB, size=(b, p))
    mask = np.ones((b, p), np.int32)
    for i in range(b):  # ragged left padding
        k = i % 3
        mask[i, :k] = 0
        ids[i, :k] = PAD
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


def test_truncate_at_matches_numpy():
    from rlhf_jax.generation import Rollout

    resp = np.array([[5, 7, 9, 7, 4], [5, 6, 8, 8, 0], [7, 1, 1, 1, 1]])
    rmask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    prompt = np.ones((3, 2), np.int32)
    ro = Rollout(tokens=jnp.asarray(np.concatenate([prompt, resp], 1)), prompt_mask=jnp.asarray(prompt),
                 response=jnp.asarray(resp), response_mask=jnp.asarray(rmask),
                 logprobs=jnp.ones((3, 5)), ended=jnp.array([False, False, False]))
    out = truncate_at(ro, 7, PAD)
    want_mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(out.response_mask), want_mask)
    np.testing.assert_array_equal(np.asarray(out.response), np.where(want_mask, resp, PAD))
    np.testing.assert_array_equal(np.asarray(out.tokens[:, 2:]), np.where(want_mask, resp, PAD))
    np.testing.assert_array_equal(np.asarray(out.ended), [True, False, True])
    np.testing.assert_array_equal(np.asarray(out.logprobs), want_mask.astype(np.float32))


@pytest.mark.parametrize("temperature,position,penalty", [(1.0, "last", None), (0.7, "after_last", 1.0)])
def test_experience_matches_numpy(temperature, position, penalty):
    cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=6, temperature=temperature, eos_id=EOS, pad_id=PAD),
                    kl=KLControllerConfig(init_kl_coef=0.1), num_minibatches=1, missing_eos_penalty=penalty,
                    score_position=position, lam=0.9, gamma=0.99)
    models, state = _setup(cfg)
    ids, mask = _prompts()
    ro = rollout_phase(models, cfg, state, ids, mask, jax.random.PRNGKey(7))
    exp = experience_phase(models, cfg, state, ro)

    tokens, full = np.asarray(ro.tokens), np.asarray(ro.mask)
    P = ids.shape[1]
    rmask = full[:, P:].astype(bool)
    logits = np.asarray(forward(models.policy, state.ref_params, ro.tokens, ro.mask).logits, np.float64)
    ref = np.take_along_axis(_log_softmax(logits[:, P - 1:-1] / temperature), tokens[:, P:, None], -1)[..., 0]
    values = np.asarray(forward(models.value, state.value.params, ro.tokens, ro.mask).values)[:, P - 1:-1]
    last = np.array([np.flatnonzero(row)[-1] for row in full])
    idx = last if position == "last" else np.minimum(last + 1, full.shape[1] - 1)
    seg = full.copy()
    seg[np.arange(len(idx)), idx] = 1
    raw = np.asarray(forward(models.reward, state.reward_params, ro.tokens, jnp.asarray(seg)).values)
    scores = 1.5 * raw[np.arange(len(idx)), idx] - 0.25
    if penalty is not None:
        scores = scores - penalty * ~np.asarray(ro.ended)
    old = np.asarray(ro.logprobs, np.float64)
    kl = np.where(rmask, old - ref, 0.0)
    rewards = -0.1 * kl
    for b in range(len(scores)):
        rewards[b, np.flatnonzero(rmask[b])[-1]] += scores[b]
    adv = np.zeros_like(rewards)
    for b in range(len(scores)):  # GAE as a plain loop over the real tokens
        n = rmask[b].sum()
        running = 0.0
        for t in reversed(range(n)):
            nv = values[b, t + 1] if t + 1 < n else 0.0
            running = rewards[b, t] + 0.99 * nv - values[b, t] + 0.99 * 0.9 * running
            adv[b, t] = running
    returns = np.where(rmask, adv + values, 0.0)
    a = adv[rmask]
    white = np.where(rmask, (adv - a.mean()) / np.sqrt(a.var(ddof=1) + 1e-8), 0.0)

    np.testing.assert_allclose(np.asarray(exp.ref_logprobs)[rmask], ref[rmask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp.old_values)[rmask], values[rmask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp.scores), scores, atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp.rewards), np.where(rmask, rewards, 0), atol=2e-5)
    np.testing.assert_allclose(np.asarray(exp.returns), returns, atol=5e-5)
    np.testing.assert_allclose(np.asarray(exp.advantages), white, atol=5e-4)


def test_one_update_equals_hand_written_gradient_step():
    """epochs = minibatches = 1: the new policy/value params equal one SGD step on an
    independently written PPO-ptx loss (SGD, not Adam: Adam's first step is ~lr·sign(g), which
    would amplify float32 noise in near-zero gradients)."""
    cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=5, eos_id=EOS, pad_id=PAD), num_minibatches=1,
                    ptx_coef=0.5, ent_coef=0.01, value_clip_eps=0.2)
    models, state = _setup(cfg, tx=optax.sgd(1.0))
    ids, mask = _prompts()
    exp = experience_phase(models, cfg, state, rollout_phase(models, cfg, state, ids, mask, jax.random.PRNGKey(3)))
    # Perturb the old log-probs/values so the clipping is active somewhere.
    noise = jax.random.normal(jax.random.PRNGKey(9), exp.old_logprobs.shape)
    exp = exp.replace(old_logprobs=exp.old_logprobs + 0.3 * noise, old_values=exp.old_values - 0.3 * noise)
    ptx = jax.random.randint(jax.random.PRNGKey(4), (1, 4, 10), 4, VOCAB)
    ptx_mask = jnp.ones_like(ptx).at[:, :, 8:].set(0)
    new_state, _ = update_phase(models, cfg, state, exp, ptx, ptx_mask, jax.random.PRNGKey(5))

    P = ids.shape[1]
    m = exp.response_mask.astype(jnp.float32)

    def policy_objective(params):
        logits = forward(models.policy, params, exp.tokens, exp.mask).logits[:, P - 1:-1]
        logp_all = jax.nn.log_softmax(logits, -1)
        logp = jnp.take_along_axis(logp_all, exp.tokens[:, P:, None], -1)[..., 0]
        ratio = jnp.exp(logp - exp.old_logprobs)
        surrogate = jnp.maximum(-exp.advantages * ratio, -exp.advantages * jnp.clip(ratio, 0.8, 1.2))
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        lm_logits = forward(models.policy, params, ptx[0], ptx_mask[0]).logits[:, :-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(lm_logits, -1), ptx[0][:, 1:, None], -1)[..., 0]
        lm = (nll * ptx_mask[0][:, 1:]).sum() / ptx_mask[0][:, 1:].sum()
        return (surrogate * m).sum() / m.sum() - 0.01 * (entropy * m).sum() / m.sum() + 0.5 * lm

    def value_objective(params):
        v = forward(models.value, params, exp.tokens, exp.mask).values[:, P - 1:-1]
        clipped = jnp.clip(v, exp.old_values - 0.2, exp.old_values + 0.2)
        err = jnp.maximum((v - exp.returns) ** 2, (clipped - exp.returns) ** 2)
        return 0.5 * (err * m).sum() / m.sum()

    for old, new, fn in ((state.policy, new_state.policy, policy_objective), (state.value, new_state.value, value_objective)):
        grads = jax.grad(fn)(old.params)
        updates, _ = old.tx.update(grads, old.opt_state, old.params)
        want = optax.apply_updates(old.params, updates)
        for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        assert int(new.step) == 1


def test_minibatches_and_epochs_count_updates():
    cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=4, pad_id=PAD), num_minibatches=4, epochs=3,
                    ptx_coef=0.0)
    models, state = _setup(cfg)
    ids, mask = _prompts()
    new_state, metrics = make_ppo_iteration(models, cfg)(state, ids, mask)
    assert int(new_state.policy.step) == 12 and int(new_state.value.step) == 12
    assert int(new_state.iteration) == 1
    assert np.isfinite(float(metrics["vf_loss"]))
    _, state = _setup(cfg)  # the iteration donated the first state's buffers
    with pytest.raises(ValueError, match="num_minibatches"):
        bad = PPOConfig(generation=GenerateConfig(max_new_tokens=4, pad_id=PAD), num_minibatches=3)
        update_phase(models, bad, state, experience_phase(models, bad, state, rollout_phase(
            models, bad, state, ids, mask, jax.random.PRNGKey(0))), None, None, jax.random.PRNGKey(0))


@pytest.mark.parametrize("field,value", [("clip_eps", 0.0), ("epochs", 0), ("kl_estimator", "k4"),
                                         ("score_position", "first"), ("gamma", 1.5), ("ptx_coef", -1.0)])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=f"PPOConfig.{field}"):
        PPOConfig(**{field: value})


def _run(cfg, models, state, iters, ptx=None, seed=0):
    step = make_ppo_iteration(models, cfg)
    history = []
    rng = np.random.default_rng(seed)
    for i in range(iters):
        ids = jnp.asarray(rng.integers(4, VOCAB, size=(32, 4)), jnp.int32)
        ids = jnp.where(ids == TARGET, TARGET + 1, ids)
        args = () if ptx is None else ptx(i)
        state, metrics = step(state, ids, jnp.ones_like(ids), *args)
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


@pytest.mark.slow
def test_ppo_raises_known_reward_and_adaptive_kl_tracks_target():
    target_kl = 4.0
    cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=8, pad_id=PAD), num_minibatches=2, epochs=2,
                    ptx_coef=0.0, kl=KLControllerConfig(kind="adaptive", init_kl_coef=0.05, target=target_kl, horizon=64))
    models, state = _setup(cfg, reward_model=False, lr=3e-3)
    _, hist = _run(cfg, models, state, 50)
    late = hist[-20:]
    first = np.mean([h["score"] for h in hist[:3]])  # about 1.5 * 1/16 - 0.25
    score_late = np.mean([h["score"] for h in late])
    assert score_late > first + 0.3, (first, score_late)
    kl_late = np.mean([h["kl"] for h in late])
    assert 0.4 * target_kl < kl_late < 2.0 * target_kl, kl_late
    # The controller raised beta once the KL overshot the target.
    assert max(h["kl_coef"] for h in hist) > 0.08


GAMMAS = (0.0, 0.2)


@pytest.mark.slow
def test_ptx_term_limits_the_alignment_tax():
    """With gamma > 0 the pretraining loss stays near its starting value; with gamma = 0 it drifts."""
    rng = np.random.default_rng(0)
    corpus = np.stack([np.roll(np.tile(np.arange(3, 11), 3)[:12], -s) for s in rng.integers(0, 8, 64)])
    corpus = jnp.asarray(corpus, jnp.int32)
    # Pretrain a tiny LM on the cyclic corpus so the ptx loss is meaningful.
    policy = Transformer(TINY)
    params = init_params(policy, jax.random.PRNGKey(0))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def lm_step(params, opt):
        loss, g = jax.value_and_grad(lambda p: ptx_loss(forward(policy, p, corpus, jnp.ones_like(corpus)).logits,
                                                        corpus, jnp.ones_like(corpus)))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    for _ in range(150):
        params, opt, loss = lm_step(params, opt)
    base = float(loss)
    assert base < 0.5

    def ptx_eval(p):
        return float(ptx_loss(forward(policy, p, corpus, jnp.ones_like(corpus)).logits, corpus, jnp.ones_like(corpus)))

    results = {}
    for gamma in GAMMAS:
        cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=8, pad_id=PAD), num_minibatches=2, ptx_coef=gamma,
                        kl=KLControllerConfig(init_kl_coef=0.01))
        models, state = _setup(cfg, reward_model=False, lr=3e-3)
        state = init_ppo_state(cfg, params, state.value.params, None, optax.adam(3e-3), optax.adam(3e-3),
                               jax.random.PRNGKey(1))
        ptx = lambda i: (corpus[(i * 16) % 64:(i * 16) % 64 + 16].reshape(2, 8, 12), jnp.ones((2, 8, 12), jnp.int32))
        state, hist = _run(cfg, models, state, 25, ptx=ptx)
        results[gamma] = (ptx_eval(state.policy.params), hist[-1]["score"])
    drift_free, drift_ptx = results[0.0][0] - base, results[GAMMAS[1]][0] - base
    assert drift_free > 0.5, results
    assert drift_ptx < 0.35 * drift_free, results
    assert results[GAMMAS[1]][1] > 0.5 * results[0.0][1] > 0.05, results  # it still learns the reward


def test_rollout_decodes_from_compute_dtype_weights():
    """float32 compute: the rollout decodes from the policy params as they are; bfloat16 compute:
    from the params cast to bfloat16 (equal to ``generate`` from explicitly cast params); with
    ``cast_rollout_weights=False`` from the float32 params."""
    from rlhf_jax.generation import generate
    from rlhf_jax.model import cast_floating
    from rlhf_jax.ppo import rollout_params

    cfg = PPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=EOS, pad_id=PAD), num_minibatches=2)
    models, state = _setup(cfg)
    ids, mask = _prompts()
    key = jax.random.PRNGKey(5)
    ro = jax.jit(rollout_phase, static_argnums=(0, 1))(models, cfg, state, ids, mask, key)
    assert rollout_params(models, cfg, state.policy.params) is state.policy.params
    ref = generate(models.policy, state.policy.params, ids, mask, key, cfg.generation)
    np.testing.assert_array_equal(np.asarray(ro.tokens), np.asarray(ref.tokens))

    bf16 = models._replace(policy=Transformer(TINY.replace(dtype="bfloat16")))
    cast = rollout_params(bf16, cfg, state.policy.params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))
    ro16 = jax.jit(rollout_phase, static_argnums=(0, 1))(bf16, cfg, state, ids, mask, key)
    ref16 = generate(bf16.policy, cast_floating(state.policy.params, jnp.bfloat16), ids, mask, key, cfg.generation)
    np.testing.assert_array_equal(np.asarray(ro16.tokens), np.asarray(ref16.tokens))
    np.testing.assert_allclose(np.asarray(ro16.logprobs), np.asarray(ref16.logprobs), rtol=1e-6, atol=1e-6)
    off = PPOConfig(generation=cfg.generation, num_minibatches=2, cast_rollout_weights=False)
    assert rollout_params(bf16, off, state.policy.params) is state.policy.params
