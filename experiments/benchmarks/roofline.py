"""The roofline: the machine's matmul FLOP/s and memory bandwidth, and how close decoding gets.

Measured here, in this run: the matmul peak (``common.measure_matmul_peak``: CPU float32, better
of JAX and PyTorch; accelerator: the compute dtype at 8192²) and the memory bandwidth
(``common.measure_bandwidth``: a sum and a copy of a large array, JAX and NumPy).  On a known
accelerator the data sheet's peak and HBM bandwidth are shown too (``common.DEVICE_SPECS``).

Then, per model and batch, one decode step of ``rlhf_jax.generate`` (greedy, KV cache, no stop):
its time is ``(t(N new tokens) − t(1 new token)) / (N − 1)``, which removes the prefill, and its
bound comes from ``flops.decode_bound_tokens_per_s``: every matmul weight read once per step
(float32 master weights, 4 bytes each: what the code reads) plus the KV cache up to the mean
context of the decode steps (``P + N/2`` keys), against ``max(FLOPs / peak, bytes / bandwidth)``.
At batch 1 a step is bandwidth-bound; at batch 32 on a CPU it is compute-bound.  On a CPU the
weights of a small model stay in the caches, so the DRAM bound is loose (a fraction > 1 is
possible).

Next to it, the step's weight matmuls alone (``flops.decode_matmul_shapes``: ``[batch, k] @ [k,
n]`` for every weight), each timed in a ``fori_loop`` whose next input depends on its output (so
XLA cannot hoist it), and on a CPU the same products in PyTorch (its default threads): the time
a step needs for its matmuls at the rate each library's kernels reach at these thin shapes, with
nothing else in the step.  Then the same matmuls in the step's order, each with its own weight
(``matmul_sequence_calls``: the step's whole set of weights, which do not stay in a core's cache
as one weight in its own loop does).  Then the step's attention alone: the model's two one-query
dots and the softmax over the whole cache (``prompt + new`` slots, as ``generate`` allocates it), one
layer's cache timed ``n_layers`` times, as dots (the model's form) and as broadcast multiplies
and sums (the multiply-and-reduce form: 15 to 60× slower alone at batch 32 on the 2-core CPU, and 6×
slower as the whole tiny decode step when the model used it, so the model keeps the dots); and
as dots over every layer's own cache in turn, which reads ``n_layers`` times the bytes, as the
step does.  The kernel floor is the XLA matmuls plus the one-layer attention (issue 18's
definition), and ``step ÷ floor`` their ratio (issue 18's CPU target: ≤ 1.5× for tiny at batch
32).  A decode-speed target whose step budget is below the floor cannot be met by any change to
our program.

On a CPU the step is timed a second time with ``ModelConfig.cache_block`` (``--cache-block B``,
default 16 there): the KV cache grown B slots at a time, so a step attends to the filled slots
rounded up to B rather than to all ``prompt + new`` slots; the floor stays the issue's.

With several host devices (``--host-devices D``, on a CPU default the cores: one device per core)
each decode whose batch D divides is timed a third way, its rows split over the D devices with
the weights replicated (``generation.py --data-parallel``'s form), in both cache forms.  The
weights are placed by ``shard_params``: one host buffer that all D devices read in place
(``sharding.host_shared``), not a copy per device, so the cores' shared cache holds one copy.  Each
split step is set against the issue's floor and against the floor's loops split the same way
(each device's share of the rows, run side by side: the split floor), since each device then
runs its own thin matmuls and its own single-threaded attention at once.

Under load (the shared 2-core machine) the step and the floor's loops are timed in the same
rounds, one call each in turn, so the load hits both alike; the ratio's range over the rounds is
printed next to the ratio of the medians.

    python -m experiments.benchmarks.roofline [--quick] [--repeats N] [--models tiny small] [--new N]
        [--cache-block B] [--host-devices D] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from experiments.benchmarks.common import (
    device_spec,
    format_table,
    machine_info,
    measure_bandwidth,
    measure_matmul_peak,
    median_time,
    timed,
    write_json,
)
from experiments.benchmarks.flops import decode_bound_tokens_per_s, decode_matmul_sequence, decode_matmul_shapes
from experiments.benchmarks.shapes import CASES
from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params


@dataclasses.dataclass(frozen=True)
class Decode:
    """One decode measurement: ``model`` (a ``train_step.CASES`` key), ``batch`` prompts of
    ``prompt`` tokens, ``new`` tokens."""

    model: str
    batch: int
    prompt: int
    new: int

    @property
    def context(self) -> float:
        """Mean keys attended by the ``new − 1`` decode steps: ``prompt + new / 2``."""
        return self.prompt + self.new / 2


def decode_cases(models: list[str], on_cpu: bool, new: int | None = None) -> list[Decode]:
    """Batch 1 and 32 of every model; prompts and new tokens 32 + 32 on a CPU (``new`` overrides the
    latter: 64 is ``generation.py``'s shape), 128 + 128 otherwise."""
    default_new, prompt, batches = (32, 32, (1, 32)) if on_cpu else (128, 128, (1, 32))
    return [Decode(m, b, prompt, new or default_new) for m in models for b in batches]


Timed = list[tuple[float, Callable[[], Any]]]  # (weight, blocking call): a part's time is Σ weight · median


def _place(x: Any, mesh: Mesh | None, batch: bool = True) -> Any:
    """``x`` as it is (``mesh`` None), or on ``mesh``: its rows split as a batch (``shard_batch``)
    or replicated as one host buffer that every device reads (``shard_params`` on the ``data``
    mesh)."""
    if mesh is None:
        return x
    return shard_batch(x, mesh) if batch else shard_params(x, mesh)


def decode_calls(case: Decode, dtype: str, cache_block: int = 0,
                 mesh: Mesh | None = None) -> tuple[dict[str, Any], Timed, Timed]:
    """The model config and two blocking calls of ``generate`` (greedy, no stop): ``case.new`` new
    tokens and 1 new token (the step is their difference over ``new − 1``), with
    ``ModelConfig.cache_block`` set to ``cache_block``.  With a ``mesh`` (a ``data`` axis) the
    prompts are split over its devices and the weights replicated (``shard_params``: one host
    buffer all devices read), as ``generation.py --data-parallel`` runs them: each device decodes
    its rows."""
    model = Transformer(CASES[case.model].model_config("lm", dtype).replace(cache_block=cache_block))
    params = _place(jax.jit(lambda k: init_params(model, k))(jax.random.key(0)), mesh, batch=False)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, model.config.vocab_size, (case.batch, case.prompt)), jnp.int32)
    ids, mask = _place(ids, mesh), _place(jnp.ones_like(ids), mesh)

    def run(new: int) -> Timed:
        config = GenerateConfig(new, greedy=True)

        def call() -> Any:
            with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
                return jax.block_until_ready(generate(model, params, ids, mask, jax.random.key(1), config).tokens)

        return [(1.0, call)]

    return dataclasses.asdict(model.config), run(case.new), run(1)


