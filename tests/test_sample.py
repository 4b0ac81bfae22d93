"""`rlhf-jax generate` (`rlhf_jax.sample`): the chat prompt rendered by the model's template, greedy
decoding until a stop id, against a no-cache argmax loop; a GGUF file directly (SmolLM2)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import random_params
from rlhf_jax.cli import main
from rlhf_jax.hf import save_pretrained
from rlhf_jax.model import ModelConfig, Transformer, forward
from test_messages import WORDS, word_tok  # noqa: F401  (the fixture)


_forward = jax.jit(forward, static_argnums=0)


def greedy_loop(model, params, ids, n, stops):
    """Argmax of a full forward pass per step (no cache), stopping after a stop id."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = _forward(model, params, np.array([ids]), np.ones((1, len(ids)), np.int32)).logits
        out.append(int(np.argmax(np.asarray(logits)[0, -1])))
        ids.append(out[-1])
        if out[-1] in stops:
            break
    return out


def test_generate_command_matches_greedy_loop(word_tok, tmp_path, capsys):  # noqa: F811
    model = Transformer(ModelConfig(arch="llama", vocab_size=len(WORDS), d_model=16, n_layers=1, n_heads=2,
                                    d_ff=32, max_len=32))
    params = random_params(model, seed=3, std=0.5)
    save_pretrained(model, params, tmp_path / "m", tokenizer=word_tok)
    assert main(["generate", "--set", f"model={tmp_path / 'm'}", "--set", "user=hi there",
                 "--set", "max_new_tokens=6"]) == 0
    prompt = word_tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True,
                                          tokenize=True)
    expected = greedy_loop(model, params, prompt, 6, set(word_tok.stop_ids))
    assert set(expected) - set(word_tok.special_ids), expected  # some text to compare
    assert capsys.readouterr().out.rstrip("\n") == word_tok.decode(expected)
    assert main(["generate", "--set", f"model={tmp_path / 'm'}"]) == 2  # neither user nor prompt
    assert "SampleConfig.user must be set" in capsys.readouterr().err
    assert main(["generate", "--set", f"model={tmp_path / 'nowhere'}", "--set", "prompt=hi"]) == 2
    assert "nowhere: no such model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_from_smollm2_gguf(smollm2_gguf, capsys):
    assert main(["generate", "--set", f"model={smollm2_gguf}", "--set", "user=What is 2+2?",
                 "--set", "max_new_tokens=24"]) == 0
    assert "4" in capsys.readouterr().out
