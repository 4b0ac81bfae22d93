"""Multi-host for real on one machine: two processes on loopback (CPU collectives via gloo), each
with 4 simulated devices, run SFT steps and a PPO-ptx iteration on a data=2 × fsdp=4 mesh and give
the same numbers as one process holding all 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

from _multidevice import REPO

BODY = textwrap.dedent("""
    import json, os, sys
    import jax
    from rlhf_jax.distributed import DistributedConfig, initialize
    n = int(os.environ["MH_NPROC"])
    if n > 1:
        initialize(DistributedConfig(coordinator_address=f"localhost:{os.environ['MH_PORT']}",
                                     num_processes=n, process_id=int(os.environ["MH_PID"])))
    import numpy as np
    from rlhf_jax.generation import GenerateConfig
    from rlhf_jax.model import ModelConfig, Transformer, init_params
    from rlhf_jax.ppo import PPOConfig, PPOModels, init_ppo_state
    from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
    from rlhf_jax.stages.common import init_train_state, jit_on_mesh
    from rlhf_jax.stages.ppo import ppo_step_fn
    from rlhf_jax.stages.sft import sft_step_fn
    from rlhf_jax.train import OptimizerConfig, make_optimizer

    assert jax.device_count() == 8 and jax.process_count() == n
    cfg = ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_len=24)
    policy, value = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
    rng = np.random.default_rng(0)
    def draw(model):
        shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
        return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    pp, vp, rp = draw(policy), draw(value), draw(value)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    opt = OptimizerConfig(lr=1e-2)
    tx = make_optimizer(opt)
    out = {}

    # SFT: two steps (every process passes the same global batch).
    mask = (np.arange(16)[None] < rng.integers(4, 17, 8)[:, None]).astype(np.int32)
    batch = {"tokens": np.where(mask, rng.integers(0, 64, (8, 16)), 0).astype(np.int32), "mask": mask,
             "loss_mask": mask}
    state = init_train_state(pp, tx, jax.random.PRNGKey(1), mesh)
    step = jit_on_mesh(sft_step_fn(policy, opt), mesh, state)
    out["sft"] = []
    for _ in range(2):
        state, m = step(state, batch)
        out["sft"].append(float(m["loss"]))

    # One PPO-ptx iteration (2 epochs x 2 minibatches).
    ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=5, pad_id=0), num_minibatches=2,
                    epochs=2, ptx_coef=0.5)
    pmask = (np.arange(8)[None] >= 8 - rng.integers(3, 9, 8)[:, None]).astype(np.int32)
    pbatch = {"prompt_tokens": np.where(pmask, rng.integers(6, 64, (8, 8)), 0).astype(np.int32), "prompt_mask": pmask,
              "ptx_tokens": rng.integers(1, 64, (16, 12)).astype(np.int32), "ptx_mask": np.ones((16, 12), np.int32)}
    pstate = init_ppo_state(ppo, pp, vp, rp, tx, tx, jax.random.PRNGKey(2))
    pstate = jax.device_put(pstate, state_shardings(pstate, mesh))
    run = jit_on_mesh(ppo_step_fn(PPOModels(policy, value, value), ppo), mesh, pstate)
    pstate, m = run(pstate, pbatch)
    out["ppo"] = {k: float(v) for k, v in m.items()}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out))
""")


def _env(devices: int, nproc: int, pid: int = 0, port: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu", MH_NPROC=str(nproc), MH_PID=str(pid), MH_PORT=str(port),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT "):])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BODY], cwd=REPO, env=_env(4, 2, pid, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-4000:]}"
    two = _result(outs[0][0])
    one_proc = subprocess.run([sys.executable, "-c", BODY], cwd=REPO, env=_env(8, 1), capture_output=True,
                              text=True, timeout=600)
    assert one_proc.returncode == 0, one_proc.stderr[-4000:]
    one = _result(one_proc.stdout)
    assert len(two["sft"]) == 2 and two["sft"][0] != two["sft"][1]
    for a, b in zip(one["sft"], two["sft"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["sft"], two["sft"])
    assert one["ppo"].keys() == two["ppo"].keys()
    for k in one["ppo"]:
        assert abs(one["ppo"][k] - two["ppo"][k]) <= 2e-4 * max(1.0, abs(one["ppo"][k])), (k, one["ppo"][k], two["ppo"][k])
