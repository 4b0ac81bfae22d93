"""Multi-host for real on one machine: two processes on loopback (CPU collectives via gloo), each
with 4 simulated devices, on a data=2 × fsdp=4 mesh, loading data per process: the stages' own
data paths (``stages.sft.train_batches``, ``stages.rollouts.prompt_batches``) read only that
process's records of the JSONL files, and its rows become its devices' shards of the global batch
(``jax.make_array_from_process_local_data``).  Two SFT steps (from ``setup_training``) and one
PPO-ptx iteration must give the same numbers as one process holding all 8 devices, fed the global
batches spelled out independently: for each step, process p's part of the file (every second
record from p), its own shuffle, the rows evened and the widths padded to the widest, process 0's
rows first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from _multidevice import REPO
from rlhf_jax.tasks import make_world_files
from rlhf_jax.tokenizer import Tokenizer

BODY = textwrap.dedent("""
    import json, os, sys
    import jax
    from rlhf_jax.distributed import DistributedConfig, initialize
    n = int(os.environ["MH_NPROC"])
    if n > 1:
        initialize(DistributedConfig(coordinator_address=f"localhost:{os.environ['MH_PORT']}",
                                     num_processes=n, process_id=int(os.environ["MH_PID"])))
    import numpy as np
    from rlhf_jax.data import BatchIterator, read_pretrain_texts, tokenize_texts
    from rlhf_jax.generation import GenerateConfig
    from rlhf_jax.model import ModelConfig, Transformer, init_params
    from rlhf_jax.ppo import PPOConfig, PPOModels, init_ppo_state
    from rlhf_jax.sharding import MeshConfig, make_mesh, process_data_shard, state_shardings
    from rlhf_jax.stages import sft as sft_stage, ppo as ppo_stage
    from rlhf_jax.stages.config import StageOptimizerConfig, stage_optimizer
    from rlhf_jax.stages.rollouts import prompt_arrays, prompt_batches
    from rlhf_jax.stages.sources import ModelSource
    from rlhf_jax.stages.steps import jit_on_mesh, setup_training
    from rlhf_jax.stages.sft import SFTConfig, sft_step_fn
    from rlhf_jax.tokenizer import Tokenizer
    from rlhf_jax.train import OptimizerConfig, make_optimizer

    files = json.loads(os.environ["MH_FILES"])
    assert jax.device_count() == 8 and jax.process_count() == n
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    if n > 1:  # process p's devices hold data row p of the mesh: its rows come p-th in the batch
        assert process_data_shard(mesh) == (jax.process_index(), 2)
        assert {d.process_index for d in mesh.devices[jax.process_index()].flat} == {jax.process_index()}
    tokenizer = Tokenizer.from_file(files["tokenizer"])
    pads = {"tokens": tokenizer.pad_id}

    def pad(batch, width):
        return {k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, width - v.shape[-1])], constant_values=pads.get(k, 0))
                for k, v in batch.items()}

    def global_batches(parts, width_key=None):
        '''Reference (one process): the global batches of per-process loading, from each part's
        iterator, process 0's rows first (widths padded to the widest part's when bucketed).'''
        while True:
            batches = [next(it) for it in parts]
            width = max(b[width_key].shape[-1] for b in batches) if width_key else None
            batches = [pad(b, width) if width_key else b for b in batches]
            yield {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def evened(parts):
        rows = min(len(p["tokens"]) for p in parts)
        return [{k: v[:rows] for k, v in p.items()} for p in parts]

    out = {}

    # SFT: two steps of the stage's data path and train step (a GPT-2 initialised from the seed).
    buckets = (16, 32, 64)
    sft = SFTConfig(workdir="unused", model=ModelSource(init=ModelConfig(arch="gpt2", vocab_size=tokenizer.vocab_size,
                    d_model=32, n_layers=2, n_heads=2, max_len=64)), train_data=files["demos"], batch_size=8,
                    buckets=buckets, optimizer=StageOptimizerConfig(schedule="cosine", lr=1e-2, total_steps=2))
    if n > 1:
        batches = sft_stage.train_batches(sft, tokenizer, buckets, mesh)
    else:
        parts = evened([sft_stage.demonstration_arrays(files["demos"], tokenizer, buckets, shard_index=p,
                                                       shard_count=2)[1] for p in (0, 1)])
        width = max(p["mask"].shape[-1] for p in parts)
        parts = [BatchIterator(pad(p, width), 4, seed=sft.seed, buckets=buckets) for p in parts]
        batches = global_batches(parts, "mask")
    training = setup_training(sft, "lm", stage_optimizer(sft, 2), sft_step_fn, mesh)
    state, out["sft"], out["sft_width"] = training.state, [], []
    for _ in range(2):
        batch = next(batches)
        state, m = training.train_step(state, batch)
        out["sft"].append(float(m["loss"]))
        out["sft_width"].append(batch["tokens"].shape[-1])

    # One PPO-ptx iteration (2 epochs x 2 minibatches) on the PPO stage's prompt and ptx batches.
    cfg = ModelConfig(arch="gpt2", vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, max_len=32)
    policy, value = Transformer(cfg), Transformer(cfg.replace(head="scalar"))
    rng = np.random.default_rng(0)
    def draw(model):
        shapes = jax.eval_shape(lambda k: init_params(model, k), jax.random.PRNGKey(0))
        return jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    pp, vp, rp = draw(policy), draw(value), draw(value)
    ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=6, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id),
                    num_minibatches=2, epochs=2, ptx_coef=0.5)
    stage = ppo_stage.PPOStageConfig(workdir="unused", model=sft.model, reward_model="unused", train_data=files["prompts"],
                                     ptx_data=files["pretrain"], ptx_batch_size=4, ptx_seq_len=12, batch_size=8,
                                     max_prompt_len=24, ppo=ppo)
    if n > 1:
        pbatch = next(prompt_batches(stage, ppo, tokenizer, mesh)[0])
    else:
        prompts = evened([prompt_arrays(files["prompts"], tokenizer, 24, p, 2) for p in (0, 1)])
        ptx = evened([tokenize_texts([r.text for r in read_pretrain_texts(files["pretrain"], shard_index=p,
                                                                          shard_count=2)], tokenizer, 12) for p in (0, 1)])
        prompt = next(global_batches([BatchIterator(p, 4, seed=stage.seed) for p in prompts]))
        blocks = next(global_batches([BatchIterator({"tokens": p["tokens"], "mask": p["mask"]}, 8, seed=stage.seed + 1)
                                      for p in ptx]))
        pbatch = {**{f"prompt_{k}": v for k, v in prompt.items()}, **{f"ptx_{k}": v for k, v in blocks.items()}}
    tx = make_optimizer(OptimizerConfig(lr=1e-2))
    pstate = init_ppo_state(ppo, pp, vp, rp, tx, tx, jax.random.PRNGKey(2))
    pstate = jax.device_put(pstate, state_shardings(pstate, mesh))
    run = jit_on_mesh(ppo_stage.ppo_step_fn(PPOModels(policy, value, value), ppo), mesh, pstate, process_local=True)
    pstate, m = run(pstate, pbatch)
    out["ppo"] = {k: float(v) for k, v in m.items()}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(out))
