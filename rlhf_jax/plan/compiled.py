"""XLA's own per-device buffer assignment of a stage's train step (``compile="cpu"`` in a child
process on simulated CPU devices, or ``"local"``), extrapolated from two layer counts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.configs import from_dict, to_dict
from rlhf_jax.errors import ConfigError
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.plan.config import PlanConfig, optimizer_config
from rlhf_jax.plan.result import CompiledMemory
from rlhf_jax.sharding import BATCH_AXES, make_mesh, state_shardings
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import TrainState

_REPO = Path(__file__).resolve().parents[2]
_STATS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")


def _program(cfg: PlanConfig, config: ModelConfig) -> tuple[str, Any, Transformer, dict[str, jax.ShapeDtypeStruct]]:
    """(description, step function, model, abstract batch) of the train step the compiler sees."""
    from rlhf_jax.stages.reward import rm_step_fn  # the stages import data/tokenizer: only here
    from rlhf_jax.stages.sft import sft_step_fn

    opt = optimizer_config(cfg)
    i32 = jnp.int32
    if cfg.stage == "rm":
        model = Transformer(config.replace(head="scalar"))
        b, k, s = cfg.batch_size, cfg.k_responses, cfg.seq_len
        batch = {"tokens": jax.ShapeDtypeStruct((b, k, s), i32), "mask": jax.ShapeDtypeStruct((b, k, s), i32),
                 "valid": jax.ShapeDtypeStruct((b, k), i32)}
        return "reward-model train step", rm_step_fn(model, opt), model, batch
    model = Transformer(config)
    if cfg.stage == "sft":
        b, s, what = cfg.batch_size, cfg.seq_len, "SFT train step"
    elif cfg.stage == "dpo":
        b, s = cfg.batch_size * cfg.k_responses, cfg.seq_len
        what = "DPO policy update proxy (sft_loss on the batch's b·K sequences, no reference)"
    else:
        group = cfg.group_size if cfg.stage == "grpo" else 1
        b, s = cfg.batch_size * group // cfg.ppo_minibatches, cfg.prompt_len + cfg.max_new_tokens
        what = f"{cfg.stage.upper()} policy update proxy (sft_loss on one minibatch)"
    batch = {name: jax.ShapeDtypeStruct((b, s), i32) for name in ("tokens", "mask", "loss_mask")}
    return what, sft_step_fn(model, opt), model, batch


def _compile_stats(cfg: PlanConfig, config: ModelConfig, devices: Sequence[Any]) -> tuple[str, dict[str, int]]:
    """Compile the train step of ``config`` on ``devices`` and return its memory analysis."""
    what, step, model, batch = _program(cfg, config)
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(optimizer_config(cfg))
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(lambda k: TrainState.create(init_params(model, k), tx, k), key)
    state_sh = state_shardings(state, mesh)
    batch_sh = {name: NamedSharding(mesh, P(BATCH_AXES)) for name in batch}
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
    stats = jitted.lower(state, batch).compile().memory_analysis()
    return what, {name: int(getattr(stats, name)) for name in _STATS}


def _layer_counts(cfg: PlanConfig, n_layers: int) -> tuple[int, ...]:
    k = cfg.compile_layers
    return (k - 1, k) if 0 < k < n_layers else (n_layers,)


def _compile_jobs(cfg: PlanConfig, config: ModelConfig, layers: Sequence[int],
                  devices: Sequence[Any]) -> tuple[str, list[dict[str, int]]]:
    results = [_compile_stats(cfg, config.replace(n_layers=n), devices) for n in layers]
    return results[0][0], [stats for _, stats in results]


def compiled_memory(cfg: PlanConfig) -> CompiledMemory:
    """The compiler's per-device memory analysis of the stage's train step (module docstring):
    in a child process on ``cfg.devices`` simulated CPU devices (``compile="cpu"``), or on this
    process's devices (``compile="local"``, which must number ``cfg.devices``)."""
    config = cfg.model_config()
    layers = _layer_counts(cfg, config.n_layers)
    if cfg.compile == "local":
        if jax.device_count() != cfg.devices:
            raise ConfigError(f"PlanConfig.compile='local' needs {cfg.devices} devices (PlanConfig.devices); "
                              f"this process sees {jax.device_count()}")
        what, stats = _compile_jobs(cfg, config, layers, jax.devices())
        backend = jax.default_backend()
    else:  # the CPU has no cuDNN: there the attention compiles as XLA's
        what, stats = _compile_in_child(cfg, config.replace(attention_impl="xla"), layers)
        backend = "cpu"
    if len(layers) == 2:  # linear in the (unrolled) layers: f(L) = f(k) + (L − k)·(f(k) − f(k − 1))
        extra = config.n_layers - layers[1]
        values = [stats[1][k] + extra * (stats[1][k] - stats[0][k]) for k in _STATS]
    else:
        values = [stats[0][k] for k in _STATS]
    return CompiledMemory(what, backend, cfg.devices, layers, config.n_layers, *values)


def _compile_in_child(cfg: PlanConfig, config: ModelConfig, layers: Sequence[int]) -> tuple[str, list[dict[str, int]]]:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    # LLVM optimisation off: compiles ~2x faster, same HLO passes and buffer assignment.  The
    # concurrency-optimised scheduler (CPU default) trades memory for parallelism: off, the CPU
    # schedule is memory-minimising like the GPU/TPU ones (1.1B SFT step: temp 156 -> 27 GiB).
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={cfg.devices} "
                        "--xla_backend_optimization_level=0 "
                        "--xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    job = json.dumps({"plan": to_dict(dataclasses.replace(cfg, model=config, hf_config=None)),
                      "layers": list(layers)})
    proc = subprocess.run([sys.executable, "-c", "from rlhf_jax.plan.compiled import _child; _child()"],
                          input=job, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"plan: compiling on {cfg.devices} simulated CPU devices failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["program"], out["stats"]


def _child() -> None:
    """Entry point of the compile child process: a job on stdin, the stats as JSON on stdout."""
    job = json.loads(sys.stdin.read())
    cfg = from_dict(PlanConfig, job["plan"], where="plan")
    what, stats = _compile_jobs(cfg, cfg.model_config(), job["layers"], jax.devices())
    print(json.dumps({"program": what, "stats": stats}))
