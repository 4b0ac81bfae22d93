"""Generation, scoring and per-token log-probs against `transformers` and no-cache references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _multidevice import run_on_devices
from rlhf_jax.generation import (
    GenerateConfig,
    Rollout,
    cache_lengths,
    generate,
    generate_traced,
    score,
    score_rollout,
    sequence_logprobs,
    sequence_values,
)
from rlhf_jax.generation import _generate_jit
from rlhf_jax.model import Transformer, forward, init_params
from rlhf_jax.sampling import sample_token

PAD = 0
_forward = jax.jit(forward, static_argnums=0)


def unpadded_forward(model, params, seqs):
    """Each token list run on its own from position 0: right-padded into one batch, where causal
    attention keeps the padding invisible to the real tokens.  Returns (Output, lengths)."""
    lengths = np.array([len(s) for s in seqs])
    tokens = np.zeros((len(seqs), lengths.max()), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    mask = (np.arange(lengths.max())[None] < lengths[:, None]).astype(np.int32)
    return _forward(model, params, tokens, mask), lengths


def left_padded(lengths, width, vocab, seed=0):
    """Random prompts ``[b, width]`` left-padded with PAD, ids in ``[3, vocab)``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(lengths), width))
    mask = (np.arange(width)[None] >= width - np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD).astype(np.int32), mask