def _loop(body: Any, init: Any, loops: int, operands: Any = ()) -> Callable[[], Any]:
    """A blocking call of a jitted ``fori_loop`` of ``loops`` ``body`` iterations (``body(x,
    operands) -> x``: each iteration feeds the next, so XLA cannot hoist the work; ``operands``
    are arguments of the program, not constants in it)."""
    loop = jax.jit(lambda x, c: jax.lax.fori_loop(0, loops, lambda _, x: body(x, c), x))
    return lambda: jax.block_until_ready(loop(init, operands))


def matmul_calls(config: Any, batch: int, dtype: str, loops: int, mesh: Mesh | None = None) -> tuple[Timed, float]:
    """The decode step's weight matmuls alone (see the module docstring), one loop per shape
    weighted by ``count / loops``, and their FLOPs.  With a ``mesh``, split as ``decode_calls``
    splits the step: the rows over the ``data`` axis, each weight replicated (one host buffer)."""
    rng = np.random.default_rng(0)
    calls, flops = [], 0.0
    for k, n, count in decode_matmul_shapes(config):
        x = _place(jnp.asarray(rng.standard_normal((batch, k)), dtype), mesh)
        w = _place(jnp.asarray(rng.standard_normal((k, n)) * 0.01, dtype), mesh, batch=False)
        calls.append((count / loops, _loop(lambda x, w: x + (x @ w)[:, :1] * 1e-9, x, loops, w)))
        flops += 2 * batch * k * n * count
    return calls, flops


