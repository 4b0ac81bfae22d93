"""model.py behaviour: KV-cache decoding, packed segments, the scalar head and bfloat16 compute,
and real pretrained weights (llama2.c's stories260K through llama2c.py).

The full forward pass itself is checked against `transformers` in test_hf.py; here each feature is
checked against that full forward pass run the plain way (no cache, one document per row, float32),
and the pretrained model against the reference generation in its README.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _multidevice import run_on_devices
from conftest import random_params
from rlhf_jax.llama2c import load_llama2c
from rlhf_jax.model import (ModelConfig, Transformer, decode_step, flash_attention, forward, fuse_projections,
                            init_cache, init_params, resize_cache, splash_attention)
from rlhf_jax.tokenizer import Tokenizer

jit_forward = jax.jit(forward, static_argnums=0)
jit_decode = jax.jit(decode_step, static_argnums=0)


def left_padded_batch(vocab: int) -> tuple[jax.Array, jax.Array]:
    """tokens, mask ``[3, 12]`` with 12, 9 and 7 real tokens (one shape for every test, so the
    jitted forward pass compiles once per model)."""
    tokens = np.random.default_rng(0).integers(1, vocab, (3, 12))
    mask = (np.arange(12)[None] >= np.array([[0], [3], [5]])).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(params=["gpt2", "llama"])
def tiny(request, tiny_gpt2_config, tiny_llama_config):
    """(model, params) of a tiny GPT-2 or GQA Llama with random non-trivial params."""
    config = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config}[request.param]
    model = Transformer(config)
    return model, random_params(model, seed=1)


def test_kv_cache_decoding_matches_full_forward(tiny):
    """Prefill a left-padded prompt, then decode one token at a time; every step's logits equal
    the full forward pass over the whole sequence at that position."""
    model, params = tiny
    prompt, total = 7, 12
    tokens, mask = left_padded_batch(model.config.vocab_size)  # prompts of 7, 4 and 2 real tokens
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(jit_forward(model, params, tokens, mask).logits)

    cache = init_cache(model.config, 3, total)
    out = jit_decode(model, params, tokens[:, :prompt], positions[:, :prompt], mask[:, :prompt],
                     cache, jnp.int32(0))
    real = np.asarray(mask[:, :prompt], bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], full[:, :prompt][real], atol=1e-5, rtol=0)
    for i in range(prompt, total):
        out = jit_decode(model, params, tokens[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1],
                         out.cache, jnp.int32(i))
        np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, i], atol=1e-5, rtol=0)


def test_per_layer_and_stacked_caches_decode_bitwise_alike(tiny):
    """The unrolled model's own cache form (one array per layer, ``init_cache``) and the stacked
    ``[L, ...]`` form (read through a per-layer slice) give the same logits and cache bits, and a
    scanned model takes the per-layer form too (stacking it)."""
    model, params = tiny
    tokens, mask = left_padded_batch(model.config.vocab_size)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    per_layer = init_cache(model.config, 3, 12)
    assert isinstance(per_layer["k"], tuple) and len(per_layer["k"]) == model.config.n_layers
    stacked = {name: jnp.stack(x) if isinstance(x, tuple) else x for name, x in per_layer.items()}
    scanned = Transformer(model.config.replace(scan_layers=True, scan_decode=True))
    runs = []
    for m, cache in ((model, per_layer), (model, stacked), (scanned, per_layer)):
        out = jit_decode(m, params, tokens[:, :9], positions[:, :9], mask[:, :9], cache, jnp.int32(0))
        logits = [out.logits]
        for i in range(9, 12):
            out = jit_decode(m, params, tokens[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1], out.cache,
                             jnp.int32(i))
            logits.append(out.logits)
        cache = {name: np.stack(x) if isinstance(x, tuple) else np.asarray(x) for name, x in out.cache.items()}
        runs.append((np.concatenate(logits, axis=1), cache))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    jax.tree.map(np.testing.assert_array_equal, runs[0][1], runs[1][1])
    np.testing.assert_allclose(runs[2][0], runs[0][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3-like"])
def test_fused_projections_decode_bitwise_as_the_separate_ones(family, tiny_gpt2_config, tiny_llama_config):
    """``fuse_projections``' one ``qkv`` (and ``gate_up``) matmul per layer gives the logits and
    cache bits of the separate q/k/v (gate/up) matmuls: prefill, then three decode steps (GPT-2
    with biases; GQA Llama; the Llama with q/k/v biases and q/k norms, as Qwen2/3)."""
    config = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config,
              "qwen3-like": tiny_llama_config.replace(qkv_bias=True, qk_norm=True)}[family]
    model = Transformer(config)
    params = random_params(model, seed=2)
    fused = fuse_projections(params, model.config)
    attn = fused["layer_0"]["attn"]
    assert "qkv" in attn and not {"q", "k", "v"} & set(attn)
    c = model.config
    assert attn["qkv"]["kernel"].shape == (c.d_model, c.kv_heads, (c.n_heads // c.kv_heads + 2) * c.head_dim)
    assert ("gate_up" in fused["layer_0"]["mlp"]) == (c.arch == "llama")
    assert fuse_projections(fused, c) == fused  # already fused: unchanged
    tokens, mask = left_padded_batch(c.vocab_size)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    runs = []
    for p in (params, fused):
        out = jit_decode(model, p, tokens[:, :9], positions[:, :9], mask[:, :9], init_cache(c, 3, 12), jnp.int32(0))
        logits = [out.logits]
        for i in range(9, 12):
            out = jit_decode(model, p, tokens[:, i:i + 1], positions[:, i:i + 1], mask[:, i:i + 1], out.cache,
                             jnp.int32(i))
            logits.append(out.logits)
        runs.append((np.concatenate(logits, axis=1), out.cache))
    np.testing.assert_array_equal(runs[1][0], runs[0][0])
    jax.tree.map(np.testing.assert_array_equal, runs[1][1], runs[0][1])


def test_resize_cache_cuts_and_pads_both_layouts(tiny_gpt2_config):
    """``resize_cache`` keeps the first slots and pads with empty ones (zeros, segment 0), in the
    per-layer and the stacked layout."""
    rng = np.random.default_rng(0)
    per_layer = {name: tuple(jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in xs)
                 for name, xs in init_cache(tiny_gpt2_config, 2, 6).items() if name != "seg"}
    per_layer["seg"] = jnp.asarray([[1, 1, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]], jnp.int32)
    stacked = {**per_layer, "k": jnp.stack(per_layer["k"]), "v": jnp.stack(per_layer["v"])}
    for cache in (per_layer, stacked):  # slots: axis 3 of [L, b, kv_heads, slots, d]
        cut, grown = resize_cache(cache, 4), resize_cache(cache, 9)
        for name in ("k", "v", "seg"):
            full = np.stack(cache[name]) if isinstance(cache[name], tuple) else np.asarray(cache[name])
            small = np.stack(cut[name]) if isinstance(cut[name], tuple) else np.asarray(cut[name])
            big = np.stack(grown[name]) if isinstance(grown[name], tuple) else np.asarray(grown[name])
            axis = 1 if name == "seg" else 3
            np.testing.assert_array_equal(small, np.take(full, range(4), axis=axis))
            np.testing.assert_array_equal(np.take(big, range(6), axis=axis), full)
            assert big.shape[axis] == 9 and not np.take(big, range(6, 9), axis=axis).any()
        assert resize_cache(cache, 6) is not cache and resize_cache(cache, 6)["seg"] is cache["seg"]


def test_packed_documents_match_separate_rows(tiny):
    """Two documents packed in one row (segment ids 1, 2, positions restarting at 0) give each
    document's logits from a row of its own."""
    model, params = tiny
    rng = np.random.default_rng(1)
    a, b = rng.integers(1, model.config.vocab_size, 5), rng.integers(1, model.config.vocab_size, 6)
    length = 12
    pad = lambda x: np.pad(x, (0, length - len(x)))  # noqa: E731
    separate = jit_forward(model, params, jnp.asarray(np.stack([pad(a), pad(b)])),
                           jnp.asarray(np.stack([pad(np.ones(5, int)), pad(np.ones(6, int))])))
    sep_a, sep_b = np.asarray(separate.logits[0, :5]), np.asarray(separate.logits[1, :6])

    rows = np.stack([pad(np.concatenate([a, b])), pad(np.concatenate([b, a]))])
    seg = np.stack([pad(np.r_[np.ones(5, int), np.full(6, 2)]), pad(np.r_[np.ones(6, int), np.full(5, 2)])])
    pos = np.stack([pad(np.r_[np.arange(5), np.arange(6)]), pad(np.r_[np.arange(6), np.arange(5)])])
    packed = np.asarray(jit_forward(model, params, jnp.asarray(rows), jnp.asarray(seg > 0),
                                    positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)).logits)
    for got, want in ((packed[0, :5], sep_a), (packed[0, 5:11], sep_b),
                      (packed[1, :6], sep_b), (packed[1, 6:11], sep_a)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_scalar_head_shares_the_backbone(tiny):
    model, params = tiny
    scalar = Transformer(model.config.replace(head="scalar"))
    head = random_params(scalar, seed=2)["score_head"]
    scalar_params = {k: v for k, v in params.items() if k != "lm_head"} | {"score_head": head}
    tokens, mask = left_padded_batch(model.config.vocab_size)
    lm_out = jit_forward(model, params, tokens, mask)
    out = jit_forward(scalar, scalar_params, tokens, mask)
    assert out.logits is None and out.values.shape == (3, 12) and out.values.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.hidden), np.asarray(lm_out.hidden))
    expected = np.asarray(lm_out.hidden, np.float64) @ np.asarray(head["kernel"], np.float64)[:, 0]
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(out.values)[real], expected[real] + float(head["bias"][0]),
                               atol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny):
    model, params = tiny
    bf16 = Transformer(model.config.replace(dtype="bfloat16"))
    abstract = jax.eval_shape(lambda key: init_params(bf16, key), jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    tokens, mask = left_padded_batch(model.config.vocab_size)
    real = np.asarray(mask, bool)
    want = np.asarray(jit_forward(model, params, tokens, mask).logits)[real]
    out = jit_forward(bf16, params, tokens, mask)
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.logits)[real] - want).max()
    assert 0 < err < 0.05 * np.abs(want).max()  # bf16 has ~3 significant digits


