"""The accelerator checks of issue 18 on one device, bf16 compute and float32 master weights, the
1.1B TinyLlama-shaped Llama with the layers as a scan:

1. **SFT step** at 8 × 2048 tokens: MFU (``flops.train_step_flops`` against the device's dense
   bf16 peak) and its compile time.  Tried with cuDNN attention and no remat first, then the XLA
   attention with the ``dots`` remat policy, then ``full`` remat (the first that runs counts).
   The rows are full and unpacked, as the SFT stage's right-padded rows, so the cuDNN attention
   masks them by their lengths (``model.forward``'s ``right_padded``, since 2026-12-05); should
   cuDNN refuse that form, the same rows given as packed segments (a bias) come next.
2. **Decode** from a bf16 copy of the weights, batch 64 then 32, 128, 256 (prompt 128, 128 new
   tokens, greedy): seconds per step ``(t(128 new) − t(1 new)) / 127`` (prefill removed) against
   the HBM bound (every matmul weight, 2 bytes, plus the KV cache at the mean context, per step).
   The decode is the library's default form, unrolled (``scan_decode=False``), as in the PPO
   rollout.
3. **One PPO-ptx iteration**, 64 prompts × (128 + 128), 4 minibatches, ptx 4 × 8 × 256, with
   the SFT step's attention and remat setting and bf16 rollout weights: its compile time and
   run time; then (after the rest of the decode sweep, budget allowing) the phase split —
   rollout, experience, update, each its own compiled program — against each phase's floor
   (rollout: prefill FLOPs / peak + 128 steps at the HBM bound; experience and update: their
   FLOPs / peak).

Then, budget allowing, the batch-64 decode and the PPO iteration compiled with XLA's command
buffers for while loops and conditionals too (``COMMAND_BUFFERS``, ``ppo_recompiled``): whether
the decode step, 3.5× its bandwidth bound on the 2026-12-04 H200 run, is held back by per-kernel
launches and the loop's host round trips, and what running them as CUDA graphs gives the
iteration.  Then the cuDNN SFT step again with the same rows given as packed segments
(``segment_ids``), which ``jax.nn.dot_product_attention`` masks by a ``[b, 1, T, T]`` bias (and,
in jax releases before PR #39512, the gradient of that bias): what the lengths form saves.

Last, budget allowing, two other forms of the batch-64 decode: with ``ModelConfig.cache_block``
at half the new tokens (three decode loops over caches of 128, 192 and 256 slots), and scanned
(``scan_decode=True``, 1.8× slower than unrolled on that run).

The SFT step that counts and the unrolled batch-64 decode are each run once more under the
profiler (``profile_summary.profile``): their kernels' time by category (matmul, attention,
copy, fusion/other), the top kernels, and the device's busy time against the call's wall time
(``busy_fraction``: well under 1 means launch- or loop-bound), in the part's ``"profile"``.

Order: what issue 18 asks for first (SFT, decode at batch 64, the PPO iteration, the other
decode batches, the phase split), then the command buffers, the packed SFT rows and the other
decode forms.  The
2026-12-04 run, in its old order and a 170 s budget, skipped the sweep at 128 and 256 and the
phase split.  Each part's seconds, compiles included, go to ``"part_s"`` (and ``"setup_s"`` for
the parameters' start), so the next budget can be set from them, and the device memory after it
to ``"memory"`` (``allocator_gib``; none on a CPU); the SFT step and the PPO iteration also carry
the memory plan's estimate (``plan_gib``) and XLA's buffer assignment of their programs
(``compiled_gib``).  JAX may take 90% of the GPU here
(``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set), and PPO's state is dropped after the phase split.
A part is skipped when less of ``--budget-s`` is left than it needs (the skipped parts are
listed in the JSON), and a part that fails records its error and the rest still run.  The JSON
is rewritten after every part; at ``--hard-limit-s`` (default: the budget + 40 s) a watchdog
writes it and exits with code 3 even in the middle of a compile, so the suite's wall time is
bounded and what was measured is kept.

    python -m experiments.benchmarks.gpu_check --json out.json [--budget-s 240] [--dry-run]

``--dry-run``: micro shapes on any backend (checks the wiring; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.benchmarks.common import device_spec, machine_info, timed, write_json
from experiments.benchmarks.flops import decode_step_bytes, forward_flops, train_step_flops
from experiments.benchmarks.profile_summary import profile
from rlhf_jax.generation import GenerateConfig, generate_traced
from rlhf_jax.model import ModelConfig, Transformer, cast_floating, init_params
from rlhf_jax.ppo import (PPOConfig, PPOModels, experience_phase, init_ppo_state, make_ppo_iteration, rollout_phase,
                          update_phase)
from rlhf_jax.plan import GiB
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.stages.sft import sft_step_fn
from rlhf_jax.train import OptimizerConfig, TrainState, make_optimizer
from rlhf_jax.train.memory import MemoryCheckConfig, stage_plan

LLAMA_1B = ModelConfig(arch="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                       d_ff=5632, max_len=2048, tie_embeddings=False, dtype="bfloat16", scan_layers=True,
                       logits_chunk=512)
MICRO = ModelConfig(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                    max_len=64, tie_embeddings=False, dtype="bfloat16", scan_layers=True, logits_chunk=8)

# (attention_impl, remat_policy, packed rows) of the SFT step, best first: the packed form (cuDNN
# masking by a bias) stands in should cuDNN refuse the lengths form
SFT_SETTINGS = (("auto", "none", False), ("auto", "none", True), ("xla", "dots", False), ("xla", "full", False))
# XLA:GPU's command buffers (CUDA graphs) with while loops and conditionals in them too, so that a
# decode loop's steps can run as graphs rather than one launch per kernel and a host round trip per
# step; an option of the compile, not of the process (other backends ignore it)
COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}
# issue 18's targets
TARGETS = {"sft_mfu": 0.45, "decode_hbm_fraction": 0.60, "ppo_iteration_s": 0.8, "ppo_compile_s": 30.0}


@dataclasses.dataclass(frozen=True)
class Shapes:
    sft: tuple[int, int]  # batch, seq
    prompt: int
    new: int
    decode_batches: tuple[int, ...]  # the first is the headline
    ppo_prompts: int
    minibatches: int
    ptx: tuple[int, int, int]  # updates, batch, seq


FULL = Shapes(sft=(8, 2048), prompt=128, new=128, decode_batches=(64, 32, 128, 256), ppo_prompts=64, minibatches=4,
              ptx=(4, 8, 256))
DRY = Shapes(sft=(2, 32), prompt=8, new=8, decode_batches=(4, 2), ppo_prompts=8, minibatches=2, ptx=(2, 2, 16))


def n_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def allocator_gib(device: Any = None) -> dict[str, float] | None:
    """The allocator's figures of ``device`` (default: the first) in GiB, from ``memory_stats``:
    ``in_use`` now, ``peak`` (the process's highest so far: it never falls, so a part that raises
    it is the one that needed more) and ``limit`` (what the allocator may take, after
    ``XLA_PYTHON_CLIENT_MEM_FRACTION``); ``None`` where the backend keeps no such figures (CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    keys = {"in_use": "bytes_in_use", "peak": "peak_bytes_in_use", "limit": "bytes_limit"}
    return {name: stats[key] / GiB for name, key in keys.items() if key in stats}


def planned_gib(stage: str, config: ModelConfig, **shape: Any) -> float:
    """The memory plan's total for one device of this backend (``train.memory.stage_plan``, as a
    stage checks it before compiling: analytic, an upper bound), to set against ``memory``'s
    measured peak."""
    return stage_plan(stage, config, MeshConfig(), MemoryCheckConfig(), **shape).total_bytes / GiB


def compiled_gib(compiled: Any) -> dict[str, float] | None:
    """XLA's buffer assignment of ``compiled`` in GiB (``memory_analysis``: arguments, outputs,
    aliased (donated) and temporaries), as ``rlhf-jax plan --set compile=local`` reads it; None
    where the backend gives none."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {name: getattr(stats, f"{name}_size_in_bytes") / GiB for name in ("argument", "output", "alias", "temp")}


def _compile(fn: Callable, *args: Any, compiler_options: dict[str, str] | None = None) -> tuple[Any, float]:
    """``(compiled, seconds)`` of lowering and compiling the jitted ``fn`` for ``args``, with XLA's
    ``compiler_options`` for this program only."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options)
    return compiled, time.perf_counter() - start


def _iterate(it: Callable, state: Any, ids: Any, ptx: Any, calls: int) -> tuple[Any, list[float], Any]:
    """A warm-up call of the compiled PPO iteration ``it`` (state donated), then ``calls`` timed
    ones: ``(state, seconds per call, the last call's metrics)``."""
    args = (ids, jnp.ones_like(ids), ptx, jnp.ones_like(ptx))
    state, m = it(state, *args)
    jax.block_until_ready(m)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        state, m = it(state, *args)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    return state, times, m


def sft_check(config: ModelConfig, params: Any, shapes: Shapes, peak: float, repeats: int,
              profiled: bool = False, packed: bool = False) -> dict[str, Any]:
    """One SFT setting: compile time, median step time and MFU; ``profiled``: then one more step
    under the profiler (``profile_summary``: its kernels by category, busy against wall).

    The rows are full, as the SFT stage's unpacked (right-padded) rows, which the cuDNN attention
    masks by their lengths; ``packed``: the same rows given as packed ones (``segment_ids``, one
    segment per row), which it masks by a ``[b, 1, T, T]`` bias."""
    model = Transformer(config)
    b, t = shapes.sft
    opt = OptimizerConfig(lr=1e-5)
    state = TrainState.create(jax.tree_util.tree_map(jnp.copy, params), make_optimizer(opt), jax.random.PRNGKey(1))
    toks = jax.random.randint(jax.random.PRNGKey(2), (b, t), 0, config.vocab_size)
    batch = {"tokens": toks, "mask": jnp.ones_like(toks), "loss_mask": jnp.ones_like(toks)}
    if packed:
        batch.update(segment_ids=jnp.ones_like(toks), positions=jnp.broadcast_to(jnp.arange(t), (b, t)))
    step, compile_s = _compile(jax.jit(sft_step_fn(model, opt), donate_argnums=0), state, batch)
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = train_step_flops(config, b, t)
    out = {"batch": b, "seq": t, "attention_impl": config.attention_impl, "remat_policy": config.remat_policy,
           "rows": "packed" if packed else "right padded", "step_s": step_s, "times": times, "compile_s": compile_s,
           "tokens_per_s": b * t / step_s,
           "flops": flops, "mfu": flops / step_s / peak, "loss": float(m["loss"]),
           "plan_gib": planned_gib("sft", config, batch_size=b, seq_len=t), "compiled_gib": compiled_gib(step)}
    if profiled:
        def one_step() -> None:
            nonlocal state
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)

        out["profile"] = profile(one_step)
    return out


