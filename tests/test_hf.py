"""Hugging Face interop (hf.py) against `transformers` (skipped without torch + transformers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import HF_TINY_CONFIGS, TRANSFORMERS_MISSING, random_params
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.hf_config import config_from_hf
from rlhf_jax.model import Transformer, forward, init_params

torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)

ALL_HF = sorted(HF_TINY_CONFIGS)
jit_forward = jax.jit(forward, static_argnums=0)


def left_padded_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask ``[3, 10]``: rows of 10, 6 and 3 real tokens, left-padded (pad id 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(3, 10))
    mask = np.zeros_like(tokens)
    for row, length in enumerate((10, 6, 3)):
        mask[row, 10 - length:] = 1
    return tokens * mask, mask


def hf_load(path: Path, cls_name: str = "AutoModelForCausalLM"):
    """A `transformers` model from ``path`` (eager attention, float32), asserting every weight
    was found in the files (a missing one would be silently random-initialised)."""
    model, info = getattr(transformers, cls_name).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def hf_outputs(hf_model, tokens: np.ndarray, mask: np.ndarray):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(positions), output_hidden_states=True)


def ours_logits(model, params, tokens, mask) -> np.ndarray:
    return np.asarray(jit_forward(model, params, jnp.asarray(tokens), jnp.asarray(mask)).logits)


def assert_close_on_mask(actual, expected, mask, atol):
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(actual)[real], np.asarray(expected)[real], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ALL_HF)
def test_load_pretrained_matches_transformers(name, hf_tiny_model_dir):
    path = hf_tiny_model_dir(name)
    model, params = load_pretrained(path)
    tokens, mask = left_padded_batch(model.config.vocab_size)
    expected = hf_outputs(hf_load(path), tokens, mask).logits.numpy()
    assert np.abs(expected).max() > 1.0  # perturbed weights: logits far from the ~0 of a bad load
    assert_close_on_mask(ours_logits(model, params, tokens, mask), expected, mask, atol=1e-4)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ALL_HF)
def test_save_pretrained_loads_in_transformers(name, hf_tiny_model_dir, tmp_path):
    model, params = load_pretrained(hf_tiny_model_dir(name))
    save_pretrained(model, params, tmp_path)
    hf_model = hf_load(tmp_path)
    assert type(hf_model).__name__ == HF_TINY_CONFIGS[name][0]
    tokens, mask = left_padded_batch(model.config.vocab_size, seed=1)
    expected = hf_outputs(hf_load(hf_tiny_model_dir(name)), tokens, mask).logits
    assert_close_on_mask(hf_outputs(hf_model, tokens, mask).logits, expected, mask, atol=1e-6)


@pytest.mark.parametrize("config_name", ["gpt2", "llama"])
def test_own_params_round_trip(config_name, tiny_gpt2_config, tiny_llama_config, tmp_path):
    """Our params -> save_pretrained -> transformers gives our logits; -> load_pretrained gives them
    back exactly.  Llama's come from init_params (perturbed so that norms and biases are not 1 and
    0); GPT-2's from random_params (the same tree, without compiling the initialiser again)."""
    config = {"gpt2": tiny_gpt2_config, "llama": tiny_llama_config}[config_name]
    model = Transformer(config)
    if config_name == "llama":
        params = jax.jit(init_params, static_argnums=0)(model, jax.random.PRNGKey(3))
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape, np.float32), params)
    else:
        params = random_params(model, seed=3)
    save_pretrained(model, params, tmp_path)
    tokens, mask = left_padded_batch(config.vocab_size, seed=2)
    expected = ours_logits(model, params, tokens, mask)
    assert_close_on_mask(hf_outputs(hf_load(tmp_path), tokens, mask).logits, expected, mask, atol=1e-4)
    model2, params2 = load_pretrained(tmp_path)
    assert model2.config == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_save_and_load(hf_tiny_llama_dir, tmp_path):
    model, params = load_pretrained(hf_tiny_llama_dir)
    save_pretrained(model, params, tmp_path, shard_size_bytes=60_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    for shard in shards:  # each shard within the limit unless it holds a single bigger tensor
        tensors = load_file(tmp_path / shard)
        assert len(tensors) == 1 or sum(t.nbytes for t in tensors.values()) <= 60_000
    _, params2 = load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    tokens, mask = left_padded_batch(model.config.vocab_size)
    assert_close_on_mask(hf_outputs(hf_load(tmp_path), tokens, mask).logits,
                         ours_logits(model, params, tokens, mask), mask, atol=1e-4)


def test_base_model_names_and_mask_buffers(hf_tiny_gpt2_dir, tmp_path):
    """Older hub GPT-2 files: no `transformer.` prefix, causal-mask buffers `h.{i}.attn.bias`."""
    def to_hub_style(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))

    _, params = load_pretrained(hf_tiny_gpt2_dir)
    _, params2 = load_pretrained(rewrite_weights(hf_tiny_gpt2_dir, tmp_path / "m", to_hub_style))
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_transformers4_rope_fields(hf_tiny_llama_dir, tmp_path):
    """transformers 4 wrote `rope_theta` and `rope_scaling` at the top level."""
    shutil.copytree(hf_tiny_llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=123.0, rope_scaling=None)
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    model, _ = load_pretrained(tmp_path / "m")
    assert model.config.rope_theta == 123.0


