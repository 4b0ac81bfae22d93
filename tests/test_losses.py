"""losses.py against NumPy / explicit-loop references (and torch's cross entropy)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import (
    chunked_logprobs,
    explained_variance,
    logprobs_of,
    ppo_policy_loss,
    ptx_loss,
    ranking_loss,
    sft_loss,
    token_entropy,
    token_logprobs,
    value_loss,
)



def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ---------------------------------------------------------------- log-probs and LM losses


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_of_and_entropy_match_numpy(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    logp = np_log_softmax(logits / temperature)
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(logprobs_of(logits.astype(np.float32), targets, temperature), want, atol=1e-5)
    np.testing.assert_allclose(token_entropy(logits.astype(np.float32), temperature),
                               -(np.exp(logp) * logp).sum(-1), atol=1e-5)


def test_log_softmax_runs_in_float32_for_bfloat16_logits():
    logits = jnp.ones((1, 2, 4), jnp.bfloat16)
    assert logprobs_of(logits, jnp.zeros((1, 2), int)).dtype == jnp.float32
    assert token_entropy(logits).dtype == jnp.float32


def test_token_logprobs_shifts_by_one():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, size=(2, 6))
    logp = np_log_softmax(logits)
    want = np.array([[logp[b, t, tokens[b, t + 1]] for t in range(5)] for b in range(2)])
    np.testing.assert_allclose(token_logprobs(logits, tokens), want, atol=1e-5)


def ref_next_token_loss(logits, tokens, mask):
    logp = np_log_softmax(logits)
    total, count = 0.0, 0.0
    for b in range(tokens.shape[0]):
        for t in range(1, tokens.shape[1]):
            if mask[b, t]:
                total -= logp[b, t - 1, tokens[b, t]]
                count += 1
    return total / count


@pytest.mark.parametrize("loss_fn", [sft_loss, ptx_loss])
def test_next_token_losses_match_loop(loss_fn):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 8, 13)).astype(np.float32)
    tokens = rng.integers(0, 13, size=(3, 8))
    mask = (rng.random((3, 8)) < 0.7).astype(np.float32)
    mask[0, 3] = 1
    got = jax.jit(loss_fn)(logits, tokens, mask)
    np.testing.assert_allclose(got, ref_next_token_loss(logits, tokens, mask), rtol=1e-5)
    # loss_mask[:, 0] marks no target, and the last position's logits predict nothing
    mask2 = mask.copy()
    mask2[:, 0] = 1 - mask2[:, 0]
    logits2 = logits.copy()
    logits2[:, -1] += 100.0
    np.testing.assert_allclose(loss_fn(logits2, tokens, mask2), got, rtol=1e-6)


def test_sft_loss_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 7, 9)).astype(np.float32)
    tokens = rng.integers(0, 9, size=(2, 7))
    mask = np.ones((2, 7), np.float32)
    mask[1, 4:] = 0
    mask[0, :2] = 0  # prompt
    labels = np.where(mask > 0, tokens, -100)[:, 1:]
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[:, :-1]).reshape(-1, 9),
                                             torch.tensor(labels).reshape(-1), ignore_index=-100)
    np.testing.assert_allclose(sft_loss(logits, tokens, mask), want.item(), rtol=1e-5)


def test_lm_loss_bad_shapes():
    logits = jnp.zeros((2, 5, 7))
    with pytest.raises(AssertionError, match="sft_loss: mask must be"):
        sft_loss(logits, jnp.zeros((2, 5), int), jnp.ones((2, 4)))
    with pytest.raises(AssertionError, match="ptx_loss: mask must be"):
        ptx_loss(logits, jnp.zeros((2, 5), int), jnp.ones((2, 4)))
    with pytest.raises(AssertionError, match="token_logprobs: `tokens`"):
        sft_loss(logits, jnp.zeros((2, 6), int), jnp.ones((2, 6)))
    with pytest.raises(AssertionError, match="logprobs_of: `logits`"):
        logprobs_of(jnp.zeros((2, 5)), jnp.zeros((2, 5), int))
    with pytest.raises(AssertionError, match="token_entropy: `logits`"):
        token_entropy(jnp.zeros((2, 5)))


# ---------------------------------------------------------------- ranking loss


def ref_ranking(rewards, mask, margin=0.0, centering=0.0, ranks=None):
    """Explicit loops over the C(K, 2) pairs of each prompt."""
    per_prompt, correct, n_pairs = [], 0, 0
    for b in range(rewards.shape[0]):
        valid = [k for k in range(rewards.shape[1]) if mask[b, k]]
        terms = []
        for i, j in itertools.combinations(valid, 2):
            if ranks is not None:
                if ranks[b, i] == ranks[b, j]:
                    continue
                if ranks[b, i] > ranks[b, j]:
                    i, j = j, i
            d = rewards[b, i] - rewards[b, j]
            terms.append(np.log1p(np.exp(-(d - margin))))
            correct += d > 0
            n_pairs += 1
        if terms:
            per_prompt.append(np.mean(terms))
    loss = np.mean(per_prompt) if per_prompt else 0.0
    loss += centering * np.mean(rewards[mask > 0] ** 2)
    return loss, correct / max(n_pairs, 1)


def random_rm_batch(rng, batch, k):
    rewards = rng.normal(size=(batch, k))
    lengths = rng.integers(2, k + 1, size=batch)
    lengths[-1] = 1  # a prompt with one response contributes no pair
    mask = np.arange(k)[None] < lengths[:, None]
    return rewards, mask


@pytest.mark.parametrize("k", range(2, 10))
def test_ranking_loss_matches_pair_loop(k):
    rng = np.random.default_rng(10 + k)
    rewards, mask = random_rm_batch(rng, 5, k)
    fn = jax.jit(ranking_loss)
    for margin, centering in [(0.0, 0.0), (0.5, 0.01)]:
        loss, acc = fn(rewards.astype(np.float32), mask, margin=margin, centering_coef=centering)
        want_loss, want_acc = ref_ranking(rewards, mask, margin, centering)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
        np.testing.assert_allclose(acc, want_acc, rtol=1e-6)


@pytest.mark.parametrize("k", [2, 4, 9])
def test_ranking_loss_with_ranks_and_ties(k):
    rng = np.random.default_rng(20 + k)
    rewards, mask = random_rm_batch(rng, 6, k)
    ranks = rng.integers(0, max(2, k - 2), size=(6, k))  # plenty of ties
    ranks[0] = 0  # all tied: this prompt is dropped
    loss, acc = ranking_loss(rewards.astype(np.float32), mask.astype(np.float32), margin=0.2,
                             ranks=jnp.asarray(ranks))
    want_loss, want_acc = ref_ranking(rewards, mask, 0.2, 0.0, ranks)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(acc, want_acc, rtol=1e-6)


def test_ranking_loss_without_pairs_is_zero_not_nan():
    loss, acc = ranking_loss(jnp.ones((2, 3)), jnp.array([[1, 0, 0], [0, 0, 0]]))
    assert float(loss) == 0.0 and float(acc) == 0.0


def test_ranking_loss_gradient_matches_finite_differences(x64):
    rng = np.random.default_rng(5)
    rewards, mask = random_rm_batch(rng, 4, 5)
    ranks = rng.integers(0, 3, size=(4, 5))

    @jax.jit
    def f(r):
        return ranking_loss(r, mask, margin=0.3, centering_coef=0.05, ranks=ranks)[0]

    r = jnp.asarray(rewards, jnp.float64)
    grad = np.asarray(jax.grad(f)(r))
    h = 1e-6
    fd = np.zeros_like(rewards)
    for idx in np.ndindex(rewards.shape):
        e = np.zeros_like(rewards)
        e[idx] = h
        fd[idx] = (f(r + e) - f(r - e)) / (2 * h)
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    assert np.all(grad[~mask] == 0)


def test_ranking_loss_bad_shapes():
    with pytest.raises(AssertionError, match="ranking_loss: `rewards` must be"):
        ranking_loss(jnp.zeros(4), jnp.ones(4))
    with pytest.raises(AssertionError, match="ranking_loss: `mask`"):
        ranking_loss(jnp.zeros((2, 4)), jnp.ones((2, 3)))
    with pytest.raises(AssertionError, match="ranking_loss: `ranks`"):
        ranking_loss(jnp.zeros((2, 4)), jnp.ones((2, 4)), ranks=jnp.zeros((2, 3), int))


# ---------------------------------------------------------------- PPO losses


def ppo_inputs(rng, batch=4, time=6):
    mask = np.arange(time)[None] < rng.integers(1, time + 1, size=batch)[:, None]
    old = -rng.uniform(0.5, 2, size=(batch, time))
    new = old + rng.normal(scale=0.3, size=(batch, time))
    adv = rng.normal(size=(batch, time))
    return new, old, adv, mask


def test_ppo_policy_loss_matches_numpy():
    rng = np.random.default_rng(6)
    new, old, adv, mask = ppo_inputs(rng)
    eps = 0.2
    ratio = np.exp(new - old)
    l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    m = mask > 0
    want = np.maximum(l1, l2)[m].mean()
    # junk outside the mask (TRL stores 1.0 there; inf must not leak either)
    old_junk = np.where(m, old, -np.inf)
    loss, stats = jax.jit(ppo_policy_loss)(new, old_junk, adv, mask.astype(np.float32), clip_eps=eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    log_r = (new - old)[m]
    np.testing.assert_allclose(stats["clipfrac"], (l2 > l1)[m].mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["approx_kl"], (0.5 * log_r**2).mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["approx_kl_k3"], (np.exp(log_r) - 1 - log_r).mean(), rtol=1e-4)
    np.testing.assert_allclose(stats["ratio_mean"], np.exp(log_r).mean(), rtol=1e-5)
    grad = jax.grad(lambda lp: ppo_policy_loss(lp, old_junk, adv, mask, clip_eps=eps)[0])(jnp.asarray(new))
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~m] == 0)


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_value_loss_matches_numpy(clip_eps):
    rng = np.random.default_rng(7)
    _, _, returns, mask = ppo_inputs(rng)
    old_v = rng.normal(size=returns.shape)
    v = old_v + rng.normal(scale=0.5, size=returns.shape)
    m = mask > 0
    l1 = (v - returns) ** 2
    if clip_eps is None:
        want, want_frac = 0.5 * l1[m].mean(), 0.0
    else:
        l2 = (np.clip(v, old_v - clip_eps, old_v + clip_eps) - returns) ** 2
        want, want_frac = 0.5 * np.maximum(l1, l2)[m].mean(), (l2 > l1)[m].mean()
    loss, stats = value_loss(v, np.where(m, old_v, np.nan), np.where(m, returns, np.inf), mask, clip_eps=clip_eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(stats["vf_clipfrac"], want_frac, rtol=1e-6)
    if clip_eps is not None:
        assert 0 < want_frac < 1  # the clipped branch is exercised


def test_explained_variance():
    rng = np.random.default_rng(8)
    _, _, returns, mask = ppo_inputs(rng)
    values = returns + rng.normal(scale=0.5, size=returns.shape)
    m = mask > 0
    want = 1 - np.var((returns - values)[m]) / np.var(returns[m])
    np.testing.assert_allclose(explained_variance(values, returns, mask), want, rtol=1e-5)
    assert float(explained_variance(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.ones((2, 3)))) == 0.0


def test_ppo_losses_bad_shapes():
    x, y = jnp.zeros((2, 3)), jnp.zeros((2, 4))
    with pytest.raises(AssertionError, match="ppo_policy_loss: `advantages`"):
        ppo_policy_loss(x, x, y, x, clip_eps=0.2)
    with pytest.raises(AssertionError, match="value_loss: `returns`"):
        value_loss(x, x, y, x, clip_eps=0.2)
    with pytest.raises(AssertionError, match="explained_variance"):
        explained_variance(x, y, x)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunked_logprobs_equal_the_full_logits_values_and_gradients(chunk):
    """``chunked_logprobs`` (chunks of the time axis, each rematerialised) against ``logprobs_of`` /
    ``token_entropy`` of the whole ``[b, n, V]`` logits: values and gradients w.r.t. the hidden
    states and the unembedding, with a ragged last chunk."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(3, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(3, 7)))
    weights = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)

    def full(h, w):
        logits = h @ w
        return logprobs_of(logits, targets, 0.7), token_entropy(logits, 0.7)

    def chunked(h, w):
        return chunked_logprobs(lambda x: x @ w, h, targets, chunk, 0.7)

    for a, b in zip(full(hidden, w), chunked(hidden, w)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    objective = lambda fn: lambda h, w: jnp.sum(weights * (fn(h, w)[0] + 0.3 * fn(h, w)[1]))  # noqa: E731
    g_full = jax.grad(objective(full), argnums=(0, 1))(hidden, w)
    g_chunk = jax.jit(jax.grad(objective(chunked), argnums=(0, 1)))(hidden, w)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    lp, ent = chunked_logprobs(lambda x: x @ w, hidden, targets, chunk, with_entropy=False)
    assert ent is None and lp.shape == (3, 7)
