"""Stage 1 (SFT): the train step's loss against NumPy, packing, resume, learning (sharded: test_sharded_stages.py).

The helpers at the top (a tiny synthetic world on disk: JSONL files, a trained BPE tokenizer, a
random GPT-2 base model in Hugging Face format) are shared with test_stage_reward.py and
test_cli.py.  Every run in this file uses one model shape, one batch shape and one optimiser
config, so the train step compiles once per process.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.configs import ConfigError
from rlhf_jax.data import DataError, read_demonstrations
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.stages.config import StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.export import completed_model
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.stages.sft import (
    SFTConfig,
    demonstration_arrays,
    pack,
    sft_batch_loss,
    train_sft,
)
from rlhf_jax.tasks import make_world_files
from rlhf_jax.tokenizer import Tokenizer

TINY = dict(arch="gpt2", d_model=32, n_layers=2, n_heads=2, max_len=64)
BUCKETS = (64,)


# ------------------------------------------------------------------------------ shared helpers


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def random_model_dir(path: Path, tokenizer: Tokenizer, seed: int = 0, **config) -> Path:
    """A random GPT-2 saved in Hugging Face format with the tokenizer (NumPy draws: nothing to
    compile).  Kernels and embeddings N(0, 0.02²), norm scales 1, biases 0, like `init_params`."""
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **{**TINY, **config}))
    shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return (np.ones if name == "scale" else np.zeros)(leaf.shape, np.float32)
        return rng.normal(0, 0.02, leaf.shape).astype(np.float32)

    return save_pretrained(model, jax.tree_util.tree_map_with_path(draw, shapes), path, tokenizer=tokenizer)


def make_world(root: Path, n_demos: int = 256, n_eval: int = 32, seed: int = 0,
               extra_texts: list[str] = ()) -> dict[str, Path]:
    """World JSONL files, a 320-token byte-level BPE trained on them (plus `extra_texts`) and a
    random base model: keys demos, demos_eval, pretrain, tokenizer, base."""
    files = make_world_files(root, seed, n_pretrain=300, n_demos=n_demos, n_prompts=0, n_eval_demos=n_eval)
    texts = [r["text"] for r in jsonl(files["pretrain"])]
    texts += [r["prompt"] + r["response"] for r in jsonl(files["demos"])] + list(extra_texts)
    tokenizer = Tokenizer.train(texts, 320)
    tok_path = tokenizer.save(root / "tokenizer")
    return {**files, "tokenizer": tok_path, "base": random_model_dir(root / "base", tokenizer)}


def sft_config(world: dict[str, Path], workdir: Path, **overrides) -> SFTConfig:
    """A tiny SFT run: batch 8, length 64, Adam 3e-3 with a cosine over 8 steps, 8 steps."""
    fields = dict(
        workdir=str(workdir),
        model=ModelSource(hf_dir=str(world["base"])),
        train_data=str(world["demos"]),
        eval_data=str(world["demos_eval"]),
        batch_size=8,
        buckets=BUCKETS,
        optimizer=StageOptimizerConfig(schedule="cosine", lr=3e-3, total_steps=8),
        loop=StageLoopConfig(total_steps=8, eval_every=4, save_every=4),
        sample_prompts=0,
    )
    return SFTConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory) -> Path:
    """8 SFT steps in one go (eval and checkpoint at 4 and 8, greedy samples of 2 prompts)."""
    workdir = tmp_path_factory.mktemp("straight")
    train_sft(sft_config(world, workdir, sample_prompts=2, sample_max_new_tokens=6))
    return workdir


# ------------------------------------------------------------------------------------- tests


def test_first_step_loss_matches_numpy(world, straight):
    """Step 1's logged loss = NumPy masked mean of −log p over the response tokens + EOS of the
    first batch (rows chosen by the iterator's documented permutation), under the base model."""
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    records = read_demonstrations(world["demos"])
    rows = np.random.default_rng([0, 0]).permutation(len(records))[:8]  # BatchIterator, seed 0
    seqs, targets = [], []
    for i in rows:
        prompt, response = records[i].prompt, records[i].response
        ids = tokenizer.encode(prompt + response, add_bos=True, add_eos=True)
        n_response = len(ids) - len(tokenizer.encode(prompt, add_bos=True)) - 1
        seqs.append(ids)
        targets.append(range(len(ids) - n_response - 1, len(ids)))  # response + EOS
    tokens = np.full((8, 64), tokenizer.pad_id, np.int32)
    mask = np.zeros((8, 64), np.int32)
    for b, ids in enumerate(seqs):
        tokens[b, : len(ids)], mask[b, : len(ids)] = ids, 1

    model, params = load_pretrained(world["base"])
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    logits = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, mask).logits)(params)
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, tokens[b, t]] for b in range(8) for t in targets[b]]

    first = jsonl(straight / "metrics.jsonl")[0]
    assert first["step"] == 1
    assert first["tokens"] == len(nll)
    np.testing.assert_allclose(first["loss"], np.mean(nll), rtol=1e-5)