# -------------------------------------------------------------------------------- scalar head


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_scalar_head_from_lm_checkpoint_and_export(name, hf_tiny_model_dir, tmp_path):
    path = hf_tiny_model_dir(name)
    lm, lm_params = load_pretrained(path)
    with pytest.raises(ValueError, match="score.weight.*key="):
        load_pretrained(path, head="scalar")
    rm, rm_params = load_pretrained(path, head="scalar", key=jax.random.PRNGKey(0))
    assert "lm_head" not in rm_params and rm_params["score_head"]["kernel"].shape == (64, 1)
    rm_params["score_head"]["bias"] = jnp.array([0.25], jnp.float32)
    tokens, mask = left_padded_batch(lm.config.vocab_size)
    out = jit_forward(rm, rm_params, jnp.asarray(tokens), jnp.asarray(mask))
    hidden = np.asarray(jit_forward(lm, lm_params, jnp.asarray(tokens), jnp.asarray(mask)).hidden)
    np.testing.assert_array_equal(np.asarray(out.hidden), hidden)
    assert out.values.shape == tokens.shape

    save_pretrained(rm, rm_params, tmp_path, extra_config={"pad_token_id": 0})
    hf_rm = hf_load(tmp_path, "AutoModelForSequenceClassification")
    assert type(hf_rm).__name__.endswith("ForSequenceClassification") and hf_rm.config.num_labels == 1
    hf_out = hf_outputs(hf_rm, tokens, mask)
    with torch.no_grad():
        hf_values = hf_rm.score(hf_out.hidden_states[-1])[..., 0].numpy()
    # transformers has no score bias: ours is kept in rlhf_jax.json.
    assert_close_on_mask(out.values, hf_values + 0.25, mask, atol=1e-4)
    # transformers pools at the last non-pad token: the last column with left padding.
    np.testing.assert_allclose(hf_out.logits[:, 0].numpy() + 0.25, out.values[:, -1], atol=1e-4)
    _, rm_params2 = load_pretrained(tmp_path, head="scalar")
    jax.tree.map(np.testing.assert_array_equal, rm_params2, rm_params)