def random_params(model, seed):
    """Random parameters in NumPy (much faster than compiling ``init_params`` on a small CPU):
    weights ~ N(0, 0.1²), norm scales ~ 1 + N(0, 0.1²)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape, np.float32), shapes)


@pytest.fixture(scope="module")
def lm(tiny_gpt2_config):
    model = Transformer(tiny_gpt2_config)
    return model, random_params(model, 0)


@pytest.fixture(scope="module")
def rm(tiny_llama_config):
    model = Transformer(tiny_llama_config.replace(head="scalar"))
    return model, random_params(model, 1)


def reference_generate(model, params, ids, mask, key, config):
    """No-cache decoding without EOS: a full forward pass over ``[prompt | response so far]`` per
    step, sampling with the same per-step keys as ``generate`` (``fold_in(key, i)``)."""
    b, p = ids.shape
    n = config.max_new_tokens
    tokens = np.concatenate([ids, np.full((b, n), PAD, np.int32)], axis=1)
    full_mask = np.concatenate([mask, np.zeros((b, n), np.int32)], axis=1)
    for i in range(n):
        logits = _forward(model, params, tokens, full_mask).logits[:, p - 1 + i]
        tokens[:, p + i] = sample_token(jax.random.fold_in(key, i), logits, temperature=config.temperature,
                                        top_k=config.top_k, top_p=config.top_p, greedy=config.greedy)
        full_mask[:, p + i] = 1
    return tokens[:, p:]


def stop_at_eos(response, eos, pad):
    """Python loop: keep each row up to and including its first stop token (``eos``: one id or a
    set of them), pad after.  Returns (response, response_mask, ended)."""
    stops = {eos} if isinstance(eos, (int, np.integer)) else set(eos)
    response, mask = response.copy(), np.zeros(response.shape, np.int32)
    ended = np.zeros(len(response), bool)
    for row in range(len(response)):
        for t in range(response.shape[1]):
            if ended[row]:
                response[row, t] = pad
            else:
                mask[row, t] = 1
                ended[row] = response[row, t] in stops
    return response, mask, ended


def hf_greedy(hf_model, ids, mask, n, eos, pad):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long),
                                max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    return out.numpy()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_matches_transformers_with_left_padding_and_eos(name, hf_tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    from rlhf_jax.hf import load_pretrained

    path = hf_tiny_model_dir(name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    hf_model.generation_config.eos_token_id = None  # stop only where told to
    model, params = load_pretrained(path)
    n, pad = 12, PAD
    ids, mask = left_padded([7, 2, 5, 1], 7, model.config.vocab_size, seed=3)

    free = hf_greedy(hf_model, ids, mask, n, eos=None, pad=pad)  # no stopping: N tokens per row
    eos = int(free[0, 7 + 3])  # a token row 0 emits mid-way; declared EOS
    hf = hf_greedy(hf_model, ids, mask, n, eos=eos, pad=pad)
    ours = generate(model, params, ids, mask, jax.random.key(0), GenerateConfig(n, greedy=True, eos_id=eos, pad_id=pad))
    width = hf.shape[1]
    np.testing.assert_array_equal(ours.tokens[:, :width], hf)
    assert (np.asarray(ours.tokens[:, width:]) == pad).all()
    assert (hf[0, 7 + 4:] == pad).all()  # HF pads after the EOS too
    response, response_mask, ended = stop_at_eos(free[:, 7:], eos, pad)
    np.testing.assert_array_equal(ours.response, response)  # rows that never emit the EOS run to N
    np.testing.assert_array_equal(ours.response_mask, response_mask)
    np.testing.assert_array_equal(ours.ended, ended)


@pytest.mark.parametrize("config", [
    GenerateConfig(10, temperature=1.0),
    GenerateConfig(10, temperature=0.7, top_k=8, top_p=0.8),
])
def test_sampled_rollout_matches_no_cache_reference_and_sequence_logprobs(lm, config):
    model, params = lm
    ids, mask = left_padded([6, 1, 3, 4, 6, 2], 6, model.config.vocab_size, seed=1)
    key = jax.random.key(7)
    free = reference_generate(model, params, ids, mask, key, config)
    # EOS: a token row 0 samples mid-way (live rows draw the same tokens with or without an EOS)
    config = dataclasses.replace(config, eos_id=int(free[0, 4]))
    response, response_mask, ended = stop_at_eos(free, config.eos_id, config.pad_id)
    r = generate(model, params, ids, mask, key, config)
    np.testing.assert_array_equal(r.response, response)
    np.testing.assert_array_equal(r.response_mask, response_mask)
    np.testing.assert_array_equal(r.ended, ended)
    np.testing.assert_array_equal(r.tokens, np.concatenate([ids, response], 1))
    np.testing.assert_array_equal(r.prompt_mask, mask)

    # log-probs: numpy log-softmax(logits / T) of a padded forward pass, itself checked against
    # each row's real tokens run alone
    logits = np.asarray(_forward(model, params, r.tokens, r.mask).logits, np.float64)
    real = np.asarray(r.mask) == 1
    alone, lengths = unpadded_forward(model, params, [np.asarray(r.tokens)[row][real[row]] for row in range(len(ids))])
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(alone.logits[row, :length], logits[row][real[row]], atol=1e-4)
    z = logits / config.temperature
    logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    expected = np.take_along_axis(logp[:, 5:-1], np.asarray(r.tokens)[:, 6:, None], axis=-1)[..., 0]
    expected = np.where(response_mask == 1, expected, 0.0)
    np.testing.assert_allclose(r.logprobs, expected, atol=1e-5)
    assert (np.asarray(r.logprobs)[response_mask == 0] == 0).all()

    recomputed, entropy = sequence_logprobs(model, params, r.tokens, r.mask, r.response_start,
                                            temperature=config.logprob_temperature)
    np.testing.assert_allclose(recomputed, r.logprobs, atol=1e-5)
    expected_entropy = np.where(response_mask == 1, -(np.exp(logp) * logp).sum(-1)[:, 5:-1], 0.0)
    np.testing.assert_allclose(entropy, expected_entropy, atol=1e-4)
    assert ended[0] and (response_mask == 0).any()


def test_several_stop_ids_match_loop_reference(lm):
    """Rows stop at whichever of several stop ids comes first (Llama 3's ``<|eot_id|>`` and
    ``<|end_of_text|>``, Gemma's ``<end_of_turn>``), against the no-cache reference and a Python
    loop; ``eos_id`` joins ``stop_ids``."""
    model, params = lm
    ids, mask = left_padded([6, 1, 3, 4, 6, 2], 6, model.config.vocab_size, seed=4)
    key = jax.random.key(5)
    base = GenerateConfig(10, temperature=1.0)
    free = reference_generate(model, params, ids, mask, key, base)
    # two ids that rows 0 and 2 sample mid-way
    stops = {int(free[0, 3]), int(free[2, 5])}
    assert len(stops) == 2 and PAD not in stops
    for config in (dataclasses.replace(base, stop_ids=sorted(stops)),
                   dataclasses.replace(base, eos_id=min(stops), stop_ids=[max(stops), max(stops)])):
        assert config.stops == tuple(sorted(stops))
        response, response_mask, ended = stop_at_eos(free, stops, config.pad_id)
        r = generate(model, params, ids, mask, key, config)
        np.testing.assert_array_equal(r.response, response)
        np.testing.assert_array_equal(r.response_mask, response_mask)
        np.testing.assert_array_equal(r.ended, ended)
        assert ended[0] and ended[2] and not ended.all()  # some rows run to N
    assert GenerateConfig(4, stop_ids={9, 3}).stop_ids == (3, 9)
    assert GenerateConfig(4, eos_id=2).stops == (2,) and GenerateConfig(4).stops == ()
    for kw, match in [(dict(stop_ids=[3, -1]), "stop_ids"), (dict(stop_ids="ab"), "stop_ids"),
                      (dict(stop_ids=[1.5]), "stop_ids"), (dict(stop_ids=[0]), "pad_id must be none of stop_ids")]:
        with pytest.raises(ValueError, match=match):
            GenerateConfig(4, **kw)


def test_cache_lengths():
    """The decode loops' cache lengths: multiples of the block from the first that holds the
    prompt, then ``prompt + new``; one length without blocks or when one block holds all."""
    assert cache_lengths(32, 64, 16) == (32, 48, 64, 80, 96)
    assert cache_lengths(6, 10, 4) == (8, 12, 16)
    assert cache_lengths(6, 10, 3) == (6, 9, 12, 15, 16)
    assert cache_lengths(5, 10, 0) == (15,) and cache_lengths(3, 1, 16) == (4,)


@pytest.mark.parametrize("block, scanned", [(8, False), (4, True), (3, False)])
def test_cache_blocks_decode_the_same_rollout(lm, block, scanned):
    """``ModelConfig.cache_block`` (the cache grown block by block, one decode loop per block)
    gives the rollout of one ``prompt + new`` cache up to float rounding (the softmax sums run
    over fewer empty slots): the same tokens, masks and stops, log-probs within 1e-5; sampled
    without stops, and with stops that end every row in an early block (the later loops run no
    step); unrolled and with the stacked cache of a scanned decode."""
    model, params = lm
    ids, mask = left_padded([6, 1, 3, 4, 6, 2], 6, model.config.vocab_size, seed=4)
    key = jax.random.key(5)
    base = GenerateConfig(10, temperature=1.0)
    free = generate(model, params, ids, mask, key, base)
    early = dataclasses.replace(base, stop_ids=sorted({int(t) for t in np.asarray(free.response[:, 2])} - {PAD}))
    config = model.config.replace(scan_layers=scanned, scan_decode=scanned)
    one_cache, blocked = Transformer(config), Transformer(config.replace(cache_block=block))
    for gen in (base, early):
        want = generate(one_cache, params, ids, mask, key, gen)
        got = generate(blocked, params, ids, mask, key, gen)
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
        jax.tree.map(np.testing.assert_array_equal, got.replace(logprobs=want.logprobs), want)
    assert np.asarray(want.ended).all() and np.asarray(want.response_mask).sum(axis=1).max() <= 3
    loops = [str(jax.make_jaxpr(lambda p, m=m: generate_traced(m, p, ids, mask, key, base))(params)).count("while[")
             for m in (one_cache, blocked)]
    assert loops == [1, len(cache_lengths(6, 10, block))] and loops[1] >= 2


def test_stage_configs_expose_cache_block(tiny_gpt2_config):
    """``model.cache_block`` in a stage config reaches ``ModelConfig`` (default 0); a bad value is
    an error naming the field."""
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.stages.sources import ModelSource, model_config

    assert model_config(ModelSource(init=tiny_gpt2_config)).cache_block == 0
    assert model_config(ModelSource(init=tiny_gpt2_config, cache_block=16)).cache_block == 16
    for bad in (-1, True, 2.5):
        with pytest.raises(ConfigError, match="ModelSource.cache_block must be an int >= 0"):
            ModelSource(init=tiny_gpt2_config, cache_block=bad)
        with pytest.raises(ValueError, match="cache_block"):
            tiny_gpt2_config.replace(cache_block=bad)


def test_compiled_once_usable_inside_jit_and_greedy_logprobs_at_temperature_one(lm):
    model, params = lm
    ids, mask = left_padded([3, 5], 5, model.config.vocab_size)
    config = GenerateConfig(6, temperature=0.0)
    assert config.is_greedy and config.logprob_temperature == 1.0
    first = generate(model, params, ids, mask, jax.random.key(1), config)
    lp, _ = sequence_logprobs(model, params, first.tokens, first.mask, 5, temperature=1.0)
    np.testing.assert_allclose(first.logprobs, lp, atol=1e-5)

    size = _generate_jit._cache_size()
    other_params = jax.tree.map(lambda x: x * 1.01, params)
    generate(model, other_params, ids + 1, mask, jax.random.key(2), config)
    assert _generate_jit._cache_size() == size

    @jax.jit
    def outer(params, key):
        r = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key, config)
        return r.tokens, r.logprobs.sum()

    tokens, total = outer(params, jax.random.key(1))
    np.testing.assert_array_equal(tokens, first.tokens)
    np.testing.assert_allclose(total, first.logprobs.sum(), rtol=1e-5)


def test_sharded_generation_equals_single_device():
    out = run_on_devices("""
        import jax, numpy as np
        from rlhf_jax.generation import GenerateConfig, generate
        from jax.sharding import PartitionSpec as P
        from rlhf_jax.model import ModelConfig, Transformer, fuse_projections, init_params
        from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params

        assert jax.device_count() == 8
        model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_len=32))
        params = init_params(model, jax.random.key(0))
        fused = fuse_projections(params, model.config)  # placed once by the caller, not fused again
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, 7, size=16)
        mask = (np.arange(6)[None] >= 6 - lengths[:, None]).astype(np.int32)
        ids = np.where(mask == 1, rng.integers(3, 64, size=(16, 6)), 0).astype(np.int32)
        config = GenerateConfig(8, temperature=1.0, top_k=20, eos_id=7)
        key = jax.random.key(3)
        single = generate(model, jax.device_put(params, jax.devices()[0]), ids, mask, key, config)
        assert single.ended.any()
        for mesh_config in (MeshConfig(data=8, fsdp=1), MeshConfig(data=2, fsdp=2, tensor=2)):
            mesh = make_mesh(mesh_config)
            batch = shard_batch({"ids": ids, "mask": mask}, mesh)
            placed = shard_params(fused, mesh)
            qkv = placed["layer_0"]["attn"]["qkv"]
            assert qkv["kernel"].sharding.spec == P("fsdp", "tensor") and qkv["bias"].sharding.spec == P("tensor")
            for p in (shard_params(params, mesh), placed):
                r = generate(model, p, batch["ids"], batch["mask"], key, config)
                assert len(r.tokens.sharding.device_set) == 8
                assert not r.tokens.sharding.is_fully_replicated
                np.testing.assert_array_equal(r.tokens, single.tokens)
                np.testing.assert_array_equal(r.response_mask, single.response_mask)
                np.testing.assert_allclose(r.logprobs, single.logprobs, atol=1e-5)
        print("sharded ok")
    """)
    assert "sharded ok" in out


def test_score_reads_last_real_token(rm):
    model, params = rm
    ids, mask = left_padded([3, 5, 2], 5, model.config.vocab_size, seed=2)
    response = np.array([[9, 2, PAD, PAD], [4, 4, 4, 4], [7, PAD, PAD, PAD]], np.int32)
    response_mask = (response != PAD).astype(np.int32)
    tokens, full_mask = np.concatenate([ids, response], 1), np.concatenate([mask, response_mask], 1)

    def ref_values(upto):  # each row's real tokens up to column upto[row] run alone; value at the end
        seqs = [[tokens[row, t] for t in range(i + 1) if full_mask[row, t] or t == i] for row, i in enumerate(upto)]
        out, lengths = unpadded_forward(model, params, seqs)
        return np.asarray(out.values)[np.arange(len(seqs)), lengths - 1]

    expected = ref_values([6, 8, 5])
    np.testing.assert_allclose(score(model, params, tokens, full_mask), expected, atol=1e-5)
    np.testing.assert_allclose(score(model, params, tokens, full_mask, gain=2.0, bias=-0.5),
                               2 * expected - 0.5, atol=1e-5)
    after = np.array([7, 8, 6])  # TRL-style: one after the EOS (row 1 has no room: stays at its end)
    expected_after = ref_values(after)
    np.testing.assert_allclose(score(model, params, tokens, full_mask, index=jnp.asarray(after)),
                               expected_after, atol=1e-5)
    assert not np.allclose(expected_after[[0, 2]], expected[[0, 2]])


def test_score_mean_pooling_averages_every_real_tokens_value(rm):
    """``score_pooling="mean"``: the mean over the real tokens up to ``index`` (and the token at
    ``index``) of the value each token has when its own prefix (pads dropped) runs alone, one
    forward pass per prefix."""
    model, params = rm
    averaged = Transformer(model.config.replace(score_pooling="mean"))
    ids, mask = left_padded([3, 5, 2], 5, model.config.vocab_size, seed=4)
    response = np.array([[9, 2, PAD, PAD], [4, 4, 4, 4], [7, PAD, PAD, PAD]], np.int32)
    tokens = np.concatenate([ids, response], 1)
    full_mask = np.concatenate([mask, (response != PAD).astype(np.int32)], 1)

    def ref_means(upto):
        means = []
        for row, i in enumerate(upto):
            real = [t for t in range(i + 1) if full_mask[row, t] or t == i]
            prefixes = [[tokens[row, t] for t in real[: j + 1]] for j in range(len(real))]
            out, lengths = unpadded_forward(model, params, prefixes)
            means.append(float(np.mean(np.asarray(out.values)[np.arange(len(prefixes)), lengths - 1])))
        return np.array(means)

    expected = ref_means([6, 8, 5])
    np.testing.assert_allclose(score(averaged, params, tokens, full_mask), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(score(averaged, params, tokens, full_mask, gain=2.0, bias=-0.5),
                               2 * expected - 0.5, rtol=1e-5, atol=1e-5)
    # An index before the last real token stops the mean there; one after the EOS adds that token.
    for index in ([4, 8, 3], [7, 8, 6]):
        np.testing.assert_allclose(score(averaged, params, tokens, full_mask, index=jnp.asarray(index)),
                                   ref_means(index), rtol=1e-5, atol=1e-5)
    assert not np.allclose(score(model, params, tokens, full_mask), expected)


def test_score_rollout_and_sequence_values(rm):
    model, params = rm
    ids, mask = left_padded([2, 4, 1], 4, 128, seed=5)
    response = np.array([[5, 6, 2, PAD, PAD], [7, 8, 9, 10, 11], [2, PAD, PAD, PAD, PAD]], np.int32)
    response_mask = (response != PAD).astype(np.int32)
    zeros = np.zeros(response.shape, np.float32)
    r = Rollout(tokens=np.concatenate([ids, response], 1), prompt_mask=mask, response=response,
                response_mask=response_mask, logprobs=zeros, ended=response_mask[:, -1] == 0)
    tokens, full_mask = np.asarray(r.tokens), np.asarray(r.mask)
    np.testing.assert_array_equal(full_mask, np.concatenate([mask, response_mask], 1))
    assert r.response_start == 4
    np.testing.assert_allclose(score_rollout(model, params, r, bias=1.0),
                               score(model, params, tokens, full_mask) + 1.0, atol=1e-6)

    values = sequence_values(model, params, tokens, full_mask, 4)
    live = [(row, t) for row in range(3) for t in range(5) if response_mask[row, t]]
    # the value of response token t: the state after everything before it (columns < 4 + t)
    prefixes = [tokens[row, :4 + t][full_mask[row, :4 + t] == 1] for row, t in live]
    out, lengths = unpadded_forward(model, params, prefixes)
    expected = np.zeros(response.shape, np.float32)
    for (row, t), v in zip(live, np.asarray(out.values)[np.arange(len(live)), lengths - 1]):
        expected[row, t] = v
    np.testing.assert_allclose(values, expected, atol=1e-5)


def test_generate_config_validation():
    for kwargs, field in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, top_p=0.0), "top_p"),
        (dict(max_new_tokens=4, top_p=1.01), "top_p"),
        (dict(max_new_tokens=4, top_k=-2), "top_k"),
        (dict(max_new_tokens=4, eos_id=-1), "eos_id"),
        (dict(max_new_tokens=4, greedy="yes"), "greedy"),
    ]:
        with pytest.raises(ValueError, match=f"GenerateConfig.{field}"):
            GenerateConfig(**kwargs)


def test_bad_inputs_fail_before_compiling(lm, rm):
    model, params = lm  # max_len 64
    size = _generate_jit._cache_size()
    key, config = jax.random.key(0), GenerateConfig(8)
    ids, mask = left_padded([65], 65, 128)
    with pytest.raises(ValueError, match="prompt_len 65 exceeds .*max_len=64"):
        generate(model, params, ids, mask, key, config)
    ids, mask = left_padded([60], 60, 128)
    with pytest.raises(ValueError, match="60 \\+ GenerateConfig.max_new_tokens 8 = 68 exceeds"):
        generate(model, params, ids, mask, key, config)
    ids, mask = left_padded([3, 4], 4, 128)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        generate(model, params, ids, mask[:, :3], key, config)
    with pytest.raises(ValueError, match="prompt_ids must be"):
        generate(model, params, ids[0], mask[0], key, config)
    with pytest.raises(ValueError, match="left-padded.*rows \\[0\\]"):
        generate(model, params, ids, mask[:, ::-1], key, config)
    with pytest.raises(ValueError, match="LM head"):
        generate(rm[0], rm[1], ids, mask, key, config)
    assert _generate_jit._cache_size() == size
    with pytest.raises(ValueError, match="response_start"):
        sequence_logprobs(model, params, ids, mask, 4)
    with pytest.raises(ValueError, match="head='scalar'"):
        score(model, params, ids, mask)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_logprobs_paths_equal_the_full_logits(tiny_llama_config, tied):
    """``ModelConfig.logits_chunk``: ``sequence_logprobs`` and ``next_token_nll`` (the SFT / ptx
    loss) from chunks of the hidden states equal the whole-logits path, values and gradients,
    for a tied unembedding and an untied ``lm_head``."""
    from rlhf_jax.generation import next_token_nll
    from rlhf_jax.losses import sft_loss

    full = Transformer(tiny_llama_config.replace(tie_embeddings=tied))
    chunked = Transformer(full.config.replace(logits_chunk=3))
    params = random_params(full, 3)
    ids, mask = left_padded([4, 6, 2], 6, full.config.vocab_size, seed=2)
    tokens = np.concatenate([ids, ids[:, ::-1]], axis=1)
    mask = np.concatenate([mask, np.ones_like(mask)], axis=1)
    mask[2, -2:] = 0
    a, b = (sequence_logprobs(m, params, tokens, mask, 6, temperature=0.8) for m in (full, chunked))
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    loss_mask = mask.copy()
    loss_mask[:, :6] = 0
    reference = sft_loss(_forward(full, params, tokens, mask).logits, tokens, loss_mask)
    nll = jax.jit(jax.value_and_grad(next_token_nll, argnums=1), static_argnums=0)
    (la, ga), (lb, gb) = (nll(m, params, tokens, mask, loss_mask) for m in (full, chunked))
    np.testing.assert_allclose(float(la), float(reference), rtol=1e-6)
    np.testing.assert_allclose(float(lb), float(la), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6), ga, gb)
