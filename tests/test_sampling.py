"""Sampling filters against slow NumPy references on small vocabularies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlhf_jax.sampling import filter_logits, sample_token


def ref_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The kept token set of one row, by sorting in Python (ties: lower id first)."""
    x = np.asarray(logits, np.float64) / temperature
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if top_k:
        order = order[:top_k]
    probs = np.exp(x[order] - x[order].max())
    probs /= probs.sum()
    kept, mass = [], 0.0
    for i, p in zip(order, probs):
        kept.append(i)
        mass += p
        if mass >= top_p:
            break
    return set(kept)


def kept(filtered: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(filtered)).tolist())


def test_top_k_keeps_exactly_k_with_ties_by_index():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    for k, expected in [(1, {1}), (2, {1, 2}), (3, {1, 2, 4}), (4, {1, 2, 3, 4})]:
        out = np.asarray(filter_logits(logits, top_k=k))[0]
        assert kept(out) == expected, k
        np.testing.assert_array_equal(out[list(expected)], np.asarray(logits)[0, list(expected)])
    assert kept(np.asarray(filter_logits(logits, top_k=10))[0]) == set(range(6))


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, expected in [(0.1, {1}), (0.49, {1}), (0.51, {1, 3}), (0.79, {1, 3}), (0.81, {1, 2, 3}), (0.96, {0, 1, 2, 3})]:
        assert kept(np.asarray(filter_logits(logits, top_p=p))[0]) == expected, p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.7), (0.5, 0, 0.9), (2.0, 5, 0.6), (1.3, 3, 1.0)])
def test_filters_match_reference_on_random_rows(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 11)) * 2
    logits[:8, 3] = logits[:8, 7]  # exact ties
    out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), temperature=temperature,
                                   top_k=top_k, top_p=top_p))
    for row in range(len(logits)):
        assert kept(out[row]) == ref_kept(logits[row], temperature, top_k, top_p), row
        keep = np.isfinite(out[row])
        np.testing.assert_allclose(out[row][keep], logits[row][keep] / temperature, rtol=1e-6)


def test_zero_temperature_and_greedy_are_argmax():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(32, 50)), jnp.float32)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    key = jax.random.key(0)
    np.testing.assert_array_equal(sample_token(key, logits, temperature=0.0), argmax)
    np.testing.assert_array_equal(sample_token(key, logits, greedy=True, top_p=0.5), argmax)
    np.testing.assert_array_equal(sample_token(key, logits, temperature=1e-4), argmax)
    assert [kept(r) for r in np.asarray(filter_logits(logits, temperature=0.0))] == [{a} for a in argmax]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.5, 0, 0.8), (0.9, 5, 0.85)])
def test_empirical_frequencies_match_filtered_softmax(temperature, top_k, top_p):
    logits = np.array([1.2, -0.3, 0.5, 2.0, 0.0, -1.0, 0.9], np.float64)
    n = 40_000
    draws = sample_token(jax.random.key(42), jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits))),
                         temperature=temperature, top_k=top_k, top_p=top_p)
    counts = np.bincount(np.asarray(draws), minlength=len(logits))
    keep = sorted(ref_kept(logits, temperature, top_k, top_p))
    assert counts[[i for i in range(len(logits)) if i not in keep]].sum() == 0
    expected = np.exp(logits[keep] / temperature)
    expected = n * expected / expected.sum()
    assert stats.chisquare(counts[keep], expected).pvalue > 1e-3


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_settings_raise(kwargs, field):
    logits = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match=field):
        filter_logits(logits, **kwargs)
    with pytest.raises(ValueError, match=field):
        sample_token(jax.random.key(0), logits, **kwargs)
