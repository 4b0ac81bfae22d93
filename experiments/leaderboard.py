"""The leaderboard: every alignment algorithm on the built-in world, judged by its gold labeler.

    python -m experiments.leaderboard                 # the full run: 3 seeds, writes docs/results/leaderboard/
    python -m experiments.leaderboard --quick         # a tiny world and a few steps (~3 minutes; a smoke test)

For each seed the pipeline's earlier stages run once (world, tokenizer, pretraining, SFT, the
simulated labelers' comparisons, the reward model; ``rlhf-jax pipeline --set algorithm=best_of_n``,
which also evaluates best-of-N).  Then every variant trains from that SFT policy with the
pipeline's settings (``rlhf_jax/pipeline/defaults.json``: PPO's tuned by hand, GRPO's, RLOO's and
DPO's β and learning rate chosen by ``experiments.leaderboard_sweep`` on tuning seed 3, which is not
reported here) and the same evaluation:

* ``ppo``, ``grpo``, ``rloo`` against the learned reward model, and ``dpo`` on the comparisons;
* ``ppo/gold``, ``grpo/gold``: the same runs against the gold labeler instead of the reward model
  (the verifiable-reward setting), so the reward model's over-optimisation cost is measured;
* ``ppo+ema``, ``grpo+ema``: evaluated and exported with the EMA of the policy weights
  (InstructGPT App. C.4, decay 0.992; training is bitwise the run without it; after 80 iterations
  the EMA still holds 0.992⁸⁰ ≈ 53% of the SFT weights);
* ``best_of_n``: no training, the SFT policy's best of 16 samples by the reward model.

Compute budget: PPO, GRPO and RLOO sample 256 responses per iteration (PPO 256 prompts × 1, GRPO
and RLOO 32 prompts × 8) for 80 iterations, one epoch of 4 minibatches, with the same ptx term;
PPO also trains its value model.  DPO takes 2 epochs over the same comparisons the reward model
is trained on (it samples nothing); docs/algorithms.md counts the passes.  The wall time of a
variant is its stage's training time as recorded when it trained (``trained_seconds``), with the
1-minute load average at its end (``load_1min``) in ``leaderboard.json``.

Evaluation (``pipeline.evaluate``'s protocol): ``eval_samples`` responses of each policy per
held-out prompt; the gold score, the exact answers, the win rate against the SFT policy over all
sample pairs of a prompt (ties ½) and the k1 KL to the SFT policy.  Over seeds: mean ± standard
error.  Output: ``leaderboard.json``, ``leaderboard.md`` and ``gold_vs_kl.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.configs import merge_dicts
from rlhf_jax.data import read_prompts
from rlhf_jax.ema import INSTRUCTGPT_EMA_DECAY
from rlhf_jax.hf import load_pretrained
from rlhf_jax.model import ModelConfig
from rlhf_jax.pipeline import PipelineConfig, kl_per_sequence, prompt_win_rates, run_pipeline, sample, stage_configs
from rlhf_jax.pipeline.driver import TRAINERS
from rlhf_jax.pipeline.inputs import tokenizer_file, world_files
from rlhf_jax.tasks import WorldConfig, gold_score
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train.loop import CONFIG_FILE, DONE_FILE

EMA = {"ema_decay": INSTRUCTGPT_EMA_DECAY}
# name -> (algorithm, overrides of its stage config)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ppo": ("ppo", {}),
    "ppo/gold": ("ppo", {"reward": "gold"}),
    "ppo+ema": ("ppo", {"ppo": EMA, "use_ema": True}),
    "grpo": ("grpo", {}),
    "grpo/gold": ("grpo", {"reward": "gold", "reward_model": None}),
    "grpo+ema": ("grpo", {"grpo": EMA, "use_ema": True}),
    "rloo": ("rloo", {}),
    "dpo": ("dpo", {}),
}
LOAD_FILE = "leaderboard_load.json"  # the load average as a variant's stage finished training
METRICS = ("gold", "exact", "win_rate", "kl", "wall_seconds")


def quick_config(runs_dir: Path, seed: int) -> PipelineConfig:
    """A tiny world, a one-layer model and a few steps per stage (``tests/test_learning.py``'s
    settings, which learn): the whole path in minutes.  The reward model of 8 steps is close to
    noise, so only the gold-reward variants and DPO mean much here."""
    loop = {"save_every": 0, "eval_every": 0}
    fast = {"optimizer": {"lr": 0.003, "warmup_steps": 0}, "loop": {"total_steps": 12, **loop}}
    group = {"batch_size": 8, "ptx_batch_size": 2, "eval_data": None,
             "grpo": {"group_size": 4, "num_minibatches": 2, "ptx_coef": 0.0, "beta": 0.0}, **fast}
    return PipelineConfig(
        name=f"seed{seed}", runs_dir=str(runs_dir), seed=seed, world=WorldConfig(n_words=9, max_len=3),
        n_pretrain=400, n_demos=96, n_prompts=64, n_comparison_prompts=64, n_eval_prompts=32, n_eval_demos=16,
        k=3, model=ModelConfig(arch="llama", vocab_size=384, d_model=32, n_layers=1, n_heads=2, max_len=32),
        prompt_len=12, response_len=6, best_of_n=(1, 2, 4), eval_samples=4,
        pretrain={"batch_size": 16, "optimizer": {"warmup_steps": 0}, "loop": {"total_steps": 40, **loop}},
        sft={"batch_size": 16, "sample_prompts": 0, "optimizer": {"warmup_steps": 0},
             "loop": {"total_steps": 40, **loop}},
        rm={"batch_size": 8, "loop": {"total_steps": 8, **loop}},
        ppo={"batch_size": 32, "ptx_batch_size": 2, "eval_data": None, "phase_timing": False,
             "ppo": {"num_minibatches": 2, "ptx_coef": 0.0}, "value_optimizer": {"lr": 0.003}, **fast},
        grpo=group, rloo=group,
        dpo={"batch_size": 8, "eval_data": None, **fast, "loop": {"total_steps": 16, **loop}},
    )


def full_config(runs_dir: Path, seed: int) -> PipelineConfig:
    """The pipeline's defaults (the built-in world, the tuned stage settings) with this seed."""
    return PipelineConfig(name=f"seed{seed}", runs_dir=str(runs_dir), seed=seed)


