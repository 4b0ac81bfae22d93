"""bf16 checks on one accelerator: a ~1B Llama's SFT step (MFU), generation (tokens/s against the
HBM bandwidth bound) and one PPO-ptx iteration, all with float32 master weights and bfloat16
compute.  Writes JSON to ``--json`` and prints a table.

    python -m experiments.benchmarks.gpu_check --json out.json [--budget-s 300]

MFU counts 6·N·tokens plus the attention score/value FLOPs (forward + backward) against the
device's dense bf16 peak (``--peak-tflops``, default 989 for H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.ppo import PPOConfig, PPOModels, init_ppo_state, make_ppo_iteration
from rlhf_jax.stages.sft import sft_step_fn
from rlhf_jax.train import OptimizerConfig, TrainState, make_optimizer

LLAMA_1B = ModelConfig(arch="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                       d_ff=5632, max_len=2048, tie_embeddings=False, dtype="bfloat16", remat=True)


def n_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def timed(fn, *args, repeats: int = 3):
    out = jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)  # H200; H100 SXM: 3.35
    ap.add_argument("--budget-s", type=float, default=300.0)
    args = ap.parse_args()
    start = time.time()
    cfg = LLAMA_1B
    model = Transformer(cfg)
    params = init_params(model, jax.random.PRNGKey(0))
    n = n_params(params)
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "params": n}
    print(result, flush=True)

    # SFT step: batch 8 x 1024, AdamW, bf16 compute, f32 master weights, remat per layer.
    b, t = 8, 1024
    opt = OptimizerConfig(lr=1e-5)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), make_optimizer(opt), jax.random.PRNGKey(1))
    toks = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, cfg.vocab_size)
    batch = {"tokens": toks, "mask": jnp.ones_like(toks), "loss_mask": jnp.ones_like(toks)}
    step = jax.jit(sft_step_fn(model, opt), donate_argnums=0)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t1 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t1)
    step_s = float(np.median(times))
    flops = 6 * n * b * t + 12 * cfg.n_layers * cfg.d_model * t * t * b / 2  # causal attention, fwd+bwd
    result["sft"] = {"batch": b, "seq": t, "step_s": step_s, "compile_s": compile_s, "tokens_per_s": b * t / step_s,
                     "mfu": flops / step_s / (args.peak_tflops * 1e12), "loss": float(m["loss"])}
    print("sft", result["sft"], flush=True)
    del state

    # Generation: batch 32, prompt 128, 128 new tokens, greedy, no EOS.
    gen = GenerateConfig(max_new_tokens=128, greedy=True)
    prompts = jax.random.randint(jax.random.PRNGKey(3), (32, 128), 0, cfg.vocab_size)
    run = lambda: generate(model, params, prompts, jnp.ones_like(prompts), jax.random.PRNGKey(4), gen)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run().tokens)
    gcompile = time.perf_counter() - t0
    _, gen_s = timed(lambda: run().tokens)
    # Bound: each decode step reads the (f32 master) weights once, plus the KV cache.
    weight_bytes = 4 * n
    cache_bytes = 2 * cfg.n_layers * 32 * 256 * cfg.kv_heads * cfg.head_dim * 2
    bound_s = 128 * (weight_bytes + cache_bytes) / (args.hbm_tbps * 1e12)
    result["generate"] = {"batch": 32, "prompt": 128, "new": 128, "s": gen_s, "compile_s": gcompile,
                          "tokens_per_s": 32 * 128 / gen_s, "hbm_bound_fraction": bound_s / gen_s}
    print("generate", result["generate"], flush=True)

    # One PPO-ptx iteration, if the budget allows: 64 prompts of 128, 128 new, 4 minibatches.
    if time.time() - start < args.budget_s * 0.5:
        value = Transformer(cfg.replace(head="scalar"))
        vparams = init_params(value, jax.random.PRNGKey(5))
        ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=128), num_minibatches=4, ptx_coef=1.0)
        tx = optax.adam(1e-6)
        pstate = init_ppo_state(ppo, params, vparams, vparams, tx, tx, jax.random.PRNGKey(6))
        del params
        it = make_ppo_iteration(PPOModels(model, value, value), ppo)
        ids = jax.random.randint(jax.random.PRNGKey(7), (64, 128), 0, cfg.vocab_size)
        ptx = jax.random.randint(jax.random.PRNGKey(8), (4, 8, 256), 0, cfg.vocab_size)
        t0 = time.perf_counter()
        pstate, pm = it(pstate, ids, jnp.ones_like(ids), ptx, jnp.ones_like(ptx))
        jax.block_until_ready(pm)
        pcompile = time.perf_counter() - t0
        t0 = time.perf_counter()
        pstate, pm = it(pstate, ids, jnp.ones_like(ids), ptx, jnp.ones_like(ptx))
        jax.block_until_ready(pm)
        result["ppo"] = {"prompts": 64, "new": 128, "iteration_s": time.perf_counter() - t0,
                         "first_call_s": pcompile, "kl": float(pm["kl"]), "vf_loss": float(pm["vf_loss"])}
        print("ppo", result["ppo"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