def test_packed_loss_equals_unpacked(world):
    """Several demonstrations per row (segment ids, restarted positions) give the same loss."""
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    for prompt_masking in (True, False):
        _, arrays = demonstration_arrays(world["demos_eval"], tokenizer, BUCKETS, prompt_masking=prompt_masking)
        arrays = {k: v[:12] for k, v in arrays.items()}
        packed = pack(arrays, 64, tokenizer.pad_id)
        assert len(packed["tokens"]) < 8 and packed["segment_ids"].max() >= 2  # really packed
        assert packed["loss_mask"].sum() == arrays["loss_mask"][:, 1:].sum()
        model, params = load_pretrained(world["base"])
        loss = jax.jit(sft_batch_loss, static_argnums=0)
        np.testing.assert_allclose(float(loss(model, params, packed)), float(loss(model, params, arrays)),
                                   rtol=2e-6)


def test_resume_gives_identical_run(world, straight, tmp_path):
    """4 steps, then a fresh `train_sft` (all-new objects) with 8: same metrics, samples, data
    order and bitwise-equal exported parameters as 8 steps straight."""
    workdir = tmp_path / "resumed"
    cfg = sft_config(world, workdir, sample_prompts=2, sample_max_new_tokens=6)
    train_sft(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=4, eval_every=4, save_every=4)))
    assert completed_model(workdir, 4) is not None and completed_model(workdir, 8) is None
    train_sft(cfg)
    assert jsonl(workdir / "metrics.jsonl") == jsonl(straight / "metrics.jsonl")
    assert jsonl(workdir / "samples.jsonl") == jsonl(straight / "samples.jsonl")
    assert {r["step"] for r in jsonl(workdir / "samples.jsonl")} == {4, 8}
    got, want = load_file(workdir / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    base = load_file(world["base"] / "model.safetensors")
    assert not np.array_equal(base["transformer.h.0.mlp.c_fc.weight"], want["transformer.h.0.mlp.c_fc.weight"])


def test_finished_stage_is_skipped(world, straight):
    before = (straight / "metrics.jsonl").read_text()
    mtime = (straight / "model" / "model.safetensors").stat().st_mtime_ns
    assert train_sft(sft_config(world, straight)) == straight / "model"
    assert (straight / "metrics.jsonl").read_text() == before
    assert (straight / "model" / "model.safetensors").stat().st_mtime_ns == mtime
    exported = Tokenizer.from_file(straight / "model")
    assert exported.pad_id == Tokenizer.from_file(world["tokenizer"]).pad_id
    assert json.loads((straight / "model" / "rlhf_jax_stage.json").read_text())["steps"] == 8


def test_config_and_data_errors(world, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'hf_dir'"):
        ModelSource()
    with pytest.raises(ConfigError, match="SFTConfig.batch_size must be an int >= 1"):
        sft_config(world, tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="LoopConfig.eval_every"):
        StageLoopConfig(eval_every=-1)
    with pytest.raises(ConfigError, match="OptimizerConfig.lr"):
        StageOptimizerConfig(lr=-1.0, schedule="cosine")
    small = ModelSource(init=ModelConfig(vocab_size=100, **TINY))
    with pytest.raises(ConfigError, match="tokenizer: required when the model is a random init"):
        train_sft(sft_config(world, tmp_path / "v", model=small))
    with pytest.raises(ConfigError, match="the tokenizer has 320 ids .* the model's vocab_size is 100"):
        train_sft(sft_config(world, tmp_path / "v", model=small, tokenizer=str(world["tokenizer"])))
    with pytest.raises(ConfigError, match="max_len 128 exceeds the model's context 64"):
        train_sft(sft_config(world, tmp_path / "a", max_len=128))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": " b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'response'"):
        train_sft(sft_config(world, tmp_path / "b", train_data=str(bad)))
    with pytest.raises(ConfigError, match="batch_size 8 exceeds the 1 training rows"):
        bad.write_text('{"prompt": "a", "response": " b"}\n')
        train_sft(sft_config(world, tmp_path / "c", train_data=str(bad)))


@pytest.mark.slow
def test_sft_learns_the_synthetic_task(tmp_path):
    """300 steps on 512 demonstrations: held-out loss far below the unigram entropy of the
    training responses (what a model that ignores the prompt can reach at best)."""
    world = make_world(tmp_path / "world", n_demos=512, n_eval=64, seed=1)
    tokenizer = Tokenizer.from_file(world["tokenizer"])
    _, arrays = demonstration_arrays(world["demos"], tokenizer, BUCKETS)
    counts = np.bincount(arrays["tokens"][arrays["loss_mask"] == 1])
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())

    cfg = sft_config(world, tmp_path / "sft", batch_size=16, sample_prompts=2, sample_max_new_tokens=8,
                     optimizer=StageOptimizerConfig(schedule="cosine", lr=1e-2, warmup_steps=20),
                     loop=StageLoopConfig(total_steps=300, eval_every=150))
    train_sft(cfg)
    evals = [r for r in jsonl(tmp_path / "sft" / "metrics.jsonl") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [150, 300]
    assert evals[-1]["eval/loss"] < 0.5 * unigram, (evals, unigram)
    np.testing.assert_allclose(evals[-1]["eval/perplexity"], np.exp(evals[-1]["eval/loss"]), rtol=1e-9)
    samples = jsonl(tmp_path / "sft" / "samples.jsonl")
    assert len(samples) == 4 and all("\nanswer:" in s["text"] for s in samples)