def matmul_sequence_calls(config: Any, batch: int, dtype: str, loops: int) -> Timed:
    """The decode step's weight matmuls in the step's order (``flops.decode_matmul_sequence``),
    each with a weight of its own and fed by the one before (its first ``k`` columns), one loop
    iteration per step: the matmuls with the step's whole set of weights (14 MB for tiny), which
    the per-shape loops of ``matmul_calls`` keep in the core's cache.  Weights are ``N(0, 1/k)`` so
    the values neither grow nor fall into denormals along the chain."""
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), dtype)
               for k, n in decode_matmul_sequence(config)]
    x = jnp.asarray(rng.standard_normal((batch, config.d_model)), dtype)

    def step(x: Any, weights: Any) -> Any:
        h = x
        for w in weights:
            h = h[:, :w.shape[0]] @ w
        return x + h[:, :1] * 1e-3

    return [(1 / loops, _loop(step, x, loops, weights))]


def torch_matmul_s(config: Any, batch: int, repeats: int, loops: int) -> float | None:
    """The same products in PyTorch (float32, its default threads), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    total = 0.0
    for k, n, count in decode_matmul_shapes(config):
        xt = torch.from_numpy(rng.standard_normal((batch, k), np.float32))
        wt = torch.from_numpy(rng.standard_normal((k, n), np.float32) * 0.01)

        def torch_loop(xt=xt, wt=wt) -> None:
            with torch.no_grad():
                for _ in range(loops):
                    xt @ wt

        total += count * median_time(torch_loop, repeats)[0] / loops
    return total


def attention_calls(config: Any, batch: int, slots: int, dtype: str, loops: int, form: str = "dot",
                    own_caches: bool = False, mesh: Mesh | None = None) -> Timed:
    """The decode step's one-query attention alone, in a dependent ``fori_loop``, over ``[batch,
    kv_heads, slots, head_dim]`` K/V caches: one layer's, weighted ``n_layers / loops``, or
    (``own_caches``) every layer's own cache in turn, as the step reads them (``n_layers`` times
    the bytes, which may not stay in the CPU's caches), weighted ``1 / loops``.
    ``form="dot"``: the model's two dots (``bqhgd,bhkd->bhgqk`` and back) and the softmax;
    ``"reduce"``: the same as broadcast multiplies and sums (the multiply-and-reduce form).
    With a ``mesh``, the rows (queries and caches) split over its ``data`` axis."""
    rng = np.random.default_rng(0)
    groups = config.n_heads // config.kv_heads
    q = _place(jnp.asarray(rng.standard_normal((batch, 1, config.kv_heads, groups, config.head_dim)), dtype), mesh)
    caches = [tuple(_place(jnp.asarray(rng.standard_normal((batch, config.kv_heads, slots, config.head_dim)), dtype),
                           mesh) for _ in range(2)) for _ in range(config.n_layers if own_caches else 1)]

    def attend(q, k, v):
        if form == "dot":
            scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k).astype(jnp.float32)
        else:
            scores = jnp.sum(q[:, 0, :, :, None, :] * k[:, :, None], axis=-1)[:, :, :, None].astype(jnp.float32)
        probs = jax.nn.softmax(scores / np.sqrt(config.head_dim), axis=-1).astype(q.dtype)
        if form == "dot":
            out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v)
        else:
            out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=-2)[:, None]
        return q + out * 1e-3

    def body(q, caches):
        for k, v in caches:
            q = attend(q, k, v)
        return q

    return [((1 if own_caches else config.n_layers) / loops, _loop(body, q, loops, caches))]


def interleaved(parts: dict[str, Timed], repeats: int) -> dict[str, dict[str, Any]]:
    """Every call of every part once (compiles: ``first_s``), then ``repeats`` rounds in which
    each call runs once in turn, so the machine's load hits all parts alike.  A part's seconds
    are ``Σ weight · median``; its ``rounds`` are the per-round sums."""
    first = {name: sum(timed(fn) for _, fn in calls) for name, calls in parts.items()}
    times: dict[str, list[list[float]]] = {name: [[] for _ in calls] for name, calls in parts.items()}
    for _ in range(repeats):
        for name, calls in parts.items():
            for i, (_, fn) in enumerate(calls):
                times[name][i].append(timed(fn))
    return {name: {"s": sum(w * statistics.median(t) for (w, _), t in zip(calls, times[name])),
                   "rounds": [sum(w * t[r] for (w, _), t in zip(calls, times[name])) for r in range(repeats)],
                   "first_s": first[name]}
            for name, calls in parts.items()}


def time_case(case: Decode, dtype: str, repeats: int, loops: int, cache_block: int = 0,
              mesh: Mesh | None = None) -> dict[str, Any]:
    """One decode case: the step of ``generate`` and its kernel floor's parts, interleaved; with
    ``cache_block > 0`` also the step with the cache grown in blocks (``"blocked"``).  With a
    ``mesh`` whose ``data`` axis divides the batch, also both steps with the rows split over its
    devices and the floor's parts split the same way (``"split"``)."""
    config_dict, full, one = decode_calls(case, dtype)
    config = CASES[case.model].model_config("lm", dtype)
    slots = case.prompt + case.new
    matmuls, flops = matmul_calls(config, case.batch, dtype, loops)
    parts = {"full": full, "one": one}
    if cache_block:
        _, parts["blocked_full"], parts["blocked_one"] = decode_calls(case, dtype, cache_block)
    split = mesh is not None and case.batch % mesh.shape["data"] == 0
    if split:
        _, parts["split_full"], parts["split_one"] = decode_calls(case, dtype, 0, mesh)
        if cache_block:
            _, parts["split_blocked_full"], parts["split_blocked_one"] = decode_calls(case, dtype, cache_block, mesh)
        parts["split_matmuls"] = matmul_calls(config, case.batch, dtype, loops, mesh)[0]
        parts["split_attention"] = attention_calls(config, case.batch, slots, dtype, loops, mesh=mesh)
    t = interleaved({**parts, "matmuls": matmuls,
                     "matmul_sequence": matmul_sequence_calls(config, case.batch, dtype, loops),
                     "attention": attention_calls(config, case.batch, slots, dtype, loops),
                     "attention_own_caches": attention_calls(config, case.batch, slots, dtype, loops, own_caches=True),
                     "attention_reduce": attention_calls(config, case.batch, slots, dtype, loops, form="reduce")},
                    repeats)

    def floor(prefix: str) -> tuple[float, list[float]]:
        m, a = t[prefix + "matmuls"], t[prefix + "attention"]
        return m["s"] + a["s"], [x + y for x, y in zip(m["rounds"], a["rounds"])]

    floor_s, floor_rounds = floor("")

    def step(prefix: str, split_floor_rounds: list[float] | None = None) -> dict[str, Any]:
        full_t, one_t = t[prefix + "full"], t[prefix + "one"]
        step_s = max(full_t["s"] - one_t["s"], 1e-9) / (case.new - 1)
        step_rounds = [(f - o) / (case.new - 1) for f, o in zip(full_t["rounds"], one_t["rounds"])]
        by_round = {"step_over_floor_by_round": [s / f for s, f in zip(step_rounds, floor_rounds)]}
        if split_floor_rounds:
            by_round["over_split_floor_by_round"] = [s / f for s, f in zip(step_rounds, split_floor_rounds)]
        return {"full_s": full_t["s"], "one_token_s": one_t["s"], "step_s": step_s, "tok_s": case.batch / step_s,
                "compile_s": full_t["first_s"] + one_t["first_s"], "full_times": full_t["rounds"],
                "one_times": one_t["rounds"], **by_round}

    def split_result() -> dict[str, Any]:
        split_floor_s, split_floor_rounds = floor("split_")
        return {"devices": mesh.shape["data"], "cache_block": cache_block,
                "step": step("split_", split_floor_rounds),
                "blocked": step("split_blocked_", split_floor_rounds) if cache_block else None,
                "matmuls_s": t["split_matmuls"]["s"], "attention_s": t["split_attention"]["s"],
                "floor_s": split_floor_s}

    with_torch = dtype == "float32" and jax.default_backend() == "cpu"
    return {"config": config_dict, **step(""),
            "matmuls": {"xla_s": t["matmuls"]["s"], "flops": flops, "sequence_xla_s": t["matmul_sequence"]["s"],
                        "torch_s": torch_matmul_s(config, case.batch, repeats, loops) if with_torch else None},
            "attention_s": t["attention"]["s"], "attention_own_caches_s": t["attention_own_caches"]["s"],
            "attention_reduce_s": t["attention_reduce"]["s"], "floor_s": floor_s,
            "blocked": {"cache_block": cache_block, **step("blocked_")} if cache_block else None,
            "split": split_result() if split else None}


