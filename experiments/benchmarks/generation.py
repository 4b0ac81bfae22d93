"""Generation throughput: ``rlhf_jax.generate`` vs Hugging Face ``transformers.generate`` (PyTorch).

Both run the same randomly initialised GPT-2 (built by ``transformers``, saved with
``save_pretrained`` and imported with ``rlhf_jax.hf.load_pretrained``), on the same prompts, with
the same decoding (greedy by default, or top-k sampling with ``--top-k``) and no early stop
(HF: ``min_new_tokens = max_new_tokens``; ours: ``eos_id=None``). Runs alternate between the two
and the table reports medians, our compile time separately, and the fraction of the machine's
matmul peak (a large float32 matmul measured here, the better of JAX and PyTorch) that each
reaches on the model's FLOPs.

``--data-parallel N`` runs our side on N simulated host devices (``jax_num_cpu_devices``), the
prompts split over a ``data`` mesh axis and the weights replicated (``shard_params``: one host
buffer that every device reads, not a copy each): each device decodes its share
of the batch on its own thread, which is how XLA uses a second core for these small, per-step
matmuls (PyTorch uses its intra-op threads on every matmul). The table says which setting ran.

    python -m experiments.benchmarks.generation [--quick] [--models tiny small] [--top-k K]
        [--data-parallel N] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
import torch
import transformers

from experiments.benchmarks.common import (
    format_table,
    machine_info,
    measure_matmul_peak,
    median_time,
    timed,
    write_json,
)
from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.hf import load_pretrained
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    batch: int = 32
    prompt: int = 32
    new: int = 64


CASES = (
    Case("tiny", "gpt2-tiny (4L, d=256, V=1024)", n_layer=4, n_embd=256, n_head=4, vocab=1024),
    Case("small", "gpt2-small (124M)", n_layer=12, n_embd=768, n_head=12, vocab=50257),
)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, dict[str, float]]:
    """Float32 ``[n, n] @ [n, n]`` FLOP/s of JAX (``common.measure_matmul_peak``) and PyTorch
    (median and best of ``repeats``)."""
    jax_peak = measure_matmul_peak(n, repeats)
    t = torch.from_numpy(np.random.default_rng(0).standard_normal((n, n), np.float32))
    with torch.no_grad():
        med, times = median_time(lambda: t @ t, repeats)
    flops = 2.0 * n**3
    return {"jax": jax_peak, "torch": {"median": flops / med, "best": flops / min(times), "n": n, "repeats": repeats}}


def _compile_seconds(fn) -> float:
    """Seconds ``fn()`` spends tracing, lowering and compiling (JAX's compile-duration events)."""
    spent = []

    def listen(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            spent.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return sum(spent)


def model_flops(case: Case) -> float:
    """Matmul FLOPs of the work both implementations must do: 2·(matmul params) per token for the
    prompt (prefill) and each new token's step, the unembedding for the N sampled positions only,
    and attention (QKᵀ and AV, 4·d per attended key per layer) over the keys each query sees."""
    d, layers = case.n_embd, case.n_layer
    block = layers * (4 * d * d + 2 * d * 4 * d)  # q, k, v, o + MLP (fc, proj)
    head = d * case.vocab
    p, n = case.prompt, case.new
    attended = p * (p + 1) / 2 + sum(p + i for i in range(1, n))  # keys seen by each processed token
    tokens_through_blocks = p + n - 1  # the last sampled token is never fed back
    return case.batch * (2 * block * tokens_through_blocks + 2 * head * n + 4 * d * layers * attended)


def run_case(case: Case, repeats: int, top_k: int, workdir: Path, mesh: Mesh | None = None) -> dict:
    hf_config = transformers.GPT2Config(
        vocab_size=case.vocab, n_positions=max(1024, case.prompt + case.new), n_embd=case.n_embd,
        n_layer=case.n_layer, n_head=case.n_head, bos_token_id=case.vocab - 1, eos_token_id=case.vocab - 1)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    path = workdir / case.key
    hf_model.save_pretrained(path)
    model, params = load_pretrained(path)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, case.vocab, size=(case.batch, case.prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    config = GenerateConfig(case.new, greedy=top_k == 0, top_k=top_k)
    hf_kwargs = dict(max_new_tokens=case.new, min_new_tokens=case.new, pad_token_id=0,
                     do_sample=top_k > 0, top_k=top_k if top_k else None)
    ids_t, mask_t = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    key = jax.random.key(0)
    ids_j, mask_j = ids, mask
    if mesh is not None:  # weights replicated (one host buffer for all devices), prompts split
        params = shard_params(params, mesh)
        ids_j, mask_j = shard_batch((ids, mask), mesh)

    def ours() -> jax.Array:
        if mesh is None:
            return jax.block_until_ready(generate(model, params, ids_j, mask_j, key, config).tokens)
        with jax.set_mesh(mesh):
            return jax.block_until_ready(generate(model, params, ids_j, mask_j, key, config).tokens)

    def hf() -> torch.Tensor:
        with torch.no_grad():
            return hf_model.generate(input_ids=ids_t, attention_mask=mask_t, **hf_kwargs)

    compile_s = _compile_seconds(ours)
    hf_first = timed(hf)
    times, hf_times = [], []
    for _ in range(repeats):  # alternate so that machine load hits both alike
        times.append(timed(ours))
        hf_times.append(timed(hf))
    same = float((np.asarray(ours()) == hf().numpy()).mean()) if top_k == 0 else None  # sampled: n/a
    ours_s, hf_s = statistics.median(times), statistics.median(hf_times)
    new_tokens = case.batch * case.new
    return {
        "case": case.name, **dataclasses.asdict(case), "top_k": top_k, "repeats": repeats,
        "ours_s": ours_s, "hf_s": hf_s, "ours_tok_s": new_tokens / ours_s, "hf_tok_s": new_tokens / hf_s,
        "ratio": hf_s / ours_s, "compile_s": compile_s, "hf_first_s": hf_first,
        "ours_times": times, "hf_times": hf_times, "flops": model_flops(case),
        "greedy_token_agreement": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed run per side instead of 3")
    parser.add_argument("--models", nargs="+", choices=[c.key for c in CASES], default=[c.key for c in CASES])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3, quick 1)")
    parser.add_argument("--top-k", type=int, default=0, help="sample with this top-k on both sides (0 = greedy)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help="our side on N simulated host devices, batch split over them (default 1)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.data_parallel < 1 or any(c.batch % args.data_parallel for c in CASES):
        parser.error(f"--data-parallel must be >= 1 and divide the batch (got {args.data_parallel})")
    if args.data_parallel > 1:  # before anything starts the CPU backend
        jax.config.update("jax_num_cpu_devices", args.data_parallel)
    mesh = make_mesh(MeshConfig(data=args.data_parallel, fsdp=1)) if args.data_parallel > 1 else None
    repeats = args.repeats or (1 if args.quick else 3)
    cases = [c for c in CASES if c.key in args.models]

    machine = machine_info()
    peak = matmul_peak()
    best = max(peak["jax"]["median"], peak["torch"]["median"])  # what the same load lets a matmul reach
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            r = run_case(case, repeats, args.top_k, Path(tmp), mesh)
            r["ours_peak_frac"] = r["flops"] / r["ours_s"] / best
            r["hf_peak_frac"] = r["flops"] / r["hf_s"] / best
            results.append(r)
    load_after = os.getloadavg()

    print(f"jax {jax.__version__} ({machine['backend']}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, {machine['cpu_count']} CPUs")
    print(f"load average (1 min): {machine['load_avg'][0]:.1f} before, {load_after[0]:.1f} after "
          f"(other processes slow both sides, PyTorch's OpenMP threads most)")
    print(f"matmul peak (2048² f32, median): jax {peak['jax']['median'] / 1e9:.1f} GFLOP/s, "
          f"torch {peak['torch']['median'] / 1e9:.1f} GFLOP/s; %peak divides by the larger")
    print(f"decoding: {'greedy' if args.top_k == 0 else f'top-k {args.top_k}'}, no EOS stop, "
          f"median of {repeats} alternating runs")
    print(f"ours: {'one device' if mesh is None else f'data-parallel over {args.data_parallel} host devices'}"
          f"; HF: torch with {torch.get_num_threads()} intra-op threads\n")
    rows = [
        [r["case"], f"{r['batch']}×{r['prompt']}+{r['new']}", f"{r['ours_tok_s']:.0f}", f"{r['hf_tok_s']:.0f}",
         f"{r['ratio']:.2f}×", f"{r['compile_s']:.1f}", f"{100 * r['ours_peak_frac']:.1f}%",
         f"{100 * r['hf_peak_frac']:.1f}%",
         "n/a" if r["greedy_token_agreement"] is None else f"{r['greedy_token_agreement']:.3f}"]
        for r in results
    ]
    print(format_table(["model", "batch×prompt+new", "ours tok/s", "HF tok/s", "ratio", "compile s",
                        "ours %peak", "HF %peak", "same tokens"], rows))
    if args.json:
        write_json(args.json, {"machine": machine, "load_avg_after": load_after, "matmul_peak": peak,
                               "data_parallel": args.data_parallel, "results": results})


if __name__ == "__main__":
    main()
