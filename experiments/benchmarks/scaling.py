"""Scaling of one PPO iteration: time vs batch size, response length and simulated CPU devices.

The iteration is ``ppo_step.py``'s (the same tiny GPT-2 policy, reference, value and reward
models, built by its ``write_shared``/``load_shared``; temperature 1, no stop token, one
minibatch, 1 PPO epoch by default), run the way the PPO stage runs it: ``stages.ppo.ppo_step_fn``
jitted by ``jit_on_mesh`` (state donated) on a data-parallel mesh.  Three sweeps, each changing
one thing from batch 32 × (32 prompt + 64 new) on one device:

- batch size (8, 16, 32, 64): every phase is linear in the batch, so the time should be too;
- response length (16, 32, 64, 128): generation is a loop over new tokens (linear) and the
  scoring and update forwards grow with ``P + N`` (linear, plus attention's quadratic term);
- devices (1, 2, 4, 8 simulated CPU devices, ``jax_num_cpu_devices``, one child process each):
  the global batch is split over a ``data`` axis; on a 2-core machine at most 2× is possible,
  and more devices than cores only add overhead.

Each point: one compile call, one warm-up, then the median of ``--repeats`` iterations.  A
least-squares line (time = a + b·x) is fitted to each sweep; ``R²`` near 1 means linear.  The
plot (``--png``) shows the points, the fit and, for devices, the ideal ``t₁ / n``.

    python -m experiments.benchmarks.scaling [--quick] [--json out.json] [--png out.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from experiments.benchmarks.common import format_table, machine_info, timed, write_json
from experiments.benchmarks.ppo_step import Bench, load_shared, write_shared
from rlhf_jax.ppo import init_ppo_state
from rlhf_jax.sharding import MeshConfig, make_mesh, state_shardings
from rlhf_jax.stages.steps import jit_on_mesh
from rlhf_jax.stages.ppo import ppo_step_fn

RESULT_MARK = "@@RESULT "

# (batch sizes, response lengths, device counts) of each mode; the sweeps share the base point
# (batch = the base batch, new = the base length, 1 device).
SWEEPS = {
    "full": {"batch": (8, 16, 32, 64), "new": (16, 32, 64, 128), "devices": (1, 2, 4, 8), "base": (32, 64)},
    "quick": {"batch": (8, 16, 32), "new": (16, 32, 64), "devices": (1, 2), "base": (16, 32)},
    "dry": {"batch": (4, 8), "new": (4, 8), "devices": (1, 2), "base": (4, 4)},
}
DRY_BENCH = dict(n_layers=1, d_model=32, n_heads=2, vocab=64, prompt=8, context=32)


def bench_for(base: Bench, batch: int, new: int) -> Bench:
    """``base`` with this batch and response length (the context grown to hold them if needed)."""
    return dataclasses.replace(base, batch=batch, new=new, context=max(base.context, base.prompt + new))


def measure_point(b: Bench, epochs: int, n_devices: int, repeats: int) -> dict[str, Any]:
    """Median seconds of ``repeats`` PPO iterations of ``b`` on a ``data = n_devices`` mesh, after a
    compile call and a warm-up; ``{"seconds", "times", "first_call_s", ...}``."""
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        write_shared(b, Path(tmp))
        models, params, prompts = load_shared(b, Path(tmp))
    cfg = b.ppo_config(epochs)
    mesh = make_mesh(MeshConfig(data=n_devices, fsdp=1), devices=jax.devices()[:n_devices])
    tx = optax.adam(b.learning_rate)
    state = init_ppo_state(cfg, params["policy"], params["value"], params["reward"], tx, tx, jax.random.key(b.seed))
    holder = {"state": jax.device_put(state, state_shardings(state, mesh))}
    step = jit_on_mesh(ppo_step_fn(models, cfg), mesh, holder["state"], donate=True)
    batch = {"prompt_tokens": prompts, "prompt_mask": np.ones_like(prompts)}

    def iteration() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    first = timed(iteration)
    timed(iteration)
    times = [timed(iteration) for _ in range(repeats)]
    return {"batch": b.batch, "new": b.new, "devices": n_devices, "epochs": epochs, "seconds": statistics.median(times),
            "times": times, "first_call_s": first}


def measure_in_child(b: Bench, epochs: int, n_devices: int, repeats: int) -> dict[str, Any]:
    """``measure_point`` in a fresh process with ``n_devices`` simulated CPU devices (the device
    count is fixed when JAX starts)."""
    cmd = [sys.executable, "-m", "experiments.benchmarks.scaling", "--worker", json.dumps(dataclasses.asdict(b)),
           "--devices", str(n_devices), "--epochs", str(epochs), "--repeats", str(repeats)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"scaling worker ({n_devices} devices) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares ``y = intercept + slope·x`` and its ``r2`` (1 − residual / total sum of squares)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = float(np.sum((ys - (intercept + slope * xs)) ** 2))
    total = float(np.sum((ys - ys.mean()) ** 2))
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1.0 - residual / total if total else 1.0}


def plot(sweeps: dict[str, list[dict[str, Any]]], fits: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """One panel per sweep: measured seconds per iteration, the linear fit, and (devices) ``t₁/n``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"batch": "batch size (prompts)", "new": "response length (new tokens)", "devices": "simulated CPU devices"}
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, (name, points) in zip(axes[0], sweeps.items()):
        x = np.array([p[name] for p in points], float)
        y = np.array([p["seconds"] for p in points])
        fit = fits[name]
        grid = np.linspace(0, x.max() * 1.05, 50)
        ax.plot(x, y, "o", label="measured (median)")
        ax.plot(grid, fit["intercept"] + fit["slope"] * grid, "-",
                label=f"fit {fit['intercept']:.2f} + {fit['slope']:.3g}·x (R² {fit['r2']:.3f})")
        if name == "devices":
            ax.plot(x, y[0] / x, "--", label="ideal t₁/n")
        ax.set_xlabel(labels[name])
        ax.set_ylabel("seconds per PPO iteration")
        ax.set_xticks(x)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller points (under 2 minutes)")
    parser.add_argument("--dry-run", action="store_true", help="a 1-layer d=32 model and 2 points per sweep")
    parser.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations per point (default 3, quick 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--png", type=Path, default=None, help="plot here (default: beside --json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a Bench as JSON: measure one point
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    mode = "dry" if args.dry_run else "quick" if args.quick else "full"
    repeats = args.repeats or (1 if mode == "dry" else 2 if mode == "quick" else 3)
    if repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")

    if args.worker is not None:
        jax.config.update("jax_num_cpu_devices", args.devices)
        result = measure_point(Bench(**json.loads(args.worker)), args.epochs, args.devices, repeats)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    sweep = SWEEPS[mode]
    base = Bench(**DRY_BENCH) if mode == "dry" else Bench()
    base_batch, base_new = sweep["base"]
    info = machine_info()
    cache: dict[tuple[int, int], dict[str, Any]] = {}

    def one_device(batch: int, new: int) -> dict[str, Any]:
        if (batch, new) not in cache:
            cache[(batch, new)] = measure_point(bench_for(base, batch, new), args.epochs, 1, repeats)
        return cache[(batch, new)]

    sweeps = {
        "batch": [one_device(b, base_new) for b in sweep["batch"]],
        "new": [one_device(base_batch, n) for n in sweep["new"]],
        "devices": [one_device(base_batch, base_new) if n == 1 else
                    measure_in_child(bench_for(base, base_batch, base_new), args.epochs, n, repeats)
                    for n in sweep["devices"]],
    }
    fits = {name: linear_fit([p[name] for p in points], [p["seconds"] for p in points])
            for name, points in sweeps.items()}
    info["load_avg_end"] = list(os.getloadavg())

    model = f"GPT-2 {base.n_layers}L d={base.d_model} V={base.vocab}"
    print(f"jax {info['jax']}, {info['cpu_count']} CPUs; load average (1 min) {info['load_avg'][0]:.1f} at start, "
          f"{info['load_avg_end'][0]:.1f} at end")
    print(f"PPO iteration ({model}, prompt {base.prompt}, {args.epochs} epoch(s), 1 minibatch), median of {repeats}; "
          f"base point batch {base_batch} × {base_new} new on 1 device\n")
    rows = []
    for name, points in sweeps.items():
        t0 = points[0]["seconds"] / points[0][name]
        for p in points:
            per_unit = p["seconds"] / p[name]
            rows.append([name, p[name], p["batch"], p["new"], p["devices"], f"{p['seconds']:.3f}",
                         f"{per_unit / t0:.2f}" if name != "devices" else f"{points[0]['seconds'] / p['seconds']:.2f}×",
                         f"{p['first_call_s']:.1f}"])
    print(format_table(["sweep", "x", "batch", "new", "devices", "s/iter", "s per unit x (rel.) / speed-up",
                        "first call s"], rows))
    print("\n" + "\n".join(f"{name}: s/iter = {f['intercept']:.3f} + {f['slope']:.4f}·x, R² = {f['r2']:.3f}"
                           for name, f in fits.items()))
    png = args.png or (args.json.with_suffix(".png") if args.json else None)
    if png:
        plot(sweeps, fits, png, f"PPO iteration scaling: {model}, jax {info['jax']}, {info['cpu_count']} CPUs, "
                                f"load {info['load_avg'][0]:.1f}")
        print(f"plot: {png}")
    if args.json:
        write_json(args.json, {"machine": info, "bench": dataclasses.asdict(base), "epochs": args.epochs,
                               "repeats": repeats, "mode": mode, "sweeps": sweeps, "fits": fits,
                               "png": str(png) if png else None})


if __name__ == "__main__":
    main()