class Judge:
    """The gold evaluation of policies against one seed's SFT policy (``pipeline.evaluate``'s
    protocol: ``eval_samples`` draws per held-out prompt with the same keys)."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.tokenizer = Tokenizer.from_file(tokenizer_file(cfg, world_files(cfg)))
        self.model, self.sft_params = load_pretrained(cfg.run_dir / "sft" / "model")
        self.prompts = [r.prompt for r in read_prompts(world_files(cfg)["prompts_eval"])]
        self.key = jax.random.PRNGKey(cfg.seed + 1000)
        self.sft_gold, _ = self.draws(self.sft_params, 0)

    def draws(self, params, stream: int) -> tuple[np.ndarray, list[Any]]:
        """Gold scores ``[prompts, eval_samples]`` and the rollouts."""
        cfg, gold, rollouts = self.cfg, [], []
        for j in range(cfg.eval_samples):
            key = jax.random.fold_in(jax.random.fold_in(self.key, stream), j)
            texts, ended, ro = sample(self.model, params, self.tokenizer, self.prompts, key=key,
                                      max_prompt_len=cfg.prompt_len, max_new_tokens=cfg.response_len,
                                      temperature=cfg.eval_temperature)
            gold.append([gold_score(p, t, e) for p, t, e in zip(self.prompts, texts, ended)])
            rollouts += ro
        return np.asarray(gold).T, rollouts

    def __call__(self, policy_dir: Path) -> dict[str, float]:
        _, params = load_pretrained(policy_dir)
        gold, rollouts = self.draws(params, 1)
        per_prompt = prompt_win_rates(gold, self.sft_gold)
        return {"gold": float(gold.mean()), "gold_stderr": float(gold.mean(1).std(ddof=1) / math.sqrt(len(gold))),
                "exact": float(np.mean(gold == 1.0)),
                "win_rate": float(per_prompt.mean()),
                "win_rate_stderr": float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt))),
                "kl": kl_per_sequence(self.model, params, self.sft_params, rollouts, self.cfg.eval_temperature)}


def trained_seconds(workdir: Path) -> float:
    """A stage's training time as the stage recorded it when it trained: from its ``config.json``
    (written by ``train.run_loop`` as the loop starts, after the data are prepared) to its ``DONE``
    marker (written after the last step and its evaluation and checkpoint), so the first step's
    compilation is in it and the export is not.  A reused stage leaves both files untouched, so this
    is the time of the run that trained it, never the seconds of a reuse."""
    workdir = Path(workdir)
    return (workdir / DONE_FILE).stat().st_mtime - (workdir / CONFIG_FILE).stat().st_mtime


class Seed:
    """One seed's earlier stages and best-of-N (one pipeline run, reused when finished), its judge,
    and ``train(name, algorithm, overrides, workdir)``: a variant trained (or reused) from its SFT
    policy and judged."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.base = run_pipeline(dataclasses.replace(cfg, algorithm="best_of_n"), log=lambda *_: None)
        self.files = world_files(cfg)
        self.tokenizer = tokenizer_file(cfg, self.files)
        self.judge = Judge(cfg)

    def baselines(self) -> dict[str, dict[str, float]]:
        """``sft`` (wall time: pretraining + SFT) and ``best_of_n`` (wall time: the reward model;
        its sampling is the evaluation's)."""
        base, run = self.base, self.cfg.run_dir
        return {"sft": {"gold": base["gold_score_sft"], "exact": base["exact_sft"], "win_rate": 0.5, "kl": 0.0,
                        "wall_seconds": trained_seconds(run / "pretrain") + trained_seconds(run / "sft")},
                "best_of_n": {"gold": base["gold_score_best_of_n"], "exact": base["exact_best_of_n"],
                              "win_rate": base["win_rate_vs_sft"], "win_rate_stderr": base["win_rate_stderr"],
                              "kl": base["kl_to_sft"], "wall_seconds": trained_seconds(run / "rm")}}

    def train(self, algorithm: str, overrides: dict[str, Any], workdir: Path) -> dict[str, float]:
        """``algorithm``'s stage with the pipeline's table for it merged with ``overrides``, in
        ``workdir``; the judge's metrics, its ``wall_seconds`` (``trained_seconds``) and the machine's
        1-minute load average as the stage finished training (``load_1min``, kept in ``workdir/leaderboard_load.json``;
        None for a stage trained before the file was kept)."""
        cfg, workdir = self.cfg, Path(workdir)
        table = merge_dicts(merge_dicts(getattr(cfg, algorithm), overrides), {"workdir": str(workdir)})
        stage_cfg = stage_configs(dataclasses.replace(cfg, algorithm=algorithm, **{algorithm: table}),
                                  self.files, self.tokenizer)[algorithm]
        done = workdir / DONE_FILE
        finished = done.stat().st_mtime if done.exists() else None
        model_dir = TRAINERS[algorithm](stage_cfg)
        load_file = workdir / LOAD_FILE
        if done.stat().st_mtime != finished:  # trained now
            load_file.write_text(json.dumps({"load_1min": os.getloadavg()[0]}) + "\n")
        load = json.loads(load_file.read_text())["load_1min"] if load_file.exists() else None
        return {**self.judge(model_dir), "wall_seconds": trained_seconds(workdir), "load_1min": load}


