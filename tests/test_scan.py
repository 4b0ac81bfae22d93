"""Layers as a ``lax.scan`` (``ModelConfig.scan_layers``) against the unrolled stack: the same
parameter tree gives the same logits, values, gradients, cached prefill + decode and generated
tokens, with every remat policy; and the scanned program does not grow with depth."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.model import (ModelConfig, Transformer, decode_step, forward, init_cache, init_params,
                            positions_from_mask, stack_layers)

GPT2 = ModelConfig(arch="gpt2", vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_len=32)
LLAMA = ModelConfig(arch="llama", vocab_size=67, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_len=32, tie_embeddings=False)
TOL = dict(rtol=1e-5, atol=1e-6)


def _batch(config: ModelConfig, b: int = 3, t: int = 9):
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, t), 0, config.vocab_size)
    mask = jnp.ones((b, t), jnp.int32).at[0, :3].set(0).at[1, :1].set(0)  # left padding
    return tokens, mask


def _loss(model: Transformer, params, tokens, mask):
    out = forward(model, params, tokens, mask)
    head = out.values if out.logits is None else out.logits
    return jnp.sum(jnp.where(mask[..., None] if head.ndim == 3 else mask, head, 0.0) ** 2) * 1e-3


SLOW = pytest.mark.slow  # ~20-40 s each on a busy 2-core machine (compiles)


@pytest.mark.parametrize("base,policy", [(GPT2, "none"), pytest.param(GPT2, "full", marks=SLOW),
                                         pytest.param(LLAMA, "dots", marks=SLOW), (LLAMA, "full"),
                                         pytest.param(LLAMA.replace(head="scalar"), "none", marks=SLOW)],
                         ids=["gpt2-none", "gpt2-full", "llama-dots", "llama-full", "llama-scalar-none"])
def test_scanned_equals_unrolled_forward_and_gradients(base, policy):
    unrolled = Transformer(base.replace(remat_policy=policy))
    scanned = Transformer(base.replace(remat_policy=policy, scan_layers=True))
    params = init_params(unrolled, jax.random.PRNGKey(0))
    # init under scan_layers creates the same stored tree (layer_{i}/...), values included
    jax.tree.map(np.testing.assert_array_equal, params, init_params(scanned, jax.random.PRNGKey(0)))
    tokens, mask = _batch(base)
    fwd = jax.jit(forward, static_argnums=0)
    a, b = fwd(unrolled, params, tokens, mask), fwd(scanned, params, tokens, mask)
    keep = np.asarray(mask, bool)
    for x, y in ((a.logits, b.logits), (a.values, b.values), (a.hidden, b.hidden)):
        if x is not None:
            np.testing.assert_allclose(np.asarray(x)[keep], np.asarray(y)[keep], **TOL)
    grad = jax.jit(jax.grad(_loss, argnums=1), static_argnums=0)
    ga, gb = grad(unrolled, params, tokens, mask), grad(scanned, params, tokens, mask)
    assert jax.tree.structure(ga) == jax.tree.structure(params) == jax.tree.structure(gb)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), ga, gb)
    # pre-stacked params are accepted too (what generate passes)
    c = fwd(scanned, stack_layers(params, base.n_layers), tokens, mask)
    np.testing.assert_array_equal(np.asarray(c.hidden), np.asarray(b.hidden))


@pytest.mark.parametrize("base", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_scanned_prefill_and_decode_through_the_cache(base):
    unrolled, scanned = Transformer(base), Transformer(base.replace(scan_layers=True, scan_decode=True))
    params = init_params(unrolled, jax.random.PRNGKey(0))
    tokens, mask = _batch(base, t=10)
    p = 7
    pos = positions_from_mask(mask)
    decode_step_jit = jax.jit(decode_step, static_argnums=0)
    outs = []
    for model in (unrolled, scanned):
        cache = init_cache(model.config, 3, 10)
        pre = decode_step_jit(model, params, tokens[:, :p], pos[:, :p], mask[:, :p], cache, 0)
        cache, logits = pre.cache, [pre.logits[:, -1]]
        for i in range(p, 10):
            step = decode_step_jit(model, params, tokens[:, i:i + 1], pos[:, i:i + 1], mask[:, i:i + 1], cache, i)
            cache, logits = step.cache, logits + [step.logits[:, 0]]
        outs.append((np.stack(logits, 1), cache))
    np.testing.assert_allclose(outs[0][0], outs[1][0], **TOL)
    # the unrolled cache holds one array per layer, the scanned one stacks them
    assert isinstance(outs[0][1]["k"], tuple) and outs[1][1]["k"].shape[0] == base.n_layers
    unrolled_cache = {name: np.stack(x) if isinstance(x, tuple) else x for name, x in outs[0][1].items()}
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **TOL), unrolled_cache, outs[1][1])
    # and the cached decode equals the full forward's logits at the last columns
    full = forward(unrolled, params, tokens, mask).logits[:, p - 1:]
    np.testing.assert_allclose(outs[1][0], np.asarray(full), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("base", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_scanned_generation_gives_the_same_tokens(base):
    """Sampling with scanned layers, cached calls scanned (``scan_decode=True``) or unrolled (the
    default: scanned full forwards only), draws the same tokens as the unrolled model."""
    params = init_params(Transformer(base), jax.random.PRNGKey(0))
    tokens, mask = _batch(base, t=6)
    gen = GenerateConfig(max_new_tokens=8, temperature=1.0, top_k=20)
    a = generate(Transformer(base), params, tokens, mask, jax.random.PRNGKey(3), gen)
    for config in (base.replace(scan_layers=True, scan_decode=True), base.replace(scan_layers=True)):
        b = generate(Transformer(config), params, tokens, mask, jax.random.PRNGKey(3), gen)
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), **TOL)


def _grad_program(config: ModelConfig) -> tuple[int, str]:
    """(jaxpr equation count, optimised-HLO text) of the gradient of a forward."""
    model = Transformer(config)
    params = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    fn = jax.grad(lambda p, t: _loss(model, p, t, jnp.ones_like(t)))
    jaxpr = jax.make_jaxpr(fn)(params, tokens)

    def count(j) -> int:  # equations, nested sub-jaxprs included
        return sum(1 + sum(count(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
                           for sub in jax.extend.core.jaxprs_in_params(e.params)) for e in j.eqns)

    return count(jaxpr.jaxpr), jax.jit(fn).lower(params, tokens).as_text()


def test_scanned_program_size_does_not_grow_with_depth():
    sizes = {}
    for scan in (False, True):
        for layers in (2, 8):
            n_eqns, hlo = _grad_program(LLAMA.replace(n_layers=layers, scan_layers=scan, remat_policy="dots"))
            sizes[scan, layers] = (n_eqns, len(hlo))
    print("jaxpr equations / lowered text length (unrolled, scanned) x (2, 8 layers):", sizes)
    # the scanned program carries the per-layer stacking (a few equations per layer) but one block
    assert sizes[True, 8][0] < 1.3 * sizes[True, 2][0]
    assert sizes[False, 8][0] > 3 * sizes[False, 2][0]
    assert sizes[True, 8][0] < sizes[False, 8][0] / 3


def test_stage_configs_expose_scan_decode():
    """``model.scan_decode`` in a stage config reaches ``ModelConfig`` (default ``False``: the cached
    calls unroll even with ``scan_layers``, and their cache is one array per layer)."""
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.stages.sources import ModelSource, model_config

    default = model_config(ModelSource(init=GPT2, scan_layers=True))
    assert default.scan_layers and not default.scan_decode and not default.scans(cached=True)
    assert default.scans(cached=False) and isinstance(init_cache(default, 2, 4)["k"], tuple)
    scanned = model_config(ModelSource(init=GPT2, scan_layers=True, scan_decode=True))
    assert scanned.scans(cached=True) and init_cache(scanned, 2, 4)["k"].shape == (3, 2, 4, 4, 8)
    with pytest.raises(ConfigError, match="ModelSource.scan_decode must be true or false"):
        ModelSource(init=GPT2, scan_decode="yes")
