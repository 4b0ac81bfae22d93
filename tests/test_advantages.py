"""advantages.py and masked.py against slow NumPy / Python-loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.advantages import gae, kl_penalty, last_index, per_token_rewards, whiten
from rlhf_jax.masked import masked_mean, masked_var


def ragged_masks(rng: np.random.Generator, batch: int, time: int) -> np.ndarray:
    """Right-padded rows of random lengths, plus a full, an empty and a left-padded row."""
    lengths = rng.integers(1, time, size=batch)
    mask = (np.arange(time)[None] < lengths[:, None]).astype(np.float32)
    mask[0] = 1.0
    mask[1] = 0.0
    mask[2] = 0.0
    mask[2, time // 2:] = 1.0  # leading zeros: left padding
    return mask


def runs(row):
    """(start, end) of each run of non-zero entries of a 1-D mask, ends inclusive."""
    edges = np.diff(np.concatenate([[0], (row != 0).astype(int), [0]]))
    return zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1)


def ref_gae(rewards, values, mask, gamma, lam):
    """GAE as a loop over each run of real tokens (one episode each); V after a run is 0."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    ret = np.zeros_like(adv)
    for b in range(rewards.shape[0]):
        for start, end in runs(mask[b]):
            last = 0.0
            for t in range(end, start - 1, -1):
                next_value = values[b, t + 1] if t < end else 0.0
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                last = delta + gamma * lam * last
                adv[b, t] = last
                ret[b, t] = last + values[b, t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)])
def test_gae_matches_python_loop(gamma, lam):
    rng = np.random.default_rng(0)
    batch, time = 7, 11
    mask = ragged_masks(rng, batch, time)
    rewards = rng.normal(size=(batch, time)).astype(np.float32)
    values = rng.normal(size=(batch, time)).astype(np.float32)
    adv, ret = jax.jit(gae)(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_a_zero_in_the_mask_ends_the_episode():
    rng = np.random.default_rng(5)
    mask = np.array([[1, 1, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 1, 1]], np.float32)
    rewards = rng.normal(size=mask.shape)
    values = rng.normal(size=mask.shape)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_ignores_junk_outside_mask_and_accepts_bool_mask():
    rng = np.random.default_rng(1)
    mask = ragged_masks(rng, 5, 8)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    junk_r = np.where(mask > 0, rewards, np.inf)
    junk_v = np.where(mask > 0, values, np.nan)
    adv, ret = gae(junk_r, junk_v, mask.astype(bool), gamma=1.0, lam=0.95)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, 1.0, 0.95)
    np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_gae_bad_shapes_name_the_arguments():
    x = jnp.zeros((2, 4))
    with pytest.raises(AssertionError, match="gae: `rewards`, `values`, `mask`"):
        gae(x, jnp.zeros((2, 5)), x, gamma=1.0, lam=0.95)
    with pytest.raises(AssertionError, match="gae: `rewards` must be"):
        gae(jnp.zeros(4), jnp.zeros(4), jnp.zeros(4), gamma=1.0, lam=0.95)


def test_last_index():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]], np.float32)
    np.testing.assert_array_equal(last_index(mask), [1, 3, -1, 2])
    np.testing.assert_array_equal(last_index(mask.astype(bool)), [1, 3, -1, 2])
    with pytest.raises(AssertionError, match="last_index: `mask`"):
        last_index(jnp.ones(3))


def ref_kl(lp, ref, estimator):
    log_r = ref - lp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": (np.exp(log_r) - 1) - log_r}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("explicit_index", [False, True])
