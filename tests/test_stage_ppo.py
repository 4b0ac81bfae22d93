"""Stage 3 (PPO-ptx driver): resume to the same numbers, frozen models in bfloat16, config errors
(sharded == one device: tests/test_sharded_stages.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.configs import ConfigError
from rlhf_jax.generation import GenerateConfig
from rlhf_jax.ppo import PPOConfig, experience_phase, rollout_phase
from rlhf_jax.stages.config import StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.export import completed_model
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.stages.ppo import PPOStageConfig, initial_state, load_ppo_models, ppo_step_fn, train_ppo
from rlhf_jax.stages.rollouts import prompt_arrays
from rlhf_jax.tasks import make_world_files
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import OptimizerConfig, make_optimizer
from test_stage_sft import jsonl, random_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_ppo_world(tmp_path_factory.mktemp("ppo_world"))


def make_ppo_world(root: Path) -> dict[str, Path]:
    """Prompts, pretraining text, a BPE tokenizer, a random SFT model and a random reward model
    (gain 2, bias -0.5): keys of make_world_files plus sft, rm (shared with test_workdir.py)."""
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


def test_frozen_models_in_bfloat16(world, tmp_path):
    """``frozen_dtype="bfloat16"`` stores the reference and reward model in bfloat16 (the policy
    and value stay float32); an iteration runs, and the reference log-probs and RM scores of one
    rollout are the float32 ones within bfloat16 rounding (and not bit-equal: the cast happened)."""
    with pytest.raises(ConfigError, match="frozen_dtype"):
        ppo_config(world, tmp_path, frozen_dtype="float16")
    configs = [ppo_config(world, tmp_path, frozen_dtype=d, ppo=PPOConfig(generation=GenerateConfig(max_new_tokens=8),
                                                                         num_minibatches=2, ptx_coef=0.0))
               for d in ("float32", "bfloat16")]
    ppo = configs[0].ppo
    models, parts = load_ppo_models(configs[0], jax.random.PRNGKey(0))
    tx = make_optimizer(OptimizerConfig(lr=1e-3))
    s32, s16 = (initial_state(c, ppo, parts, tx, tx, jax.random.PRNGKey(1)) for c in configs)
    dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
    assert dtypes(s16.ref_params) == dtypes(s16.reward_params) == {jnp.dtype(jnp.bfloat16)}
    assert dtypes(s16.policy.params) == dtypes(s32.ref_params) == {jnp.dtype(jnp.float32)}

    prompts = prompt_arrays(str(world["prompts"]), Tokenizer.from_file(world["sft"]), 24)
    tokens, mask = prompts["tokens"][:8], prompts["mask"][:8]
    rollout = jax.jit(lambda s: rollout_phase(models, ppo, s, tokens, mask, jax.random.PRNGKey(2)))(s32)
    experience = jax.jit(lambda s: experience_phase(models, ppo, s, rollout))
    e32, e16 = experience(s32), experience(s16)
    m = np.asarray(e32.response_mask) != 0
    ref32, ref16 = np.asarray(e32.ref_logprobs)[m], np.asarray(e16.ref_logprobs)[m]
    np.testing.assert_array_equal(e16.old_logprobs, e32.old_logprobs)
    np.testing.assert_allclose(ref16, ref32, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(e16.scores, e32.scores, rtol=2e-2, atol=2e-2)
    assert np.any(ref16 != ref32)

    state, metrics = jax.jit(ppo_step_fn(models, ppo))(s16, {"prompt_tokens": tokens, "prompt_mask": mask})
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert dtypes(state.ref_params) == {jnp.dtype(jnp.bfloat16)}
