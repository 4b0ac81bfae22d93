"""Compile time of one whole PPO iteration, layers unrolled vs scanned (``ModelConfig.scan_layers``).

The iteration is ``ppo_step``'s tiny one (GPT-2 shape, ``d_model`` 256, batch 32, 32 + 64 tokens,
one epoch), at a few depths, in three forms: unrolled; scanned with the rollout's cached calls
unrolled (``scan_decode=False``, the default); and scanned throughout (``scan_decode=True``).
The unrolled program grows with every layer, the scanned one traces and compiles one block
whatever the depth.  Printed, not asserted (the box is shared).  The 1.1B Llama's compile on an
accelerator is in ``gpu_check``.

    python -m experiments.benchmarks.compile_time [--layers 4 12] [--repeats N] [--dry-run] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from experiments.benchmarks.common import format_table, machine_info, write_json
from experiments.benchmarks.ppo_step import Bench
from rlhf_jax.model import Transformer, init_params
from rlhf_jax.ppo import PPOModels, init_ppo_state, make_ppo_iteration


FORMS = {"unrolled_s": (False, False), "scanned_s": (True, False), "scanned_decode_s": (True, True)}


def compile_seconds(bench: Bench, scan: bool, scan_decode: bool = False) -> float:
    """Seconds to lower and compile one ``make_ppo_iteration`` program of ``bench``'s shapes."""
    policy = Transformer(bench.model_config("lm").replace(scan_layers=scan, scan_decode=scan_decode))
    value = Transformer(policy.config.replace(head="scalar"))
    cfg = bench.ppo_config(epochs=1)
    shapes = jax.eval_shape(lambda: (init_params(policy, jax.random.PRNGKey(0)),
                                     init_params(value, jax.random.PRNGKey(1))))
    state = jax.eval_shape(lambda p, v: init_ppo_state(cfg, p, v, v, optax.adam(1e-6), optax.adam(1e-6),
                                                       jax.random.PRNGKey(2)), *shapes)
    ids = jax.ShapeDtypeStruct((bench.batch, bench.prompt), jnp.int32)
    start = time.perf_counter()
    make_ppo_iteration(PPOModels(policy, value, value), cfg).lower(state, ids, ids).compile()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--repeats", type=int, default=1,
                        help="compiles of each form per depth, in turn (the median is shown; the load varies)")
    parser.add_argument("--dry-run", action="store_true", help="2 layers, micro shapes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    base = Bench(d_model=64, n_heads=2, vocab=256, batch=4, prompt=8, new=8, context=32) if args.dry_run else Bench()
    layers = [2] if args.dry_run else args.layers
    rows: list[dict[str, Any]] = []
    info = machine_info()
    for n in layers:
        bench = dataclasses.replace(base, n_layers=n)
        times: dict[str, list[float]] = {name: [] for name in FORMS}
        for _ in range(args.repeats):  # the forms in turn, so a change in load hits all of them
            for name, form in FORMS.items():
                times[name].append(compile_seconds(bench, *form))
        rows.append({"layers": n, **{name: statistics.median(t) for name, t in times.items()}, "all_s": times})
        print(rows[-1], flush=True)
    info["load_avg_end"] = list(os.getloadavg())
    print(f"load average (1 min) {info['load_avg'][0]:.1f} at start, {info['load_avg_end'][0]:.1f} at end")
    print(format_table(["layers", "unrolled compile", "scanned (decode unrolled, default)", "scanned with decode"],
                       [[r["layers"], *(f"{r[name]:.1f} s" for name in FORMS)] for r in rows]))
    if args.json:
        write_json(args.json, {"machine": info, "bench": dataclasses.asdict(base), "results": rows})


if __name__ == "__main__":
    main()