# ----------------------------------------------------------------------------- llama2.c import

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
REFERENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in "
             "the park. One day, she saw a big, red ball.")


@pytest.fixture(scope="module")
def stories260k():
    if not (STORIES / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not found at {STORIES}")
    model, params = load_llama2c(STORIES / "stories260K.bin")
    return model, params, Tokenizer.from_llama2c(STORIES / "tok512.bin")


def test_llama2c_greedy_reproduces_reference_story(stories260k):
    model, params, tok = stories260k
    assert model.config.tie_embeddings and model.config.kv_heads == 4
    cache = init_cache(model.config, 1, 64)
    ids = [tok.bos_id]
    for i in range(60):
        out = jit_decode(model, params, jnp.array([[ids[-1]]]), jnp.array([[i]]), jnp.ones((1, 1), jnp.int32),
                   cache, jnp.int32(i))
        cache = out.cache
        ids.append(int(out.logits[0, -1].argmax()))
    assert tok.decode(ids).startswith(REFERENCE)  # README: greedy decoding from BOS


def test_llama2c_nll_on_reference_text(stories260k):
    model, params, tok = stories260k
    ids = jnp.array([tok.encode(REFERENCE, add_bos=True)])
    logits = jit_forward(model, params, ids, jnp.ones_like(ids)).logits[0, :-1]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[0, 1:, None], -1).mean()
    assert float(nll) < 0.5  # README: about 0.32 nats/token; uniform would be 6.24


