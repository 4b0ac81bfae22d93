"""A small sweep of GRPO's, RLOO's and DPO's settings on a tuning seed that the leaderboard does not report.

    python -m experiments.leaderboard_sweep --runs-dir RUNS   # seed 3; writes docs/results/leaderboard/sweep.{json,md}

The tuning seed's earlier stages (its own world, SFT policy and reward model) run once through the
leaderboard's own path (``experiments.leaderboard.Seed``); every point then trains from that SFT
policy with the pipeline's table for its algorithm (``rlhf_jax/pipeline/defaults.json``) and the
point's settings on top, and is judged like a leaderboard row: the gold score, exact answers and
win rate against the SFT policy on the seed's held-out prompts, and the KL to the SFT policy.  The
chosen point per algorithm (``choose``) follows the one-standard-error rule (Hastie, Tibshirani and
Friedman, *Elements of Statistical Learning*, §7.10): of the points whose gold score is within one
standard error (over the held-out prompts) of the best point's, the one with the least KL to the
SFT policy.  The grid (``GRID``) varies only the KL
coefficient β and the learning rate, so the compute budget of a point is the algorithm's:

* GRPO: β (k3 KL in the loss) {0.04, 0.1, 0.2} × lr {1e-4, 3e-4};
* RLOO: β (k1 KL in the reward) {0.1, 0.2, 0.4, 0.8} (0.8 added when 0.4, the first grid's edge, won);
* DPO: β {0.1, 0.3, 1.0} at lr 3e-4, and β 0.1 at lr 1e-4.

A point's workdir is reused when it has finished with the same settings, so a rerun only judges.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from experiments.leaderboard import Seed, full_config

TUNING_SEED = 3  # the leaderboard reports seeds 0, 1, 2
GRID: dict[str, list[dict[str, Any]]] = {
    "grpo": [{"grpo": {"beta": beta}, "optimizer": {"lr": lr}} for beta in (0.04, 0.1, 0.2) for lr in (1e-4, 3e-4)],
    "rloo": [{"grpo": {"beta": beta}} for beta in (0.1, 0.2, 0.4, 0.8)],
    "dpo": [{"beta": 0.1, "optimizer": {"lr": 1e-4}}]
    + [{"beta": beta, "optimizer": {"lr": 3e-4}} for beta in (0.1, 0.3, 1.0)],
}
COLUMNS = ("gold", "exact", "win_rate", "kl", "wall_seconds")


def settings(point: dict[str, Any]) -> dict[str, float]:
    """A grid point as flat ``{"beta": …, "lr": …}``."""
    inner = point.get("grpo", point)
    return {"beta": inner["beta"], **({"lr": point["optimizer"]["lr"]} if "optimizer" in point else {})}


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One algorithm's chosen point: the least KL among those with ``gold ≥ best gold − its stderr``."""
    best = max(rows, key=lambda r: r["gold"])
    return min((r for r in rows if r["gold"] >= best["gold"] - best["gold_stderr"]), key=lambda r: r["kl"])


def point_name(algorithm: str, point: dict[str, Any]) -> str:
    return algorithm + "".join(f"_{k}{v:g}" for k, v in settings(point).items())


def markdown(rows: list[dict[str, Any]], chosen: dict[str, str], seed: int) -> str:
    head = ("| algorithm | β | lr | gold score | exact answers | win rate vs SFT | KL to SFT | train time (s) "
            "| chosen |\n|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['algorithm']} | {r['settings']['beta']:g} | {r['settings'].get('lr', '—')} | "
             f"{r['gold']:.3f} ± {r['gold_stderr']:.3f} | {r['exact']:.3f} | "
             f"{r['win_rate']:.3f} ± {r['win_rate_stderr']:.3f} | {r['kl']:.2f} | {r['wall_seconds']:.0f} | "
             f"{'**yes**' if chosen[r['algorithm']] == r['name'] else ''} |" for r in rows]
    return "\n".join([head, *lines, "", f"Tuning seed {seed} (not a leaderboard seed), one run per point. Chosen: "
                      "the least KL within one standard error (over held-out prompts) of the best gold score.", ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.leaderboard_sweep",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=TUNING_SEED, help="the tuning seed (default 3)")
    parser.add_argument("--algorithms", nargs="*", default=list(GRID), choices=list(GRID))
    parser.add_argument("--runs-dir", default="runs/leaderboard", help="where the stage workdirs go")
    parser.add_argument("--out", default="docs/results/leaderboard", help="output directory")
    args = parser.parse_args(argv)
    start = time.time()
    cfg = full_config(Path(args.runs_dir) / "full", args.seed)
    seed = Seed(cfg)
    rows = []
    for algorithm in args.algorithms:
        for point in GRID[algorithm]:
            name = point_name(algorithm, point)
            print(f"[sweep] seed {args.seed}: {name} ...", flush=True)
            metrics = seed.train(algorithm, point, cfg.run_dir / "sweep" / name)
            rows.append({"name": name, "algorithm": algorithm, "settings": settings(point), "overrides": point,
                         **metrics})
            print(f"[sweep] {name}: " + ", ".join(f"{c} {metrics[c]:.3f}" for c in COLUMNS), flush=True)
    chosen = {a: choose([r for r in rows if r["algorithm"] == a])["name"] for a in args.algorithms}
    command = "python -m experiments.leaderboard_sweep" + (f" --seed {args.seed}" if args.seed != TUNING_SEED else "")
    result = {"command": command, "seed": args.seed, "wall_seconds": time.time() - start,
              "sft": seed.baselines()["sft"], "chosen": chosen, "points": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    sft = result["sft"]
    (out / "sweep.md").write_text(markdown(rows, chosen, args.seed)
                                  + f"\nSFT policy of seed {args.seed}: gold {sft['gold']:.3f}, "
                                  f"exact {sft['exact']:.3f}."
                                  + f"\n\nCommand: `{command} --runs-dir RUNS_DIR`\n")
    print(markdown(rows, chosen, args.seed))
    return result


if __name__ == "__main__":
    main()
