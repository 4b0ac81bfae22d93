"""The GRPO / RLOO stage (rlhf_jax.stages.grpo): resume to the same numbers, the EMA in model/, the
gold reward, config errors (sharded == one device: tests/test_sharded_stages.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.configs import ConfigError
from rlhf_jax.generation import GenerateConfig
from rlhf_jax.grpo import GRPO_PRESETS, GRPOConfig, RLOOConfig
from rlhf_jax.stages.config import StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.export import completed_model
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.stages.grpo import GRPOStageConfig, RLOOStageConfig, _exported, train_grpo
from test_stage_ppo import make_ppo_world
from test_stage_sft import jsonl


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_ppo_world(tmp_path_factory.mktemp("grpo_world"))


def grpo_config(world, workdir, cls=GRPOStageConfig, **overrides):
    algo = RLOOConfig if cls is RLOOStageConfig else GRPOConfig
    fields = dict(
        workdir=str(workdir), model=ModelSource(hf_dir=str(world["sft"])), reward_model=str(world["rm"]),
        train_data=str(world["prompts"]), eval_data=str(world["prompts_eval"]), ptx_data=str(world["pretrain"]),
        batch_size=4, ptx_batch_size=2, ptx_seq_len=16, max_prompt_len=24,
        grpo=algo(generation=GenerateConfig(max_new_tokens=6), group_size=2, num_minibatches=2, epochs=2,
                  ptx_coef=0.5, ema_decay=0.5),
        optimizer=StageOptimizerConfig(lr=1e-3, warmup_steps=1, schedule="constant"),
        loop=StageLoopConfig(total_steps=4, eval_every=2, save_every=2),
    )
    return cls(**{**fields, **overrides})


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_resume_gives_identical_run_and_exports_the_ema(world, tmp_path):
    """2 iterations, then a fresh run to 4 == 4 straight (metrics, data order, exported weights);
    model/ holds the EMA weights (use_ema), which differ from the SFT model.  (RLOO runs the same
    stage with another config: tests/test_learning.py.)"""
    cls, train = GRPOStageConfig, train_grpo
    straight = tmp_path / "straight"
    train(grpo_config(world, straight, cls))
    resumed = tmp_path / "resumed"
    cfg = grpo_config(world, resumed, cls)
    train(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=2, eval_every=2, save_every=2)))
    assert completed_model(resumed, 2) is not None
    train(cfg)
    want = _without_times(jsonl(straight / "metrics.jsonl"))
    assert _without_times(jsonl(resumed / "metrics.jsonl")) == want
    assert {"score", "kl", "ptx_loss", "clip_frac", "eval/score", "eval/kl"} <= set().union(*want)
    got, ref = load_file(resumed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    sft = load_file(world["sft"] / "model.safetensors")
    assert not np.array_equal(sft["transformer.h.0.mlp.c_fc.weight"], ref["transformer.h.0.mlp.c_fc.weight"])


def test_gold_reward_runs(world, tmp_path):
    """reward="gold": the world's gold labeler scores the rollouts (gold scores are <= 1)."""
    cfg = grpo_config(world, tmp_path, reward="gold", reward_model=None, eval_data=None,
                      loop=StageLoopConfig(total_steps=1))
    train_grpo(cfg)
    (record,) = [r for r in jsonl(tmp_path / "metrics.jsonl") if "score" in r]
    assert np.isfinite(record["score"]) and record["score"] <= 1.0


def test_rloo_defaults_and_config_errors(world, tmp_path):
    assert dataclasses.asdict(RLOOConfig()) == dataclasses.asdict(GRPOConfig(**GRPO_PRESETS["rloo"]))
    with pytest.raises(ConfigError, match="reward_model"):
        grpo_config(world, tmp_path, reward_model=None)
    with pytest.raises(ConfigError, match="reward_model"):
        grpo_config(world, tmp_path, reward="gold")
    with pytest.raises(ConfigError, match="ptx_data"):
        grpo_config(world, tmp_path, ptx_data=None)
    with pytest.raises(ConfigError, match="batch_size"):
        grpo_config(world, tmp_path, batch_size=3, grpo=GRPOConfig(group_size=3, num_minibatches=2))
    with pytest.raises(ConfigError, match="max_prompt_len"):
        train_grpo(grpo_config(world, tmp_path / "ctx", max_prompt_len=60))


@pytest.mark.slow
def test_gold_reward_iteration_sharded_equals_single_device(world):
    """The stage's GRPO step with the gold labeler (a host callback) on the (2,2,2) and (1,4,2)
    meshes equals one device's."""
    from _multidevice import run_on_devices

    out = run_on_devices(f"""
        import dataclasses, jax, numpy as np
        from rlhf_jax.generation import GenerateConfig
        from rlhf_jax.grpo import GRPOConfig, GRPOModels, init_grpo_state
        from rlhf_jax.hf import load_pretrained
        from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
        from rlhf_jax.stages.steps import jit_on_mesh
        from rlhf_jax.stages.grpo import grpo_step_fn
        from rlhf_jax.stages.rollouts import prompt_arrays
        from rlhf_jax.tasks.gold_reward import GoldReward
        from rlhf_jax.tokenizer import Tokenizer
        from rlhf_jax.train import OptimizerConfig, make_optimizer

        tok = Tokenizer.from_file({str(world["sft"])!r})
        policy, params = load_pretrained({str(world["sft"])!r})
        prompts = prompt_arrays({str(world["prompts"])!r}, tok, 24)
        batch = {{"prompt_tokens": prompts["tokens"][:4], "prompt_mask": prompts["mask"][:4]}}
        cfg = GRPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=tok.eos_id, pad_id=tok.pad_id),
                         group_size=2, num_minibatches=2, beta=0.04)
        models = GRPOModels(policy, GoldReward(tok.decode, tok.eos_id, 24))
        ref = None
        for mesh in [make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1]), make_mesh(MeshConfig(2, 2, 2)),
                     make_mesh(MeshConfig(1, 4, 2))]:
            tx = make_optimizer(OptimizerConfig(lr=1e-3))  # Adam's g/|g| magnifies rounding in tiny gradients
            state = init_grpo_state(cfg, params, None, tx, jax.random.PRNGKey(2))
            state = jax.device_put(state, state_shardings(state, mesh))
            new, metrics = jit_on_mesh(grpo_step_fn(models, cfg), mesh, state)(state, batch)
            result = jax.device_get(new.policy.params), {{k: float(v) for k, v in metrics.items()}}
            if ref is None:
                ref = result
                continue
            for k in ref[1]:
                np.testing.assert_allclose(result[1][k], ref[1][k], rtol=1e-5, atol=1e-6, err_msg=k)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), ref[0], result[0])
        print("ok", ref[1]["score"] <= 1.0)
    """, timeout=600)
    assert out.split() == ["ok", "True"]


def test_exported_weights_follow_use_ema(world, tmp_path):
    """model/ gets the EMA when it is kept and use_ema, else the policy's weights."""
    from types import SimpleNamespace

    state = SimpleNamespace(policy=SimpleNamespace(params="policy"), ema_params="ema")
    assert _exported(grpo_config(world, tmp_path), state) == "ema"
    assert _exported(grpo_config(world, tmp_path, use_ema=False), state) == "policy"
    assert _exported(grpo_config(world, tmp_path), SimpleNamespace(policy=state.policy, ema_params=None)) == "policy"