def test_llama2c_bad_size(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(np.array([64, 172, 5, 8, 4, 512, 512], "<i4").tobytes() + b"\0" * 400)
    with pytest.raises(ValueError, match=r"bad\.bin.*428 bytes.*implies"):
        load_llama2c(bad)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "windowed"])
def test_dot_product_attention_with_our_mask_equals_the_einsum_path(arch):
    """``jax.nn.dot_product_attention`` (XLA implementation; cuDNN takes the same arguments on a
    GPU) with our segment-id mask, left padding and packing, equals our einsum attention on every
    column that has a key to attend to; ``windowed``: with a sliding window of 3 in the mask and
    Gemma's ``query_pre_attn_scalar`` as the scale."""
    from rlhf_jax.model import _attention_dpa, _attention_xla

    config = ModelConfig(arch="gpt2" if arch == "gpt2" else "llama", d_model=32, n_heads=4,
                         n_kv_heads=None if arch == "gpt2" else 2,
                         query_pre_attn_scalar=12.0 if arch == "windowed" else None)
    b, t, rng = 3, 7, np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, config.kv_heads, t, 8)), jnp.float32) for _ in range(2))
    seg = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    slots = jnp.arange(t)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (slots[None, None, :] <= slots[None, :, None])
    if arch == "windowed":
        allowed &= slots[None, None, :] > slots[None, :, None] - 3
    ours = _attention_xla(q, k, v, allowed, config)
    theirs = _attention_dpa(q, k, v, allowed, config, "xla")
    live = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(theirs)[live], np.asarray(ours)[live], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(theirs)).all()