def over_floor(r: dict[str, Any], step: dict[str, Any] | None = None) -> str:
    """``step ÷ floor`` of a decode result (``step``: its blocked form) with its range over the rounds."""
    step = step or r
    rounds = step["step_over_floor_by_round"]
    return f"{step['step_s'] / r['floor_s']:.2f}× ({min(rounds):.2f}-{max(rounds):.2f} by round)"


def split_table(results: list[dict[str, Any]]) -> str:
    """The decode steps run with their rows split over host devices (``time_case``'s ``"split"``),
    each form against the one-device floor and against the floor split the same way."""
    first = results[0]["split"]
    columns = ["model", "batch", "devices", "ms/step", "step ÷ floor", "split floor ms", "step ÷ split floor"]
    if first["blocked"]:
        columns += [f"cache_block={first['cache_block']}: ms/step", "its step ÷ floor", "its step ÷ split floor"]

    def cells(r: dict[str, Any], form: dict[str, Any]) -> list[str]:
        against_split = {**form, "step_over_floor_by_round": form["over_split_floor_by_round"]}
        return [f"{form['step_s'] * 1e3:.2f}", over_floor(r, form), over_floor(r["split"], against_split)]

    rows = []
    for r in results:
        split = r["split"]
        step = cells(r, split["step"])
        rows.append([r["model"], r["batch"], split["devices"], *step[:2], f"{split['floor_s'] * 1e3:.2f}", step[2]]
                    + (cells(r, split["blocked"]) if split["blocked"] else []))
    return format_table(columns, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=None,
                        help="decode models (default: tiny small on CPU, gpt2-medium gpt2-large llama-1b otherwise)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="compute dtype (default float32 on CPU, bfloat16 otherwise)")
    parser.add_argument("--new", type=int, default=None,
                        help="new tokens per decode run (default 32 on CPU, 128 otherwise; must be >= 2)")
    parser.add_argument("--quick", action="store_true", help="2 timed rounds instead of 3")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, --quick 2)")
    parser.add_argument("--cache-block", type=int, default=None,
                        help="also time the decode with ModelConfig.cache_block set to this (0: only the default "
                             "one-cache decode; default 16 on a CPU, 0 otherwise)")
    parser.add_argument("--host-devices", type=int, default=os.cpu_count(),
                        help="CPU only: also time each decode whose batch this divides with its rows split over "
                             "this many host devices, and the floor split the same way (1 = off; default: the "
                             "cores)")
    parser.add_argument("--dry-run", action="store_true", help="the micro model, small arrays, 1 run")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.new is not None and args.new < 2:
        parser.error(f"--new must be >= 2: a step is (t(N) - t(1)) / (N - 1) (got {args.new})")
    if args.host_devices < 1:
        parser.error(f"--host-devices must be >= 1 (got {args.host_devices})")
    if args.host_devices > 1:
        jax.config.update("jax_num_cpu_devices", args.host_devices)  # before the backend starts
    on_cpu = jax.default_backend() == "cpu"
    mesh = make_mesh(MeshConfig(data=jax.device_count(), fsdp=1)) if on_cpu and jax.device_count() > 1 else None
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    models = args.models or (["tiny", "small"] if on_cpu else ["gpt2-medium", "gpt2-large", "llama-1b"])
    repeats = args.repeats or (2 if args.quick else 3)
    cache_block = max(args.cache_block if args.cache_block is not None else 16 if on_cpu else 0, 0)
    if args.dry_run:
        models, repeats = ["micro"], 1

    info = machine_info()
    n = 512 if args.dry_run else (2048 if on_cpu else 8192)
    peak = measure_matmul_peak(n, 5, "float32" if on_cpu else dtype)
    bandwidth = measure_bandwidth((16 if args.dry_run else 256 if on_cpu else 1024) * 2**20)
    spec = None if on_cpu else device_spec(info["device_kind"])
    results = []
    for case in decode_cases(models, on_cpu, args.new):
        loops = 5 if args.dry_run else 50
        r = {**dataclasses.asdict(case), "context": case.context,
             **time_case(case, dtype, repeats, loops, cache_block, mesh)}
        config = CASES[case.model].model_config("lm", dtype)
        r["bound"] = decode_bound_tokens_per_s(config, case.batch, case.context, peak["median"], bandwidth["median"])
        r["fraction"] = r["tok_s"] / r["bound"]["bound_tok_s"]
        if spec:
            r["bound_spec"] = decode_bound_tokens_per_s(config, case.batch, case.context, spec["bf16_flops"],
                                                        spec["hbm_bytes_s"])
            r["fraction_spec"] = r["tok_s"] / r["bound_spec"]["bound_tok_s"]
        results.append(r)
    info["load_avg_end"] = list(os.getloadavg())

    ridge = peak["median"] / bandwidth["median"]
    print(f"jax {info['jax']} on {info['device_kind']}; load average (1 min) {info['load_avg'][0]:.1f} at start, "
          f"{info['load_avg_end'][0]:.1f} at end")
    print(f"matmul peak ({peak['dtype']}, {n}², median): {peak['median'] / 1e9:.0f} GFLOP/s "
          f"(jax {peak['jax']['median'] / 1e9:.0f}"
          + (f", torch {peak['torch']['median'] / 1e9:.0f}" if peak["torch"] else "") + ")")
    lib_bw = ", ".join(f"{kind} {lib} {v['median'] / 1e9:.1f}" for kind in ("read", "copy")
                       for lib, v in bandwidth[kind].items())
    print(f"memory bandwidth ({bandwidth['n_bytes'] >> 20} MiB, median): {bandwidth['median'] / 1e9:.1f} GB/s "
          f"({lib_bw}); ridge point {ridge:.1f} FLOP/byte")
    if spec:
        print(f"data sheet: {spec['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {spec['hbm_bytes_s'] / 1e12:.2f} TB/s HBM")
    print(f"decode steps: greedy, {dtype} compute, float32 weights; step = (t(N) − t(1)) / (N − 1); "
          f"median of {repeats} rounds, each timing the decode runs and the floor's loops in turn\n")
    rows = [[r["model"], r["batch"], f"{r['prompt']}+{r['new']}", f"{r['bound']['intensity']:.1f}",
             f"{r['step_s'] * 1e3:.2f}", f"{r['tok_s']:.0f}", f"{r['bound']['compute_tok_s']:.0f}",
             f"{r['bound']['bandwidth_tok_s']:.0f}", f"{100 * r['fraction']:.0f}%"]
            + ([f"{r['bound_spec']['bound_tok_s']:.0f}", f"{100 * r['fraction_spec']:.0f}%"] if spec else [])
            + [f"{r['matmuls']['xla_s'] * 1e3:.2f}", f"{r['matmuls']['sequence_xla_s'] * 1e3:.2f}",
               "-" if r["matmuls"]["torch_s"] is None else f"{r['matmuls']['torch_s'] * 1e3:.2f}",
               f"{r['attention_s'] * 1e3:.2f}", f"{r['attention_reduce_s'] * 1e3:.2f}",
               f"{r['attention_own_caches_s'] * 1e3:.2f}",
               over_floor(r)] + ([f"{r['blocked']['step_s'] * 1e3:.2f}", over_floor(r, r["blocked"])]
                                 if r["blocked"] else [])
            for r in results]
    print(format_table(["model", "batch", "prompt+new", "FLOP/byte", "ms/step", "tok/s", "compute bound tok/s",
                        "bandwidth bound tok/s", "of roofline"]
                       + (["sheet bound tok/s", "of sheet"] if spec else [])
                       + ["its matmuls alone: XLA ms", "in sequence, own weights ms", "torch ms",
                          "its attention alone: XLA ms",
                          "as multiply-and-reduce ms", "attention, each layer's own cache ms",
                          "step ÷ floor (matmuls + attention, XLA)"]
                       + ([f"cache_block={cache_block}: ms/step", "its step ÷ floor"] if cache_block else []),
                       rows))
    split = [r for r in results if r["split"]]
    if split:
        print(f"\nthe same steps with the rows split over {mesh.shape['data']} host devices (weights replicated "
              "as one host buffer), against the floor above and against the floor's parts split the same way")
        print(split_table(split))
    if args.json:
        write_json(args.json, {"machine": info, "matmul_peak": peak, "bandwidth": bandwidth, "spec": spec,
                               "ridge_flop_per_byte": ridge, "dtype": dtype, "repeats": repeats, "decode": results})


if __name__ == "__main__":
    main()
