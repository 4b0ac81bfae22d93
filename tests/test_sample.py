"""`rlhf-jax generate` (`rlhf_jax.sample`): the chat prompt rendered by the model's template, greedy
decoding until a stop id, against a no-cache argmax loop (on SmolLM2: `tests/test_smollm2_sft.py`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import random_params
from rlhf_jax.cli import main
from rlhf_jax.hf import save_pretrained
from rlhf_jax.model import ModelConfig, Transformer, forward
from test_messages import SIMPLE_CHATML, WORDS, word_tok  # noqa: F401  (the fixture)


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


def test_generate_from_a_gguf_file(tmp_path, capsys):
    """`model=FILE.gguf`: the weights by `load_gguf`, the tokenizer and template by
    `Tokenizer.from_gguf`."""
    _gguf = pytest.importorskip("_gguf", reason="the `gguf` package is needed for the GGUF tests")
    from rlhf_jax.gguf import load_gguf
    from rlhf_jax.tokenizer import Tokenizer
    from test_chat import CORPUS

    trained = Tokenizer.train(CORPUS, vocab_size=300, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok = Tokenizer(trained.hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = Transformer(ModelConfig(arch="llama", vocab_size=300, d_model=32, n_layers=1, n_heads=2, d_ff=32,
                                    max_len=48, tie_embeddings=True))
    path = _gguf.write_model_gguf(tmp_path / "m.gguf", model, random_params(model, seed=2, std=0.5), tokenizer=tok,
                                  pre="smollm", template=SIMPLE_CHATML)
    assert main(["generate", "--set", f"model={path}", "--set", "user=the cat", "--set", "max_new_tokens=5"]) == 0
    loaded, params = load_gguf(path)
    tok = Tokenizer.from_gguf(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=True)
    expected = greedy_loop(loaded, params, prompt, 5, set(tok.stop_ids))
    assert set(expected) - set(tok.special_ids), expected
    assert capsys.readouterr().out.rstrip("\n") == tok.decode(expected)