def test_flash_attention_where_cudnn_applies():
    """``flash_attention``: ``"cudnn"`` always (but with soft-capping), ``"xla"`` never, ``"auto"``
    on a GPU in a 16-bit dtype with head_dim a multiple of 8 up to 128 (cuDNN's limits)."""
    base = ModelConfig(arch="llama", vocab_size=64, d_model=64, n_layers=1, n_heads=4, max_len=16,
                       dtype="bfloat16", attention_impl="auto")  # head_dim 16
    cases = [
        (base, "gpu", True), (base, "cpu", False), (base, "tpu", False), (base, None, False),  # this CPU
        (base.replace(dtype="float16"), "gpu", True), (base.replace(dtype="float32"), "gpu", False),
        (base.replace(d_head=128), "gpu", True), (base.replace(d_head=256), "gpu", False),
        (base.replace(d_head=12), "gpu", False), (base.replace(attn_softcap=50.0), "gpu", False),
        (base.replace(attention_impl="xla"), "gpu", False),
        (base.replace(attention_impl="cudnn", dtype="float32"), "cpu", True),
        (base.replace(attention_impl="cudnn", attn_softcap=50.0), "gpu", False),
    ]
    assert [flash_attention(c, backend) for c, backend, _ in cases] == [want for *_, want in cases]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dot_product_attention_by_lengths_equals_the_einsum_path(arch):
    """Right-padded rows (one sequence from column 0, padding after; one row unpadded, one
    empty): the lengths form of ``_attention_dpa`` (``query_seq_lengths``/``key_value_seq_lengths``,
    no mask, as the cuDNN path runs it) equals our einsum attention under the segment mask on
    every sequence column, and stays finite on the padding columns and the empty row."""
    from rlhf_jax.model import _attention_dpa, _attention_xla

    config = ModelConfig(arch=arch, d_model=32, n_heads=4, n_kv_heads=None if arch == "gpt2" else 2)
    b, t, rng = 4, 7, np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(b, t, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, config.kv_heads, t, 8)), jnp.float32) for _ in range(2))
    lengths = np.array([7, 4, 1, 0])
    seg = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.int32)
    slots = jnp.arange(t)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (slots[None, None, :] <= slots[None, :, None])
    ours = _attention_xla(q, k, v, allowed, config)
    # ``allowed`` all True: the lengths form must not read it
    theirs = _attention_dpa(q, k, v, jnp.ones_like(allowed), config, "xla", jnp.asarray(lengths))
    live = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(theirs)[live], np.asarray(ours)[live], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(theirs)).all()