def test_per_token_rewards_matches_numpy(estimator, explicit_index):
    rng = np.random.default_rng(2)
    batch, time = 6, 9
    mask = ragged_masks(rng, batch, time)
    lp = -rng.uniform(0.1, 3, size=(batch, time))
    ref = -rng.uniform(0.1, 3, size=(batch, time))
    scores = rng.normal(size=batch)
    beta = 0.05
    kl = np.where(mask > 0, ref_kl(lp, ref, estimator), 0.0)
    want = -beta * kl
    if explicit_index:
        index = rng.integers(0, time, size=batch)
    else:
        index = np.array([np.flatnonzero(m)[-1] if m.any() else -1 for m in mask])
    for b in range(batch):
        if index[b] >= 0:
            want[b, index[b]] += scores[b]
    lp_junk = np.where(mask > 0, lp, np.inf)  # masked positions must not leak
    fn = jax.jit(per_token_rewards, static_argnames="kl_estimator")
    got_r, got_kl = fn(scores.astype(np.float32), lp_junk.astype(np.float32), ref.astype(np.float32), mask,
                       kl_coef=jnp.float32(beta), kl_estimator=estimator,
                       score_index=jnp.asarray(index) if explicit_index else None)
    np.testing.assert_allclose(got_kl, kl, atol=1e-5)
    np.testing.assert_allclose(got_r, want, atol=1e-5)


def test_per_token_rewards_bad_input():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        per_token_rewards(jnp.zeros(2), x, x, x, kl_coef=0.1, kl_estimator="k4")
    with pytest.raises(AssertionError, match="`scores` must be \\[batch\\]"):
        per_token_rewards(jnp.zeros(3), x, x, x, kl_coef=0.1)
    with pytest.raises(AssertionError, match="`score_index` must be \\[batch\\]"):
        per_token_rewards(jnp.zeros(2), x, x, x, kl_coef=0.1, score_index=jnp.zeros(3, int))
    with pytest.raises(AssertionError, match="`logprobs`, `ref_logprobs`, `mask`"):
        per_token_rewards(jnp.zeros(2), x, jnp.zeros((2, 4)), x, kl_coef=0.1)


def test_kl_penalty_k3_is_nonnegative_and_zero_at_equality():
    lp = jnp.linspace(-3, 0, 7)
    assert float(jnp.min(kl_penalty(lp, lp[::-1], "k3"))) >= 0
    np.testing.assert_allclose(kl_penalty(lp, lp, "k3"), 0, atol=1e-7)


def ref_whiten(x, mask, shift_mean, unbiased, eps=1e-8):
    vals = x[mask > 0].astype(np.float64)
    mean = vals.mean()
    var = vals.var(ddof=1 if unbiased else 0)
    out = (x - mean) / np.sqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return np.where(mask > 0, out, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
def test_whiten_matches_numpy(shift_mean, unbiased):
    rng = np.random.default_rng(3)
    mask = ragged_masks(rng, 5, 7)
    x = (3 + 2 * rng.normal(size=mask.shape)).astype(np.float32)
    got = jax.jit(whiten, static_argnames=("shift_mean", "unbiased"))(
        np.where(mask > 0, x, np.nan), mask, shift_mean=shift_mean, unbiased=unbiased)
    np.testing.assert_allclose(got, ref_whiten(x, mask, shift_mean, unbiased), atol=1e-5)


def test_whiten_bad_shapes():
    with pytest.raises(AssertionError, match="whiten: `x` and `mask`"):
        whiten(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_masked_mean_and_var_match_numpy(axis):
    rng = np.random.default_rng(4)
    mask = rng.random((6, 5)) < 0.6
    mask[:, 0] = mask[0, :] = True
    x = rng.normal(size=mask.shape)
    xm = np.ma.masked_array(x, ~mask)
    np.testing.assert_allclose(masked_mean(x.astype(np.float32), mask, axis), xm.mean(axis), atol=1e-6)
    for unbiased in (True, False):
        np.testing.assert_allclose(masked_var(x.astype(np.float32), mask.astype(np.float32), axis, unbiased=unbiased),
                                   xm.var(axis, ddof=int(unbiased)), atol=1e-5)


def test_masked_mean_of_empty_mask_is_zero():
    x = jnp.array([[np.nan, 1.0]])
    assert float(masked_mean(x, jnp.zeros((1, 2)))) == 0.0
    assert float(masked_var(x, jnp.array([[0.0, 1.0]]))) == 0.0