def run_seed(cfg: PipelineConfig, variants: list[str], log=print) -> dict[str, dict[str, float]]:
    """The earlier stages and best-of-N, then every variant: ``{name: metrics}``."""
    seed = Seed(cfg)
    results = seed.baselines()
    for name in variants:
        algorithm, overrides = VARIANTS[name]
        log(f"[leaderboard] seed {cfg.seed}: {name} ...")
        results[name] = seed.train(algorithm, overrides, cfg.run_dir / name.replace("/", "_").replace("+", "_"))
    return results


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per variant and metric: mean and standard error over seeds (0 with one seed), and the runs."""
    out = {}
    for name in runs[0]:
        rows = [r[name] for r in runs]
        out[name] = {m: {"mean": float(np.mean([r[m] for r in rows])),
                         "stderr": float(np.std([r[m] for r in rows], ddof=1) / math.sqrt(len(rows)))
                         if len(rows) > 1 else 0.0} for m in METRICS}
        out[name]["runs"] = rows
    return out


def markdown(summary: dict[str, dict[str, Any]], seeds: int, quick: bool) -> str:
    head = ("| algorithm | gold score | exact answers | win rate vs SFT | KL to SFT | wall time (s) |\n"
            "|---|---|---|---|---|---|")
    fmt = lambda s, m, d=3: f"{s[m]['mean']:.{d}f} ± {s[m]['stderr']:.{d}f}"  # noqa: E731
    rows = [f"| {name} | {fmt(s, 'gold')} | {fmt(s, 'exact')} | {fmt(s, 'win_rate')} | {fmt(s, 'kl', 2)} | "
            f"{fmt(s, 'wall_seconds', 0)} |" for name, s in summary.items()]
    note = (f"{seeds} seed(s), mean ± standard error over seeds"
            + (" — QUICK smoke-test settings: the numbers mean little" if quick else ""))
    wall = ("Wall time: each stage's training time as recorded when it trained (config.json to DONE), "
            "on a shared machine; the load average as each variant finished is `load_1min` in leaderboard.json.")
    return "\n".join([head, *rows, "", note, "", wall, ""])


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in summary.items():
        ax.errorbar(s["kl"]["mean"], s["gold"]["mean"], xerr=s["kl"]["stderr"], yerr=s["gold"]["stderr"],
                    fmt="o", capsize=3, label=name)
        ax.annotate(name, (s["kl"]["mean"], s["gold"]["mean"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("KL to the SFT policy (nats per response)")
    ax.set_ylabel("gold score (held-out)")
    ax.set_title("gold score vs KL per algorithm")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.leaderboard", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny world and a few steps per stage (a smoke test)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick: 1)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--runs-dir", default="runs/leaderboard", help="where the stage workdirs go")
    parser.add_argument("--out", default=None, help="output directory (default docs/results/leaderboard; "
                                                    "--quick: RUNS_DIR/quick)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    runs_dir = Path(args.runs_dir) / ("quick" if args.quick else "full")
    out = Path(args.out or (runs_dir if args.quick else "docs/results/leaderboard"))
    make = quick_config if args.quick else full_config
    start = time.time()
    runs = [run_seed(make(runs_dir, seed), args.variants) for seed in range(seeds)]
    summary = summarize(runs)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.leaderboard" + (" --quick" if args.quick else "") + (
        f" --seeds {seeds}" if args.seeds else "")
    result = {"command": command, "seeds": seeds, "quick": args.quick, "wall_seconds": time.time() - start,
              "variants": {n: {"algorithm": a, "overrides": o} for n, (a, o) in VARIANTS.items()
                           if n in args.variants},
              "results": summary}
    (out / "leaderboard.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "leaderboard.md").write_text(markdown(summary, seeds, args.quick) + f"\nCommand: `{command}`\n")
    plot(summary, out / "gold_vs_kl.png")
    print(markdown(summary, seeds, args.quick))
    return result


if __name__ == "__main__":
    main()