@pytest.mark.parametrize("loss, scan", [("sft", False), ("sft", True), ("rm", False), ("dpo", False)])
def test_cudnn_path_masks_right_padded_rows_by_lengths(monkeypatch, loss, scan):
    """The wiring of ``forward``'s ``right_padded`` down to the attention, for the SFT loss, the
    reward model's K-way loss and the DPO loss, whose rows are right padded (the RM and DPO
    batches with an empty response row).  With ``attention_impl="cudnn"`` (its calls redirected
    to the XLA implementation, which takes the same arguments, since this runs on a CPU) they pass
    sequence lengths and no mask, and packed SFT rows pass a mask; each gives the loss and the
    gradient of the einsum path (``attention_impl="xla"``)."""
    from rlhf_jax.dpo import dpo_batch_loss
    from rlhf_jax.stages.reward import rm_batch_loss
    from rlhf_jax.stages.sft import sft_batch_loss

    calls = []
    real = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kwargs):
        calls.append(sorted(k for k, v in kwargs.items() if v is not None))
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)
    config = ModelConfig(arch="llama", vocab_size=61, d_model=32, n_heads=4, n_kv_heads=2, n_layers=2,
                         d_ff=48, max_len=16, scan_layers=scan, head="scalar" if loss == "rm" else "lm")
    params = init_params(Transformer(config), jax.random.PRNGKey(0))
    ref_params = init_params(Transformer(config), jax.random.PRNGKey(1))
    rng = np.random.default_rng(2)
    lengths = np.array([9, 5, 12, 0] if loss != "sft" else [9, 5, 12])
    mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask, rng.integers(1, 61, size=mask.shape), 0).astype(np.int32)
    if loss == "sft":
        batches = {"lengths": {"tokens": tokens, "mask": mask, "loss_mask": mask}}
        batches["mask"] = {**batches["lengths"], "segment_ids": mask,
                           "positions": np.maximum(np.cumsum(mask, 1) - 1, 0)}
        fn = sft_batch_loss
    else:  # two prompts of K = 2, the second one's second response missing
        k_way = {"tokens": tokens.reshape(2, 2, 12), "mask": mask.reshape(2, 2, 12),
                 "loss_mask": (mask * (np.arange(12) >= 3)).reshape(2, 2, 12), "valid": (lengths > 0).reshape(2, 2)}
        batches = {"lengths": k_way}
        fn = (lambda m, p, b: rm_batch_loss(m, p, b)[0]) if loss == "rm" else \
            (lambda m, p, b: dpo_batch_loss(m, p, ref_params, b, beta=0.3)[0])

    def loss_and_grad(impl, batch):
        model = Transformer(config.replace(attention_impl=impl))
        return jax.value_and_grad(lambda p: fn(model, p, jax.tree_util.tree_map(jnp.asarray, batch)))(params)

    ref_loss, ref_grad = loss_and_grad("xla", batches["lengths"])
    assert not calls and np.isfinite(float(ref_loss))
    forms = {"lengths": ["is_causal", "key_value_seq_lengths", "query_seq_lengths", "scale"],
             "mask": ["is_causal", "mask", "scale"]}
    passes = 2 if loss == "dpo" else 1  # DPO: the policy's and the reference's forwards
    for form, batch in batches.items():
        calls.clear()
        got_loss, grad = loss_and_grad("cudnn", batch)
        assert len(calls) == passes * (1 if scan else config.n_layers) and all(c == forms[form] for c in calls), calls
        np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
        for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
            assert np.isfinite(np.asarray(g)).all()
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="right_padded=True is for rows of one sequence"):
        forward(Transformer(config), params, tokens, mask, segment_ids=mask, right_padded=True)


# ---------------------------------------------------------------------- splash attention (TPU)

SPLASH_BASE = ModelConfig(arch="llama", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                          max_len=256)


def splash_batch(b: int = 3, t: int = 128) -> tuple[jax.Array, jax.Array, jax.Array]:
    """tokens, mask, segment ids ``[b, t]``: row 1 left padded by 40 columns, row 2 packed (a
    second document from column 60), the rest one document each."""
    tokens = np.random.default_rng(0).integers(1, 64, (b, t))
    mask = np.ones((b, t), np.int32)
    mask[1, :40] = 0
    seg = mask.copy()
    seg[2, 60:] = 2
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(seg)


def test_splash_attention_where_it_applies():
    """``splash_attention``: only ``attention_impl="splash"``, only for column counts the
    kernel's 128-wide tile divides, never with sliding windows; ``"auto"`` does not pick it."""
    splash = SPLASH_BASE.replace(attention_impl="splash")
    cases = [(splash, 128, True), (splash, 2048, True), (splash, 96, False), (splash, 200, False),
             (splash.replace(sliding_window=16), 128, False), (splash.replace(attn_softcap=20.0), 256, True),
             (SPLASH_BASE, 128, False), (SPLASH_BASE.replace(attention_impl="auto"), 128, False)]
    assert [splash_attention(c, t) for c, t, _ in cases] == [want for *_, want in cases]


@pytest.mark.parametrize("scan, softcap, remat", [(False, None, "none"), (True, 20.0, "dots"), (False, None, "full")])
def test_splash_attention_equals_the_einsum_path(scan, softcap, remat):
    """The splash kernel (Pallas interpret mode on this CPU) with grouped-query heads, a
    left-padded row and a packed row gives the logits of our einsum attention on every real
    column, and the same gradients of a loss over them; with soft-capping and under either remat
    policy too.  At 96 columns (not a multiple of the kernel's tile) the splash config runs the
    einsum path itself."""
    config = SPLASH_BASE.replace(scan_layers=scan, attn_softcap=softcap, remat_policy=remat)
    xla, splash = Transformer(config), Transformer(config.replace(attention_impl="splash"))
    params = random_params(xla, seed=1)
    tokens, mask, seg = splash_batch()
    real = np.asarray(seg) != 0

    def loss(p, model):
        logits = forward(model, p, tokens, mask, segment_ids=seg).logits
        return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., :3])

    ref = np.asarray(forward(xla, params, tokens, mask, segment_ids=seg).logits)
    got = np.asarray(forward(splash, params, tokens, mask, segment_ids=seg).logits)
    np.testing.assert_allclose(got[real], ref[real], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()
    ref_grad, grad = jax.grad(loss)(params, xla), jax.grad(loss)(params, splash)
    for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(np.abs(r).max()))
    short = [a[:, :96] for a in (tokens, mask, seg)]
    np.testing.assert_array_equal(forward(splash, params, short[0], short[1], segment_ids=short[2]).logits,
                                  forward(xla, params, short[0], short[1], segment_ids=short[2]).logits)


