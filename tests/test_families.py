"""Architecture families against `transformers` 5 with random weights (docs/families.md).

Each family is a tiny random `transformers` model built from its own config class with the
family's real switches (RoPE scaling, q/k norms, an explicit head_dim, sliding windows shorter
than the sequence, per-layer window patterns, GeGLU, (1 + w) norms, soft-capping, local RoPE
bases), saved with `save_pretrained` and loaded with our `load_pretrained`.  For each family:
float32 logits within 1e-4 on a left-padded batch longer than the window; greedy generation
token-equal to `transformers`' `generate` for more than twice the window (decoding past it);
our export loads back in `transformers` with equal logits; the scalar-head export loads as
`...ForSequenceClassification` with equal scores; and where layers differ (windows, RoPE bases)
the scanned form (`scan_layers=True`, forward, prefill and decode) equals the unrolled one.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TRANSFORMERS_MISSING
from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.hf_config import config_from_hf, config_to_hf
from rlhf_jax.model import ModelConfig, Transformer, forward, unembed_fn
from rlhf_jax.rope import RopeScaling

torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)

WINDOW = 4
_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, num_hidden_layers=2,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
# name -> (transformers class, config kwargs, whether its layers differ)
FAMILIES = {
    "llama3": ("LlamaForCausalLM", dict(_BASE, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), False),
    "llama_yarn": ("LlamaForCausalLM", dict(_BASE, head_dim=16, tie_word_embeddings=False, rope_parameters=dict(
        rope_type="yarn", rope_theta=500.0, factor=4.0, original_max_position_embeddings=16)), False),
    "llama_linear": ("LlamaForCausalLM", dict(_BASE, rope_parameters=dict(
        rope_type="linear", rope_theta=100.0, factor=2.0)), False),
    "mistral": ("MistralForCausalLM", dict(_BASE, sliding_window=WINDOW, tie_word_embeddings=False), False),
    "qwen2": ("Qwen2ForCausalLM", dict(_BASE, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1, tie_word_embeddings=False), True),
    "qwen3": ("Qwen3ForCausalLM", dict(_BASE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1, tie_word_embeddings=True), True),
    "gemma2": ("Gemma2ForCausalLM", dict(_BASE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=1.5, final_logit_softcapping=3.0,
                                         hidden_activation="gelu_pytorch_tanh"), True),
    "gemma3": ("Gemma3ForCausalLM", dict(_BASE, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                                         sliding_window_pattern=3, query_pre_attn_scalar=12,
                                         final_logit_softcapping=3.0, rope_parameters={
                                             "full_attention": dict(rope_type="linear", factor=2.0, rope_theta=1e4),
                                             "sliding_attention": dict(rope_type="default", rope_theta=10.0)}),
               True),
}
FULL = ["llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]  # every check
ROPE_ONLY = ["llama_yarn", "llama_linear"]  # logits and export
LAYERED = [name for name in FULL if FAMILIES[name][2]]
T = 12  # > 2 windows
PROMPT, NEW = 6, 2 * WINDOW + 2

jit_forward = jax.jit(forward, static_argnums=0)


def left_padded(vocab: int, seed: int = 0, width: int = T) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask ``[3, width]``: rows of width, width/2 and 2 real tokens (pad id 0)."""
    tokens = np.random.default_rng(seed).integers(1, vocab, size=(3, width))
    mask = (np.arange(width)[None] >= np.array([[0], [width // 2], [width - 2]])).astype(np.int64)
    return tokens * mask, mask


def hf_logits(hf_model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions)).logits.numpy()


def hf_load(path, cls_name: str = "AutoModelForCausalLM"):
    model, info = getattr(transformers, cls_name).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


def assert_close_on_mask(actual, expected, mask, atol=1e-4):
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(actual)[real], np.asarray(expected)[real], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (hf_model, directory, our model, our params), built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            class_name, kwargs, _ = FAMILIES[name]
            cls = getattr(transformers, class_name)
            config = cls.config_class(**kwargs)
            config._attn_implementation = "eager"
            torch.manual_seed(0)
            hf_model = cls(config).to(torch.float32).eval()
            with torch.no_grad():  # away from the initialisers: norms not 1 (or 0), weights ~0.1
                for p in hf_model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(name)
            hf_model.save_pretrained(path)
            cache[name] = (hf_model, path, *load_pretrained(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", FULL + ROPE_ONLY)
def test_logits_match_transformers_left_padded(name, family):
    hf_model, _, model, params = family(name)
    tokens, mask = left_padded(model.config.vocab_size)
    expected = hf_logits(hf_model, tokens, mask)
    got = jit_forward(model, params, jnp.asarray(tokens), jnp.asarray(mask)).logits
    assert np.abs(expected).max() > 0.5
    assert_close_on_mask(got, expected, mask)


def test_family_switches_are_read(family):
    """The switches that make each family what it is reach our config."""
    c = {name: family(name)[2].config for name in FULL + ROPE_ONLY}
    assert c["llama3"].rope_scaling.rope_type == "llama3" and c["llama3"].tie_embeddings
    assert c["llama_yarn"].rope_scaling == RopeScaling("yarn", factor=4.0, original_max_len=16)
    assert c["mistral"].sliding_window == WINDOW and c["mistral"].layer_types is None
    assert c["qwen2"].layer_windows == (0, WINDOW) and c["qwen2"].qkv_bias
    assert c["qwen3"].qk_norm and c["qwen3"].head_dim == 16 and c["qwen3"].d_model == 32
    assert c["gemma2"].layer_windows == (WINDOW, 0) and c["gemma2"].attn_softcap == 1.5
    assert c["gemma3"].layer_windows == (WINDOW, WINDOW, 0) and c["gemma3"].rope_local_theta == 10.0
    assert c["gemma3"].rope_scaling == RopeScaling("linear", factor=2.0)


@pytest.mark.parametrize("name", FULL)
def test_greedy_generation_matches_transformers(name, family):
    """Left-padded prompts, then more than twice the window of greedy tokens: the KV-cache
    decode masks the slots that left the window exactly as `transformers`' generate does."""
    hf_model, _, model, params = family(name)
    prompts, mask = left_padded(model.config.vocab_size, seed=3, width=PROMPT)
    with torch.no_grad():
        expected = hf_model.generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
                                     max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                     eos_token_id=None).numpy()[:, PROMPT:]
    rollout = generate(model, params, jnp.asarray(prompts), jnp.asarray(mask), jax.random.PRNGKey(0),
                       GenerateConfig(max_new_tokens=NEW, greedy=True))
    np.testing.assert_array_equal(np.asarray(rollout.response), expected)


@pytest.mark.parametrize("name", FULL + ROPE_ONLY)
def test_export_loads_back_in_transformers(name, family, tmp_path):
    _, path, model, params = family(name)
    save_pretrained(model, params, tmp_path)
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["model_type"] == json.loads((path / "config.json").read_text())["model_type"]
    assert config_from_hf(exported) == model.config
    tokens, mask = left_padded(model.config.vocab_size, seed=1)
    expected = np.asarray(jit_forward(model, params, jnp.asarray(tokens), jnp.asarray(mask)).logits)
    assert_close_on_mask(hf_logits(hf_load(tmp_path), tokens, mask), expected, mask)


@pytest.mark.parametrize("name", FULL)
def test_scalar_head_export(name, family, tmp_path):
    """The reward-model export loads as `...ForSequenceClassification`; its score at the last
    column (left padding) plus our side-file bias equals our scalar head there.  Our head is a
    dense layer on the final hidden states (`test_model.py::test_scalar_head_shares_the_backbone`),
    read here from the LM's compiled forward."""
    _, path, lm, lm_params = family(name)
    rm, params = load_pretrained(path, head="scalar", key=jax.random.PRNGKey(0))
    params["score_head"]["bias"] = jnp.array([0.25], jnp.float32)
    save_pretrained(rm, params, tmp_path, extra_config={"pad_token_id": 0})
    hf_rm = hf_load(tmp_path, "AutoModelForSequenceClassification")
    assert type(hf_rm).__name__.endswith("ForSequenceClassification") and hf_rm.config.num_labels == 1
    tokens, mask = left_padded(rm.config.vocab_size, seed=2)
    hidden = np.asarray(jit_forward(lm, lm_params, jnp.asarray(tokens), jnp.asarray(mask)).hidden)[:, -1]
    head = params["score_head"]
    values = hidden @ np.asarray(head["kernel"])[:, 0] + np.asarray(head["bias"])
    np.testing.assert_allclose(hf_logits(hf_rm, tokens, mask)[:, 0] + 0.25, values, atol=1e-4)


@pytest.mark.parametrize("name", LAYERED)
def test_scanned_equals_unrolled(name, family):
    """Per-layer windows and RoPE bases as scan constants: the scanned forward equals the
    unrolled one; for Gemma 3 (windows and RoPE bases differ by layer) so does the scanned
    prefill + decode past the window (generation)."""
    _, _, model, params = family(name)
    scanned = Transformer(model.config.replace(scan_layers=True, scan_decode=True))
    tokens, mask = left_padded(model.config.vocab_size, seed=4)
    args = (jnp.asarray(tokens), jnp.asarray(mask))
    assert_close_on_mask(jit_forward(scanned, params, *args).logits, jit_forward(model, params, *args).logits,
                         mask, atol=1e-5)
    if name == "gemma3":
        prompts, prompt_mask = map(jnp.asarray, left_padded(model.config.vocab_size, seed=5, width=PROMPT))
        gen = GenerateConfig(max_new_tokens=NEW, greedy=True)
        key = jax.random.PRNGKey(0)
        np.testing.assert_array_equal(
            np.asarray(generate(scanned, params, prompts, prompt_mask, key, gen).response),
            np.asarray(generate(model, params, prompts, prompt_mask, key, gen).response))


def test_chunked_unembedding_applies_the_final_softcap(family):
    """`unembed_fn` (what `logits_chunk` unembeds with) soft-caps as the forward does."""
    _, _, model, params = family("gemma2")
    tokens, mask = map(jnp.asarray, left_padded(model.config.vocab_size))
    out = jit_forward(model, params, tokens, mask)
    assert np.abs(np.asarray(out.logits)).max() < model.config.final_softcap
    np.testing.assert_allclose(np.asarray(unembed_fn(model.config, params)(out.hidden)), np.asarray(out.logits),
                               atol=1e-5, rtol=0)


def test_cudnn_request_falls_back_for_softcapped_attention(family):
    """`attention_impl="cudnn"` with Gemma 2's attention soft-cap (which
    `jax.nn.dot_product_attention` cannot apply) runs the XLA path: here on a CPU, where cuDNN
    does not exist, with the same logits."""
    _, _, model, params = family("gemma2")
    tokens, mask = map(jnp.asarray, left_padded(model.config.vocab_size))
    cudnn = Transformer(model.config.replace(attention_impl="cudnn"))
    np.testing.assert_array_equal(np.asarray(jit_forward(cudnn, params, tokens, mask).logits),
                                  np.asarray(jit_forward(model, params, tokens, mask).logits))


# ---------------------------------------------------------------------------------- refusals


def test_unsupported_rope_type_named(family):
    hf = json.loads((family("llama3")[1] / "config.json").read_text())
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}
    with pytest.raises(ValueError, match=r"config\.json.*'rope_parameters'.*'longrope' is not supported"):
        config_from_hf(hf)
    with pytest.raises(ValueError, match=r"RopeScaling\.rope_type.*'dynamic' is not implemented"):
        RopeScaling("dynamic", factor=2.0)


def test_architectures_transformers_cannot_express():
    config = ModelConfig(arch="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=2, sliding_window=4,
                         layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ValueError, match="no transformers model_type.*layer_types"):
        config_to_hf(config)
    with pytest.raises(ValueError, match=r"ModelConfig\.layer_types must be n_layers=2"):
        config.replace(layer_types=("full_attention",))
    with pytest.raises(ValueError, match=r"ModelConfig\.qk_norm must be unset with arch='gpt2'"):
        ModelConfig(arch="gpt2", qk_norm=True)
