"""The DPO stage (rlhf_jax.stages.dpo): resume to the same numbers, the held-out metrics against
dpo_batch_loss, config errors (sharded == one device: tests/test_sharded_stages.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax.configs import ConfigError
from rlhf_jax.stages.config import StageLoopConfig
from rlhf_jax.stages.export import completed_model
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.stages.dpo import DPOConfig, DPOOptimizerConfig, train_dpo
from rlhf_jax.tasks import correct_answer, corrupt_answer
from test_stage_ppo import make_ppo_world
from test_stage_sft import jsonl


def write_comparisons(path: Path, prompts: list[str], seed: int) -> Path:
    """Best-first rankings of the world's prompts: the correct answer, then 1 and 2 mistakes
    (every third record a chosen/rejected pair: K varies)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            responses = [correct_answer(p), corrupt_answer(rng, p, 1), corrupt_answer(rng, p, 2)]
            record = ({"prompt": p, "chosen": responses[0], "rejected": responses[2]} if i % 3 == 0 else
                      {"prompt": p, "responses": responses, "ranking": [0, 1, 2]})
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_world")
    files = make_ppo_world(root)
    prompts = [r["prompt"] for r in jsonl(files["prompts"])]
    return {**files, "comparisons": write_comparisons(root / "comparisons.jsonl", prompts[:24], 0),
            "comparisons_eval": write_comparisons(root / "comparisons_eval.jsonl", prompts[24:32], 1)}


def dpo_config(world, workdir, **overrides) -> DPOConfig:
    fields = dict(workdir=str(workdir), model=ModelSource(hf_dir=str(world["sft"])),
                  train_data=str(world["comparisons"]), eval_data=str(world["comparisons_eval"]), batch_size=4,
                  beta=0.5, max_len=48, buckets=(48,), optimizer=DPOOptimizerConfig(lr=1e-3, warmup_steps=0),
                  loop=StageLoopConfig(total_steps=4, eval_every=2, save_every=2))
    return DPOConfig(**{**fields, **overrides})


def test_resume_gives_identical_run(world, tmp_path):
    """2 steps, then a fresh run to 4 == 4 straight: same metrics and bitwise-equal exported
    policy; the first step starts at the reference (loss log 2, margin 0); held-out metrics logged."""
    straight = tmp_path / "straight"
    train_dpo(dpo_config(world, straight))
    resumed = tmp_path / "resumed"
    cfg = dpo_config(world, resumed)
    train_dpo(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=2, eval_every=2, save_every=2)))
    assert completed_model(resumed, 2) is not None
    train_dpo(cfg)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rs]  # noqa: E731
    want = strip(jsonl(straight / "metrics.jsonl"))
    assert strip(jsonl(resumed / "metrics.jsonl")) == want
    first = next(r for r in want if "loss" in r)
    np.testing.assert_allclose(first["loss"], np.log(2), rtol=1e-5)
    assert abs(first["margin"]) < 1e-6
    assert {"accuracy", "rewards_chosen", "eval/loss", "eval/accuracy", "eval/margin"} <= set().union(*want)
    got, ref = load_file(resumed / "model" / "model.safetensors"), load_file(straight / "model" / "model.safetensors")
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    losses = [r["loss"] for r in want if "loss" in r]
    assert losses[-1] < losses[0], losses


def test_config_errors_name_the_field(world, tmp_path):
    with pytest.raises(ConfigError, match="DPOConfig.beta"):
        dpo_config(world, tmp_path, beta=0.0)
    with pytest.raises(ConfigError, match="DPOConfig.loss_type"):
        dpo_config(world, tmp_path, loss_type="kto")
    with pytest.raises(ConfigError, match="DPOConfig.label_smoothing"):
        dpo_config(world, tmp_path, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="batch_size"):
        train_dpo(dpo_config(world, tmp_path / "big", batch_size=64))


@pytest.mark.slow
def test_dpo_step_sharded_equals_single_device():
    """Two DPO updates (policy and frozen reference in one DPOState) on the (8,1,1), (1,8,1),
    (2,2,2) and (1,4,2) meshes equal one device's; the reference stays sharded like the policy."""
    from _multidevice import run_on_devices

    out = run_on_devices("""
        import jax, numpy as np
        from rlhf_jax.model import ModelConfig, Transformer, init_params
        from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
        from rlhf_jax.stages.sources import ModelSource
        from rlhf_jax.stages.steps import init_train_state, jit_on_mesh
        from rlhf_jax.stages.dpo import DPOConfig, DPOLoss, DPOState, dpo_step_fn
        from rlhf_jax.train import OptimizerConfig, make_optimizer

        model = Transformer(ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                        d_ff=96, max_len=16))
        cfg = DPOConfig(workdir="/tmp/unused", model=ModelSource(init=model.config), train_data="unused",
                        beta=0.5, batch_size=8)
        rng = np.random.default_rng(0)
        lengths = rng.integers(5, 13, (8, 3))
        t = np.arange(12)
        mask = (t < lengths[..., None]).astype(np.int32)
        batch = {"tokens": np.where(mask, rng.integers(1, 64, (8, 3, 12)), 0).astype(np.int32), "mask": mask,
                 "loss_mask": (mask * (t >= 4)).astype(np.int32), "valid": (rng.random((8, 3)) > 0.2).astype(np.int32)}
        batch["valid"][:, :2] = 1
        params = init_params(model, jax.random.PRNGKey(0))
        optimizer = OptimizerConfig(lr=1e-3)  # Adam's g/|g| magnifies rounding in tiny gradients
        step_fn = dpo_step_fn(DPOLoss.of(cfg), model, optimizer)
        ref = None
        meshes = [make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])] + [
            make_mesh(MeshConfig(*s)) for s in ((8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2))]
        for mesh in meshes:
            policy = init_train_state(params, make_optimizer(optimizer), jax.random.PRNGKey(1), mesh)
            state = DPOState(policy, jax.device_put(params, state_shardings(params, mesh)))
            step = jit_on_mesh(step_fn, mesh, state)
            history = []
            for _ in range(2):
                state, metrics = step(state, batch)
                history.append({k: float(v) for k, v in metrics.items()})
            kernel = state.ref_params["layer_0"]["mlp"]["up"]["kernel"]
            if mesh.size > 1 and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
                assert kernel.addressable_shards[0].data.size < kernel.size, "reference kernel is not sharded"
            result = jax.device_get(state.policy.params), history
            if ref is None:
                ref = result
                continue
            for i, (a, b) in enumerate(zip(ref[1], result[1])):
                for k in a:
                    if i == 0 and k == "accuracy":  # policy == reference: margins are rounding noise around 0
                        continue
                    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=f"{mesh.shape} {k}")
            jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-6), ref[0], result[0])
        print("ok", ref[1][0]["loss"] > 0)
    """, timeout=600)
    assert out.split() == ["ok", "True"]