def test_splash_attention_runs_per_device_under_a_mesh():
    """On 4 devices (``data`` 2 × ``tensor`` 2, set with ``jax.set_mesh``) the splash path runs
    in a ``shard_map`` (rows over the batch axes, K/V heads over ``tensor``) and gives the loss
    and gradients of the einsum path on one device."""
    out = run_on_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from rlhf_jax.model import ModelConfig, Transformer, forward, init_params
        from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params

        config = ModelConfig(**{CONFIG})
        xla, splash = Transformer(config), Transformer(config.replace(attention_impl="splash"))
        params = init_params(xla, jax.random.key(0))
        tokens, mask, seg = (jnp.asarray(a) for a in {BATCH})

        def loss(p, model, tokens, mask, seg):
            logits = forward(model, p, tokens, mask, segment_ids=seg).logits
            return jnp.sum(jnp.where(seg[..., None] != 0, jax.nn.log_softmax(logits), 0.0)[..., 0])

        ref_loss, ref_grad = jax.value_and_grad(loss)(params, xla, tokens, mask, seg)
        mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))
        with jax.set_mesh(mesh):
            batch = shard_batch({"tokens": tokens, "mask": mask, "seg": seg}, mesh)
            args = (shard_params(params, mesh), splash, batch["tokens"], batch["mask"], batch["seg"])
            step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
            assert "manual_computation" in step.lower(*args).as_text()
            got_loss, grad = step(*args)
        np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
        for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(np.abs(r).max()))
        print("splash sharded ok")
    """.replace("{CONFIG}", repr(dataclasses.asdict(SPLASH_BASE.replace(scan_layers=True))))
       .replace("{BATCH}", repr(tuple(np.asarray(a).tolist() for a in splash_batch(b=4)))), n=4)
    assert "splash sharded ok" in out


@pytest.mark.parametrize("loss", ["sft", "rm"])
def test_splash_attention_in_the_sft_and_reward_losses(loss):
    """The SFT loss and the reward model's K-way loss over right-padded rows of 128 columns (the
    RM batch with an empty response row, all padding) give the loss and gradients of the einsum
    path with ``attention_impl="splash"``, and stay finite."""
    from rlhf_jax.stages.reward import rm_batch_loss
    from rlhf_jax.stages.sft import sft_batch_loss

    config = SPLASH_BASE.replace(head="scalar" if loss == "rm" else "lm")
    params = random_params(Transformer(config), seed=2)
    lengths = np.array([128, 70, 5, 0])
    mask = (np.arange(128)[None, :] < lengths[:, None]).astype(np.int32)
    tokens = np.where(mask, np.random.default_rng(3).integers(1, 64, size=mask.shape), 0).astype(np.int32)
    if loss == "sft":
        batch, fn = {"tokens": tokens[:3], "mask": mask[:3], "loss_mask": mask[:3]}, sft_batch_loss
    else:  # two prompts of K = 2, the second one's second response missing
        batch = {"tokens": tokens.reshape(2, 2, 128), "mask": mask.reshape(2, 2, 128),
                 "loss_mask": (mask * (np.arange(128) >= 3)).reshape(2, 2, 128), "valid": (lengths > 0).reshape(2, 2)}
        fn = lambda m, p, b: rm_batch_loss(m, p, b)[0]  # noqa: E731

    def loss_and_grad(impl):
        model = Transformer(config.replace(attention_impl=impl))
        return jax.value_and_grad(lambda p: fn(model, p, jax.tree_util.tree_map(jnp.asarray, batch)))(params)

    (ref_loss, ref_grad), (got_loss, grad) = loss_and_grad("xla"), loss_and_grad("splash")
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * float(np.abs(r).max()))