def decode_check(config: ModelConfig, params16: Any, batch: int, shapes: Shapes, bandwidth: float,
                 repeats: int, profiled: bool = False,
                 compiler_options: dict[str, str] | None = None) -> dict[str, Any]:
    """Seconds per decode step from bf16 weights (prefill removed) against the HBM bound;
    ``profiled``: then one more ``new``-token call under the profiler (as in ``sft_check``);
    ``compiler_options``: XLA options for these two programs only (``Lowered.compile``)."""
    model = Transformer(config)
    ids = jax.random.randint(jax.random.PRNGKey(3), (batch, shapes.prompt), 0, config.vocab_size)
    mask = jnp.ones_like(ids)
    key = jax.random.PRNGKey(4)
    jitted = jax.jit(generate_traced, static_argnames=("model", "config"))  # generate's program, compiled here

    def run(new: int) -> Callable[[], Any]:
        """A blocking call of the program for ``new`` tokens, compiled here."""
        gen = GenerateConfig(max_new_tokens=new, greedy=True)
        compiled = jitted.lower(model, params16, ids, mask, key, gen).compile(compiler_options)
        return lambda: jax.block_until_ready(compiled(params16, ids, mask, key).tokens)

    start = time.perf_counter()
    full, one = run(shapes.new), run(1)
    full(), one()
    compile_s = time.perf_counter() - start  # both programs' compiles and first calls
    full_t, one_t = [], []
    for _ in range(repeats):
        full_t.append(timed(full))
        one_t.append(timed(one))
    full_s, one_s = statistics.median(full_t), statistics.median(one_t)
    step_s = max(full_s - one_s, 1e-9) / (shapes.new - 1)
    context = shapes.prompt + shapes.new / 2
    step_bytes = decode_step_bytes(config, batch, context, weight_bytes=2)
    bound_s = step_bytes / bandwidth
    out = {"batch": batch, "scan_decode": config.scan_decode, "cache_block": config.cache_block,
           "compiler_options": compiler_options or {},
           "prompt": shapes.prompt, "new": shapes.new,
           "step_s": step_s, "full_s": full_s,
           "one_token_s": one_s, "tokens_per_s": batch / step_s, "compile_s": compile_s, "step_bytes": step_bytes,
           "hbm_bound_step_s": bound_s, "hbm_bound_fraction": bound_s / step_s, "weights": "bfloat16 copy"}
    if profiled:
        out["profile"] = profile(full)
    return out


