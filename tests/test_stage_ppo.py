"""Stage 3 (PPO-ptx driver): resume to the same numbers, 8-device sharding, config errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from _multidevice import run_on_devices
from rlhf_jax.configs import ConfigError
from rlhf_jax.generation import GenerateConfig
from rlhf_jax.ppo import PPOConfig
from rlhf_jax.stages.common import ModelSource, StageLoopConfig, StageOptimizerConfig, completed_model
from rlhf_jax.stages.ppo import PPOStageConfig, train_ppo
from rlhf_jax.tasks import make_world_files
from rlhf_jax.tokenizer import Tokenizer
from test_stage_sft import jsonl, random_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo_world")
    files = make_world_files(root, 0, n_pretrain=200, n_demos=0, n_prompts=64, n_eval_prompts=16)
    texts = [r["text"] for r in jsonl(files["pretrain"])] + [r["prompt"] for r in jsonl(files["prompts"])]
    tokenizer = Tokenizer.train(texts, 320)
    tokenizer.save(root / "tokenizer")
    sft = random_model_dir(root / "sft", tokenizer, seed=0)
    rm = random_model_dir(root / "rm", tokenizer, seed=1, head="scalar")
    (rm / "reward_normalization.json").write_text(json.dumps({"gain": 2.0, "bias": -0.5}))
    return {**files, "sft": sft, "rm": rm}


def ppo_config(world, workdir, **overrides) -> PPOStageConfig:
    fields = dict(
        workdir=str(workdir),
        model=ModelSource(hf_dir=str(world["sft"])),
        reward_model=str(world["rm"]),
        train_data=str(world["prompts"]),
        eval_data=str(world["prompts_eval"]),
        ptx_data=str(world["pretrain"]),
        batch_size=8,
        ptx_batch_size=2,
        ptx_seq_len=16,
        max_prompt_len=24,
        ppo=PPOConfig(generation=GenerateConfig(max_new_tokens=8), num_minibatches=2, epochs=2, ptx_coef=0.5),
        optimizer=StageOptimizerConfig(lr=1e-3, warmup_steps=1, schedule="constant"),
        value_optimizer=StageOptimizerConfig(lr=1e-3, schedule="constant"),
        loop=StageLoopConfig(total_steps=4, eval_every=2, save_every=2),
        eval_samples=2,
    )
    return PPOStageConfig(**{**fields, **overrides})


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_resume_gives_identical_run(world, tmp_path):
    """2 iterations, then a fresh `train_ppo` (all-new objects) to 4 == 4 straight: same metrics,
    samples, data order (prompts and ptx batches) and bitwise-equal exported policy."""
    straight = tmp_path / "straight"
    train_ppo(ppo_config(world, straight))
    resumed = tmp_path / "resumed"
    cfg = ppo_config(world, resumed)
    train_ppo(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=2, eval_every=2, save_every=2)))
    assert completed_model(resumed, 2) is not None
    train_ppo(cfg)
    want = _without_times(jsonl(straight / "metrics.jsonl"))
    assert _without_times(jsonl(resumed / "metrics.jsonl")) == want
    assert {"score", "kl", "ptx_loss", "eval/score", "clipfrac", "vf_loss"} <= set().union(*want)
    assert jsonl(resumed / "samples.jsonl") == jsonl(straight / "samples.jsonl")
    got, ref = load_file(resumed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    sft = load_file(world["sft"] / "model.safetensors")
    assert not np.array_equal(sft["transformer.h.0.mlp.c_fc.weight"], ref["transformer.h.0.mlp.c_fc.weight"])
    # A finished stage is skipped.
    assert train_ppo(cfg) == completed_model(straight, 4) or completed_model(resumed, 4) is not None


def test_phase_timing_gives_the_same_iteration(world, tmp_path):
    """Running rollout / experience / update as three programs (to time them) computes the same
    iteration as the fused program."""
    fused = tmp_path / "fused"
    split = tmp_path / "split"
    loop = StageLoopConfig(total_steps=1)
    train_ppo(ppo_config(world, fused, loop=loop, eval_data=None))
    train_ppo(ppo_config(world, split, loop=loop, eval_data=None, phase_timing=True))
    a, b = jsonl(fused / "metrics.jsonl")[-1], jsonl(split / "metrics.jsonl")[-1]
    assert {"time/generate", "time/experience", "time/update"} <= set(b) and "time/iteration" in a
    for k in _without_times([a])[0]:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_config_errors_name_the_field(world, tmp_path):
    with pytest.raises(ConfigError, match="ptx_data"):
        ppo_config(world, tmp_path, ptx_data=None)
    with pytest.raises(ConfigError, match="batch_size"):
        ppo_config(world, tmp_path, batch_size=7)
    with pytest.raises(ConfigError, match="max_prompt_len"):
        train_ppo(ppo_config(world, tmp_path / "ctx", max_prompt_len=60))


def test_sharded_iteration_equals_single_device():
    """One PPO-ptx iteration (2 epochs × 2 minibatches) on a 2×2×2 and an 8×1×1 mesh == 1 device."""
    out = run_on_devices("""
        import jax, jax.numpy as jnp, numpy as np
        from rlhf_jax.generation import GenerateConfig
        from rlhf_jax.model import ModelConfig, Transformer, init_params
        from rlhf_jax.ppo import PPOConfig, PPOModels, init_ppo_state
        from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
        from rlhf_jax.stages.common import jit_on_mesh
        from rlhf_jax.stages.ppo import ppo_step_fn
        from rlhf_jax.train import OptimizerConfig, make_optimizer

        cfg = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
        policy, value = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
        rng = np.random.default_rng(0)
        def draw(model):
            shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
            return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
        pp, vp, rp = draw(policy), draw(value), draw(value)
        ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=5, pad_id=0), num_minibatches=2,
                        epochs=2, ptx_coef=0.5)
        tx = make_optimizer(OptimizerConfig(lr=1e-2))
        lengths = rng.integers(3, 9, 8)
        mask = (np.arange(8)[None] >= 8 - lengths[:, None]).astype(np.int32)
        batch = {"prompt_tokens": np.where(mask, rng.integers(6, 64, (8, 8)), 0).astype(np.int32), "prompt_mask": mask,
                 "ptx_tokens": rng.integers(1, 64, (16, 12)).astype(np.int32), "ptx_mask": np.ones((16, 12), np.int32)}
        step = ppo_step_fn(PPOModels(policy, value, value), ppo)
        results = []
        for mesh in (make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]), make_mesh(MeshConfig(2, 2, 2)),
                     make_mesh(MeshConfig(data=8, fsdp=1))):
            state = init_ppo_state(ppo, pp, vp, rp, tx, tx, jax.random.PRNGKey(1))
            state = jax.device_put(state, state_shardings(state, mesh))
            run = jit_on_mesh(step, mesh, state)
            state, metrics = run(state, batch)
            results.append((jax.device_get(state.policy.params), jax.device_get(state.value.params),
                            {k: float(v) for k, v in metrics.items()}))
        for pol, val, met in results[1:]:
            for k in results[0][2]:
                np.testing.assert_allclose(met[k], results[0][2][k], rtol=2e-4, atol=2e-5, err_msg=k)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5), results[0][0], pol)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=2e-5), results[0][1], val)
        print("ok", results[0][2]["response_length"] > 0)
    """, timeout=600)
    assert out.split() == ["ok", "True"]
