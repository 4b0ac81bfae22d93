"""Why the SmolLM2 HH-RLHF proxy reward model stops near 0.60 held-out accuracy: a sweep.

Runs the recipe's import, data and SFT stages once (``recipes.hh``, the same config and splits
as ``rlhf-jax pipeline --config experiments/configs/smollm2_hh.json``), then trains the proxy RM
on split A's pairs under each variant below and reads its accuracy on split C's human-labelled
pairs every ``eval_every`` steps. Each variant is its own stage directory under
``<runs_dir>/<name>/rm_sweep/``, so an interrupted sweep resumes where it stopped and a finished
variant is reused.

    python -m experiments.hh_rm_sweep --out docs/results/smollm2_hh/rm_sweep \
        [--set key=value ...] [--variants control,mean,...]

``--set`` takes the recipe's fields (``gguf=PATH``, ``hh_data=PATH``, ``base_layers=2``,
``rm.loop.total_steps=2`` for every variant ...).
Writes ``rm_sweep.json`` (after every variant) and ``rm_sweep.md``: final and best accuracy,
its binomial standard error sqrt(p(1-p)/n) over the n split-C pairs, and the curve.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from rlhf_jax.configs import from_dict, load_config, merge_dicts, to_dict
from rlhf_jax.recipes.hh import HHRecipeConfig, import_base, prepare_data, stage_configs
from rlhf_jax.stages.reward import RMConfig, train_rm
from rlhf_jax.stages.sft import train_sft

# name -> (what it changes, the RM config overrides). The control is the recipe's proxy RM.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "control": ("recipe proxy RM: last-token score, lr 2e-5, 80 steps (2 epochs), from SFT", {}),
    "mean": ("score averaged over the response tokens", {"score_pooling": "mean"}),
    "lr1e-5": ("lr 1e-5", {"optimizer": {"lr": 1e-5}}),
    "lr5e-5": ("lr 5e-5", {"optimizer": {"lr": 5e-5}}),
    "from_base": ("initialised from the instruct model, not the SFT model", {"model": {"hf_dir": "BASE"}}),
    "epochs4": ("160 steps (4 epochs)", {"loop": {"total_steps": 160}}),
}


def _curve(stage: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(int(r["step"]), float(r["eval/accuracy"])) for r in rows if "eval/accuracy" in r]


def _table(results: dict[str, Any]) -> str:
    lines = ["| variant | what changes | final acc. | ± s.e. | best acc. (step) | curve (step: acc.) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results["variants"].items():
        curve = ", ".join(f"{s}: {a:.3f}" for s, a in r["curve"])
        lines.append(f"| {name} | {r['what']} | {r['final']:.3f} | {r['stderr']:.3f} | "
                     f"{r['best']:.3f} ({r['best_step']}) | {curve} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="experiments/configs/smollm2_hh.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe config override")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    cfg = load_config(HHRecipeConfig, args.config, args.set)
    if cfg.compile_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", cfg.compile_cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = import_base(cfg)
    data = prepare_data(cfg, base)
    configs = stage_configs(cfg, base, data["files"])
    train_sft(configs["sft"])
    n_pairs = data["pairs"]["C"]
    proxy = merge_dicts(to_dict(configs["rm_proxy"]), {"loop": {"eval_every": args.eval_every}})
    results: dict[str, Any] = {"recipe": to_dict(cfg), "eval_pairs": n_pairs, "train_pairs": data["pairs"]["A"],
                               "variants": {}}
    for name in args.variants.split(","):
        what, overrides = VARIANTS[name]
        if overrides.get("model", {}).get("hf_dir") == "BASE":
            overrides = merge_dicts(overrides, {"model": {"hf_dir": str(base)}})
        stage = cfg.run_dir / "rm_sweep" / name
        rm_cfg = from_dict(RMConfig, merge_dicts(merge_dicts(proxy, overrides), {"workdir": str(stage)}),
                           where=f"variant {name}")
        t0 = time.time()
        train_rm(rm_cfg)
        curve = _curve(stage)
        final = curve[-1][1]
        best_step, best = max(curve, key=lambda sa: sa[1])
        results["variants"][name] = {"what": what, "overrides": overrides, "curve": curve, "final": final,
                                     "stderr": math.sqrt(final * (1 - final) / n_pairs), "best": best,
                                     "best_step": best_step, "seconds": time.time() - t0}
        (out / "rm_sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "rm_sweep.md").write_text(
            f"Proxy RM accuracy on split C ({n_pairs} human-labelled pairs), trained on split A "
            f"({data['pairs']['A']} pairs).\n\n" + _table(results))
        print(f"[rm_sweep] {name}: final {final:.3f} best {best:.3f}@{best_step} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