def ppo_check(config: ModelConfig, params: Any, shapes: Shapes, peak: float, bandwidth: float) -> dict[str, Any]:
    """Compile and run one PPO-ptx iteration.  The returned ``"run"`` entry (not written to the
    JSON) holds what ``ppo_phases`` needs."""
    model = Transformer(config)
    value = Transformer(config.replace(head="scalar"))
    vparams = init_params(value, jax.random.PRNGKey(5))
    ppo = PPOConfig(generation=GenerateConfig(max_new_tokens=shapes.new), num_minibatches=shapes.minibatches,
                    ptx_coef=1.0)
    tx = optax.adam(1e-6)
    models = PPOModels(model, value, value)
    state = init_ppo_state(ppo, params, vparams, vparams, tx, tx, jax.random.PRNGKey(6))
    b, p, n = shapes.ppo_prompts, shapes.prompt, shapes.new
    ids = jax.random.randint(jax.random.PRNGKey(7), (b, p), 0, config.vocab_size)
    ones = jnp.ones_like(ids)
    ptx = jax.random.randint(jax.random.PRNGKey(8), shapes.ptx, 0, config.vocab_size)
    it, compile_s = _compile(make_ppo_iteration(models, ppo), state, ids, ones, ptx, jnp.ones_like(ptx))
    state, times, m = _iterate(it, state, ids, ptx, 2)
    t = p + n
    floors = {  # seconds no implementation can beat on this device
        "rollout": forward_flops(config, b, p) / peak + n * decode_step_bytes(config, b, p + n / 2, 2) / bandwidth,
        "experience": (2 * forward_flops(config, b, t) + forward_flops(config.replace(head="scalar"), b, t)) / peak,
        "update": (train_step_flops(config, b, t) + train_step_flops(config, *shapes.ptx[1:]) * shapes.ptx[0]
                   + train_step_flops(config.replace(head="scalar"), b, t)) / peak,
    }
    return {"prompts": b, "prompt": p, "new": n, "minibatches": shapes.minibatches, "ptx": list(shapes.ptx),
            "attention_impl": config.attention_impl, "remat_policy": config.remat_policy,
            "compile_s": compile_s, "iteration_s": statistics.median(times), "times": times,
            "kl": float(m["kl"]), "vf_loss": float(m["vf_loss"]), "floors_s": floors,
            "plan_gib": planned_gib("ppo", config, batch_size=b, prompt_len=p, max_new_tokens=n,
                                    ppo_minibatches=shapes.minibatches, ptx_batch_size=shapes.ptx[1],
                                    seq_len=shapes.ptx[2]),
            "compiled_gib": compiled_gib(it),
            "floor_s": sum(floors.values()), "run": (models, ppo, state, ids, ptx)}