def test_mean_pooling_round_trip(hf_tiny_llama_dir, tmp_path):
    rm, params = load_pretrained(hf_tiny_llama_dir, head="scalar", key=jax.random.PRNGKey(0))
    assert rm.config.score_pooling == "last"
    save_pretrained(rm, params, tmp_path / "last")
    assert "rlhf_jax_score_pooling" not in json.loads((tmp_path / "last/config.json").read_text())
    averaged = Transformer(rm.config.replace(score_pooling="mean"))
    save_pretrained(averaged, params, tmp_path / "mean", extra_config={"pad_token_id": 0})
    assert json.loads((tmp_path / "mean/config.json").read_text())["rlhf_jax_score_pooling"] == "mean"
    assert load_pretrained(tmp_path / "mean", head="scalar")[0].config.score_pooling == "mean"
    config = json.loads((tmp_path / "mean/config.json").read_text())
    assert config_from_hf(config).score_pooling == "last"  # an LM head has no pooling
    hf_rm = hf_load(tmp_path / "mean", "AutoModelForSequenceClassification")  # transformers still loads it
    assert hf_rm.config.num_labels == 1

    (tmp_path / "mean/config.json").write_text(json.dumps({**config, "rlhf_jax_score_pooling": "sum"}))
    with pytest.raises(ValueError, match=r"config\.json.*'rlhf_jax_score_pooling' = 'sum'.*last, mean"):
        load_pretrained(tmp_path / "mean", head="scalar")


# ---------------------------------------------------------------------------------- bad input


def rewrite_weights(src: Path, dst: Path, edit) -> Path:
    """Copy of checkpoint ``src`` at ``dst`` with ``edit(tensors)`` applied to model.safetensors."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(tmp_path)


def test_missing_weights_file(hf_tiny_gpt2_dir, tmp_path):
    shutil.copy(hf_tiny_gpt2_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_pretrained(tmp_path)


def test_unknown_model_type(hf_tiny_gpt2_dir, tmp_path):
    shutil.copytree(hf_tiny_gpt2_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    (tmp_path / "m/config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json.*'model_type' = 'bert'"):
        load_pretrained(tmp_path / "m")


def test_unsupported_rope_scaling(hf_tiny_llama_dir, tmp_path):
    shutil.copytree(hf_tiny_llama_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text())
    del config["rope_parameters"]
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*'rope_scaling'.*rope_type 'dynamic' is not supported"):
        load_pretrained(tmp_path / "m")


def test_missing_tensor(hf_tiny_llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = rewrite_weights(hf_tiny_llama_dir, tmp_path / "m", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}.*missing.*\(96, 64\)"):
        load_pretrained(path)


def test_misshapen_tensor(hf_tiny_gpt2_dir, tmp_path):
    name = "transformer.h.0.attn.c_attn.weight"
    path = rewrite_weights(hf_tiny_gpt2_dir, tmp_path / "m", lambda t: t.update({name: t[name][:, :-1]}))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}.*\(64, 191\).*expected \(64, 192\)"):
        load_pretrained(path)


def test_unexpected_tensor(hf_tiny_llama_dir, tmp_path):
    path = rewrite_weights(hf_tiny_llama_dir, tmp_path / "m",
                           lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected.*extra\.weight"):
        load_pretrained(path)


def test_save_params_that_do_not_fit_the_model(hf_tiny_llama_dir, tmp_path):
    model, params = load_pretrained(hf_tiny_llama_dir)
    scalar = Transformer(model.config.replace(head="scalar"))
    with pytest.raises(ValueError, match="params: no score_head/"):
        save_pretrained(scalar, params, tmp_path)
    params["layer_1"]["mlp"]["up"]["kernel"] = params["layer_1"]["mlp"]["up"]["kernel"][:, :-1]
    with pytest.raises(ValueError, match=r"layer_1/mlp/up/kernel has shape \(64, 95\), expected \(64, 96\)"):
        save_pretrained(model, params, tmp_path)


def test_missing_shard(hf_tiny_llama_dir, tmp_path):
    model, params = load_pretrained(hf_tiny_llama_dir)
    save_pretrained(model, params, tmp_path, shard_size_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard.name}.*model\.safetensors\.index\.json"):
        load_pretrained(tmp_path)
