"""Memory before compute (`rlhf_jax.train.memory`): a stage's memory plan is refused with advice
when it exceeds the device, `check=false` (`rlhf-jax --force`) skips it, and an out-of-memory
failure becomes one `DeviceMemoryError` naming the stage, step, batch shape and the estimate."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.errors import JaxRuntimeError

from rlhf_jax import cli
from rlhf_jax.errors import DeviceMemoryError, PlanError
from rlhf_jax.model import ModelConfig
from rlhf_jax.plan import GiB
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train.memory import MemoryCheckConfig, MemoryGuard, check_memory, device_memory, stage_plan
from rlhf_jax.train.state import TrainState
from test_cli_errors import sft_args
from test_stage_sft import make_world

MODEL = ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=64)
RM_SHAPE = {"batch_size": 8, "k_responses": 2, "seq_len": 64}


def test_a_plan_over_the_limit_is_refused_with_advice_in_stage_config_names():
    plan = stage_plan("rm", MODEL, MeshConfig(), MemoryCheckConfig(limit_gib=1.0), **RM_SHAPE)
    limit = plan.total_bytes / GiB * 0.8  # usable = 0.9 * limit: below the estimate, above remat's
    with pytest.raises(PlanError) as e:
        check_memory("rm", MODEL, MeshConfig(), MemoryCheckConfig(limit_gib=limit), **RM_SHAPE)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"rm stage: the memory plan needs {plan.total_bytes / GiB:.2f} GiB per device")
    assert "batch_size 8, k_responses 2, seq_len 64" in message and "memory.limit_gib" in message
    for advice in ("model.remat=true", "optimizer.grad_accum_steps=", "max_len", "--force"):
        assert advice in message, advice
    assert all(gib <= 0.9 * limit for _, gib in e.value.suggestions)  # each fix was re-planned to fit
    # The same plan fits a larger device, and check=false skips the check altogether.
    assert check_memory("rm", MODEL, MeshConfig(), MemoryCheckConfig(limit_gib=1.0), **RM_SHAPE) is not None
    unchecked = check_memory("rm", MODEL, MeshConfig(), MemoryCheckConfig(check=False, limit_gib=1e-9), **RM_SHAPE)
    assert unchecked.total_bytes == plan.total_bytes


def test_remat_and_the_model_dtype_reach_the_plan():
    full = stage_plan("sft", MODEL.replace(remat_policy="full"), MeshConfig(), MemoryCheckConfig(limit_gib=1.0),
                      batch_size=8, seq_len=64)
    none = stage_plan("sft", MODEL, MeshConfig(), MemoryCheckConfig(limit_gib=1.0), batch_size=8, seq_len=64)
    assert full.config.remat and not none.config.remat
    assert full.row_bytes("activations") < none.row_bytes("activations")
    assert none.config.compute_dtype == "float32"


def test_device_memory_on_cpu_is_the_hosts_ram_over_its_devices():
    gib, source = device_memory()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if jax.local_devices()[0].memory_stats() is None:
        assert source == "host RAM / local devices" and gib == pytest.approx(ram / jax.local_device_count() / GiB)
    assert device_memory(3.5) == (3.5, "memory.limit_gib")


def test_out_of_memory_names_stage_step_shape_and_estimate():
    plan = stage_plan("rm", MODEL, MeshConfig(), MemoryCheckConfig(limit_gib=2.0), **RM_SHAPE)
    state = TrainState(step=np.int32(4), params={}, opt_state=(), rng=None, tx=None)
    calls = []

    def step(state, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 26364482436 bytes.\nmore")
        return state, {}

    batch = {"tokens": np.zeros((8, 2, 64), np.int32), "mask": np.zeros((8, 2, 64), np.int32)}
    with pytest.raises(DeviceMemoryError) as e:
        with MemoryGuard("rm", plan) as guard:
            watched = guard.watch(step)
            watched(state, batch)
            watched(state, batch)
    message = str(e.value)
    assert message.startswith("out of device memory in the rm stage at step 6 (batch tokens [8, 2, 64]) "
                              "(RESOURCE_EXHAUSTED: Out of memory allocating 26364482436 bytes.)")
    assert f"planner estimated {plan.total_bytes / GiB:.2f} GiB per device of 1.80 usable" in message
    assert "model.remat=true" in message and "grad_accum_steps" in message and "\n" not in message
    with pytest.raises(DeviceMemoryError, match="in the sft stage during setup .before step 1."):
        with MemoryGuard("sft", None):
            raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory")
    with pytest.raises(JaxRuntimeError, match="INTERNAL"):  # other runtime errors pass through
        with MemoryGuard("sft", None):
            raise JaxRuntimeError("INTERNAL: something else")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("memory_world"), n_demos=8, n_eval=4)


def test_the_sft_stage_is_refused_before_compiling_and_force_runs_it(world, tmp_path, capsys):
    """Through `rlhf_jax.cli.main`: a 1 KiB device limit refuses the plan (exit 1, one line,
    nothing trained); `--force` skips the check and the stage trains and exports."""
    args = sft_args(world, tmp_path / "run", world["base"]) + ["--set", "memory.limit_gib=1e-6"]
    assert cli.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax: error: sft stage: the memory plan needs "), lines
    assert "batch_size 4, seq_len 64" in lines[0] and "max_len" in lines[0] and "--force" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cli.main([*args, "--force"]) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_stage_configs_expose_model_remat():
    from rlhf_jax.errors import ConfigError
    from rlhf_jax.stages.sources import ModelSource, model_config

    assert model_config(ModelSource(init=MODEL, remat=True)).remat_mode == "full"
    assert model_config(ModelSource(init=MODEL, remat_policy="dots")).remat_mode == "dots"
    with pytest.raises(ConfigError, match="ModelSource.remat"):
        ModelSource(init=MODEL, remat=True, remat_policy="dots")


# ------------------------------------------------------------------------ GRPO, RLOO, DPO


@pytest.fixture(scope="module")
def rl_world(tmp_path_factory):
    from test_stage_dpo import write_comparisons
    from test_stage_ppo import make_ppo_world
    from test_stage_sft import jsonl

    root = tmp_path_factory.mktemp("rl_memory_world")
    files = make_ppo_world(root)
    prompts = [r["prompt"] for r in jsonl(files["prompts"])]
    return {**files, "comparisons": write_comparisons(root / "comparisons.jsonl", prompts[:8], 0)}


def rl_args(world, command: str, workdir) -> list[str]:
    """A one-step `rlhf-jax grpo|rloo|dpo` on the tiny world (batch 4; GRPO: G = 2, 24 + 6 tokens)."""
    common = ["--set", f"workdir={workdir}", "--set", f"model.hf_dir={world['sft']}", "--set", "batch_size=4",
              "--set", "loop.total_steps=1"]
    if command == "dpo":
        return ["dpo", *common, "--set", f"train_data={world['comparisons']}", "--set", "max_len=48",
                "--set", "buckets=[48]"]
    return [command, *common, "--set", f"train_data={world['prompts']}", "--set", f"reward_model={world['rm']}",
            "--set", "max_prompt_len=24", "--set", "grpo.group_size=2", "--set", "grpo.generation.max_new_tokens=6"]


SHAPES = {"grpo": "batch_size 4, group_size 2, prompt_len 24, max_new_tokens 6, ppo_minibatches 1",
          "rloo": "batch_size 4, group_size 2, prompt_len 24, max_new_tokens 6, ppo_minibatches 1",
          "dpo": "batch_size 4, k_responses 3, seq_len 48"}


@pytest.mark.parametrize("command", ["grpo", "rloo", "dpo"])
def test_grpo_rloo_and_dpo_are_refused_before_compiling_and_force_runs_them(rl_world, tmp_path, capsys, monkeypatch,
                                                                           command):
    """Through `rlhf_jax.cli.main`, as SFT: `memory.limit_gib=0.001` refuses the plan of the
    stage's own shape in one line (exit 1, nothing trained); with `--force` the stage builds its
    models and enters the training loop (stopped there: the SFT test above trains to the end)."""
    from rlhf_jax.stages import skeleton

    class Stop(Exception):
        pass

    def stop(**kwargs):
        raise Stop

    workdir = tmp_path / "run"
    args = rl_args(rl_world, command, workdir) + ["--set", "memory.limit_gib=0.001"]
    assert cli.main(args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    plan_stage = "dpo" if command == "dpo" else "grpo"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"rlhf-jax: error: {plan_stage} stage: the memory plan needs "), lines
    assert SHAPES[command] in lines[0] and "memory.limit_gib" in lines[0] and "--force" in lines[0], lines[0]
    assert not (workdir / "checkpoints").exists()
    monkeypatch.setattr(skeleton, "run_loop", stop)
    with pytest.raises(Stop):
        cli.main([*args, "--force"])


def test_rl_stages_plan_their_own_config(rl_world, tmp_path, monkeypatch):
    """The check gets the stage's shape (GRPO: its reward model, EMA and ptx batch; DPO: K from the
    data), `model.remat` (as remat), `memory.limit_gib` and `--force` (check off)."""
    from rlhf_jax.stages import skeleton

    seen = []

    def recording(stage, model, mesh, memory, accum, **shape):
        seen.append((stage, model, memory, shape))
        raise PlanError("stop after the check")

    monkeypatch.setattr(skeleton, "check_memory", recording)
    grpo = rl_args(rl_world, "grpo", tmp_path / "g") + [
        "--set", "grpo.ema_decay=0.9", "--set", "grpo.ptx_coef=0.5", "--set", f"ptx_data={rl_world['pretrain']}",
        "--set", "ptx_batch_size=2", "--set", "ptx_seq_len=16", "--set", "model.remat=true",
        "--set", "memory.limit_gib=3.5", "--force"]
    assert cli.main(grpo) == 1
    assert cli.main(rl_args(rl_world, "dpo", tmp_path / "d")) == 1
    (stage, model, memory, shape), (dpo_stage, dpo_model, dpo_memory, dpo_shape) = seen
    assert stage == "grpo" and model.remat_mode == "full" and memory == MemoryCheckConfig(check=False, limit_gib=3.5)
    assert shape == {"batch_size": 4, "group_size": 2, "prompt_len": 24, "max_new_tokens": 6, "ppo_minibatches": 1,
                     "ptx_batch_size": 2, "seq_len": 16, "frozen_dtype": "float32", "reward_model": True, "ema": True}
    assert dpo_stage == "dpo" and dpo_model.remat_mode == "none" and dpo_memory == MemoryCheckConfig()
    assert dpo_shape == {"batch_size": 4, "k_responses": 3, "seq_len": 48}


@pytest.mark.parametrize("command", ["grpo", "dpo"])
def test_rl_stage_out_of_memory_names_stage_step_shape_and_estimate(rl_world, tmp_path, capsys, monkeypatch,
                                                                   command):
    """An out-of-memory error in the GRPO or DPO step (here raised by a stand-in for the compiled
    step) ends in one line naming the stage, the step, the batch shape and the plan's estimate."""
    import importlib

    module = importlib.import_module(f"rlhf_jax.stages.{command}")

    def out_of_memory(*args, **kwargs):
        def step(state, batch):
            raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes.")
        return step

    monkeypatch.setattr(module, "jit_on_mesh", out_of_memory)
    assert cli.main(rl_args(rl_world, command, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rlhf-jax: ")]  # after the progress line
    shape = "prompt_tokens [4, 24]" if command == "grpo" else "tokens [4, 3, 48]"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"rlhf-jax: error: out of device memory in the {command} stage at step 1 "
                               f"(batch {shape})"), lines[0]
    assert "the planner estimated" in lines[0] and "model.remat=true" in lines[0]