def ppo_recompiled(run: tuple, compiler_options: dict[str, str]) -> dict[str, Any]:
    """The PPO iteration of ``ppo_check`` compiled again with XLA's ``compiler_options`` (its
    rollout's decode loop under ``COMMAND_BUFFERS``: does the iteration, 1.30 s on the 2026-12-04
    H200 run, come closer to 0.8 s when the decode steps run as CUDA graphs?), from the state
    ``run`` holds, which it donates: compile and run time as ``ppo_check``'s."""
    models, ppo, state, ids, ptx = run
    it, compile_s = _compile(make_ppo_iteration(models, ppo), state, ids, jnp.ones_like(ids), ptx,
                             jnp.ones_like(ptx), compiler_options=compiler_options)
    _, times, m = _iterate(it, state, ids, ptx, 2)
    return {"compiler_options": compiler_options, "compile_s": compile_s, "iteration_s": statistics.median(times),
            "times": times, "kl": float(m["kl"])}


def ppo_phases(run: tuple, floors: dict[str, float]) -> dict[str, Any]:
    """The iteration's phases as three compiled programs (rollout, experience, update): their
    compile-inclusive first call, then one timed call each, against each phase's floor."""
    models, ppo, state, ids, ptx = run
    ones, ptx_mask, key = jnp.ones_like(ids), jnp.ones_like(ptx), jax.random.PRNGKey(9)
    roll = jax.jit(rollout_phase, static_argnums=(0, 1))
    expf = jax.jit(experience_phase, static_argnums=(0, 1))
    upd = jax.jit(update_phase, static_argnums=(0, 1))
    start = time.perf_counter()
    ro = jax.block_until_ready(roll(models, ppo, state, ids, ones, key))
    exp = jax.block_until_ready(expf(models, ppo, state, ro))
    jax.block_until_ready(upd(models, ppo, state, exp, ptx, ptx_mask, key))
    compile_s = time.perf_counter() - start
    phases = {
        "rollout": timed(lambda: jax.block_until_ready(roll(models, ppo, state, ids, ones, key))),
        "experience": timed(lambda: jax.block_until_ready(expf(models, ppo, state, ro))),
        "update": timed(lambda: jax.block_until_ready(upd(models, ppo, state, exp, ptx, ptx_mask, key))),
    }
    return {"phases_s": phases, "phase_vs_floor": {k: floors[k] / v for k, v in phases.items()},
            "first_calls_s": compile_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the data sheet's)")
    ap.add_argument("--hbm-tbps", type=float, default=None, help="HBM bandwidth (default: the data sheet's)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the parts left once this is spent (default 240 s; a dry run: no limit)")
    ap.add_argument("--hard-limit-s", type=float, default=None,
                    help="write what was measured and exit (code 3) at this many seconds, even inside a compile "
                         "(default: the budget + 40 s)")
    ap.add_argument("--dry-run", action="store_true", help="micro shapes (any backend): checks the wiring")
    args = ap.parse_args(argv)
    # The process is alone on its GPU: let JAX's allocator take 90% of it, not its default 75%
    # (before anything starts the backend).  On an H100's 80 GB that is 72 GB against 60.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    start = time.time()
    budget = args.budget_s if args.budget_s is not None else float("inf") if args.dry_run else 240.0
    budget_left = lambda: budget - (time.time() - start)  # noqa: E731
    spec = device_spec(jax.devices()[0].device_kind) or {"bf16_flops": 989e12, "hbm_bytes_s": 4.8e12}
    peak = 1e12 * args.peak_tflops if args.peak_tflops else spec["bf16_flops"]
    bandwidth = 1e12 * args.hbm_tbps if args.hbm_tbps else spec["hbm_bytes_s"]
    config, shapes, repeats = (MICRO, DRY, 1) if args.dry_run else (LLAMA_1B, FULL, 3)
    params = jax.block_until_ready(init_params(Transformer(config), jax.random.PRNGKey(0)))
    result: dict[str, Any] = {"machine": machine_info(), "dry_run": args.dry_run, "params": n_params(params),
                              "config": dataclasses.asdict(config), "peak_flops": peak, "hbm_bytes_s": bandwidth,
                              "targets": TARGETS, "errors": {}, "skipped": [], "setup_s": time.time() - start,
                              "part_s": {}, "memory": {}}
    print({k: result[k] for k in ("params", "peak_flops", "hbm_bytes_s", "setup_s")}, result["machine"]["devices"],
          flush=True)
    if args.json:  # rewritten after every part, so a run cut short still leaves its figures
        write_json(args.json, result)
    hard_limit = args.hard_limit_s if args.hard_limit_s is not None else budget + 40

    def watchdog() -> None:
        time.sleep(max(hard_limit - (time.time() - start), 0))
        result["killed_at_s"] = time.time() - start
        print(f"gpu_check: hard limit of {hard_limit:.0f} s reached; writing what was measured and exiting", flush=True)
        if args.json:
            write_json(args.json, result)
        os._exit(3)

    if hard_limit != float("inf"):
        threading.Thread(target=watchdog, daemon=True).start()

    def save() -> None:
        if args.json:
            write_json(args.json, result)

    def part(name: str, fn: Callable[[], Any], min_left: float, store: Callable[[Any], None]) -> Any:
        """Run one part unless the budget is spent; ``store`` its result into ``result``, then save."""
        if budget_left() < min_left:
            result["skipped"].append(name)
            print(f"{name}: skipped (budget)", flush=True)
            return None
        part_start, error = time.time(), None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - record it and go on with the other parts
            result["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            error = traceback.format_exc()[-3000:]
        seconds = result["part_s"][name] = time.time() - part_start
        memory = allocator_gib()
        if memory is not None:  # after a failure too: whether it ran out of memory
            result["memory"][name] = memory
        used = "" if memory is None else ", device memory GiB " + " ".join(f"{k} {v:.1f}" for k, v in memory.items())
        if error is not None:
            print(f"{name}: FAILED after {seconds:.0f} s{used}\n{error}", flush=True)
            save()
            return None
        print(f"{name} ({seconds:.0f} s, {time.time() - start:.0f} s in all{used})",
              {k: v for k, v in out.items() if not isinstance(v, (list, dict, tuple))}, flush=True)
        if memory is not None:
            out["memory"] = memory
        store(out)
        save()
        return out

    settings = {"attention_impl": "xla", "remat_policy": "dots"}  # for PPO when no SFT setting ran
    by_lengths = False  # the counted SFT step had the cuDNN attention mask its rows by lengths
    for impl, policy, packed in SFT_SETTINGS:
        sft = part(f"sft[{impl},{policy}{',packed' if packed else ''}]",
                   lambda: sft_check(config.replace(attention_impl=impl, remat_policy=policy), params, shapes, peak,
                                     repeats, profiled=True, packed=packed), 0, lambda out: result.update(sft=out))
        if sft is not None:
            settings = {"attention_impl": impl, "remat_policy": policy}
            by_lengths = impl == "auto" and not packed
            break

    params16 = cast_floating(params, jnp.bfloat16)
    batches = shapes.decode_batches
    result["decode"], result["headline_decode_batch"] = [], batches[0]
    part(f"decode[{batches[0]}]", lambda: decode_check(config, params16, batches[0], shapes, bandwidth, repeats,
                                                      profiled=True), 0, result["decode"].append)
    run: list[Any] = []
    ppo = part("ppo", lambda: ppo_check(config.replace(**settings), params, shapes, peak, bandwidth), 0,
               lambda out: (run.append(out.pop("run")), result.update(ppo=out)))
    for batch in batches[1:]:  # the rest of the sweep, then the phase split, while the budget lasts
        part(f"decode[{batch}]", lambda: decode_check(config, params16, batch, shapes, bandwidth, 2), 30,
             result["decode"].append)
    if ppo is not None:
        part("ppo_phases", lambda: ppo_phases(run[0], ppo["floors_s"]), 40, result["ppo"].update)
    # the headline decode, then the PPO iteration, under XLA's command buffers (CUDA graphs)
    part(f"decode[{batches[0]},command_buffers]",
         lambda: decode_check(config, params16, batches[0], shapes, bandwidth, 2, compiler_options=COMMAND_BUFFERS),
         25, result["decode"].append)
    if ppo is not None:
        part("ppo[command_buffers]", lambda: ppo_recompiled(run[0], COMMAND_BUFFERS), 40,
             lambda out: result["ppo"].update(command_buffers=out))
    run.clear()  # the PPO state (two 1.1B models with their Adam moments) is not needed after this
    if by_lengths:  # what the cuDNN attention's bias form costs (the same rows given as packed)
        part("sft[auto,none,packed]",
             lambda: sft_check(config.replace(**settings), params, shapes, peak, repeats, packed=True), 30,
             lambda out: result.update(sft_packed=out))
    # other forms of the headline decode: with the cache grown in two blocks past the prompt, scanned
    block = shapes.new // 2
    part(f"decode[{batches[0]},cache_block={block}]",
         lambda: decode_check(config.replace(cache_block=block), params16, batches[0], shapes, bandwidth, 2), 40,
         result["decode"].append)
    part(f"decode[{batches[0]},scan_decode=True]",
         lambda: decode_check(config.replace(scan_decode=True), params16, batches[0], shapes, bandwidth, 2), 20,
         result["decode"].append)
    result["seconds"] = time.time() - start
    save()
    print(f"gpu_check done in {result['seconds']:.0f} s; skipped {result['skipped']}, failed {list(result['errors'])}",
          flush=True)


if __name__ == "__main__":
    main()