""")


def _env(devices: int, nproc: int, files: dict[str, str], pid: int = 0, port: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu", MH_NPROC=str(nproc), MH_PID=str(pid), MH_PORT=str(port), MH_FILES=json.dumps(files),
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


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """World JSONL files (odd record counts: the parts are evened) and a BPE tokenizer on them."""
    root = tmp_path_factory.mktemp("multihost")
    world = make_world_files(root, 0, n_pretrain=41, n_demos=41, n_prompts=33, n_eval_demos=0, n_eval_prompts=0)
    texts = [" ".join(v for v in json.loads(line).values() if isinstance(v, str))
             for name in ("pretrain", "prompts", "demos") for line in world[name].read_text().splitlines() if line.strip()]
    return {**{k: str(v) for k, v in world.items()}, "tokenizer": str(Tokenizer.train(texts, 320).save(root / "tok"))}


def test_two_processes_equal_one_process(files):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BODY], cwd=REPO, env=_env(4, 2, files, pid, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-4000:]}"
    two = _result(outs[0][0])
    one_proc = subprocess.run([sys.executable, "-c", BODY], cwd=REPO, env=_env(8, 1, files), capture_output=True,
                              text=True, timeout=600)
    assert one_proc.returncode == 0, one_proc.stderr[-4000:]
    one = _result(one_proc.stdout)
    assert len(two["sft"]) == 2 and two["sft"][0] != two["sft"][1]
    assert two["sft_width"] == one["sft_width"]
    for a, b in zip(one["sft"], two["sft"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one["sft"], two["sft"])
    assert one["ppo"].keys() == two["ppo"].keys()
    for k in one["ppo"]:
        assert abs(one["ppo"][k] - two["ppo"][k]) <= 2e-4 * max(1.0, abs(one["ppo"][k])), (k, one["ppo"][k], two["ppo"][k])
