"""``run_pipeline``: every stage in order, each skipped once complete, then the evaluation,
``summary.json`` and the report."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rlhf_jax.configs import to_dict
from rlhf_jax.pipeline.comparisons import build_comparisons
from rlhf_jax.pipeline.config import PipelineConfig, stage_configs
from rlhf_jax.pipeline.evaluate import evaluate
from rlhf_jax.pipeline.inputs import tokenizer_file, world_files
from rlhf_jax.report import write_report
from rlhf_jax.stages.dpo import train_dpo
from rlhf_jax.stages.grpo import train_grpo, train_rloo
from rlhf_jax.stages.ppo import train_ppo
from rlhf_jax.stages.reward import train_rm
from rlhf_jax.stages.sft import train_sft

SUMMARY_FILE = "summary.json"
TRAINERS = {"ppo": train_ppo, "grpo": train_grpo, "rloo": train_rloo, "dpo": train_dpo}  # best_of_n: none


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (``os.times``)."""
    t = os.times()
    return t.user + t.system


class StageTimer:
    """Runs a driver's stages, adding each one's wall and CPU seconds to ``run/timings.json``
    (kept across resumed runs: a stage's time is the sum over the runs that worked on it).

    ``timer(stage, fn, *args)`` logs the stage, returns ``fn(*args)``; ``wall``/``cpu``: seconds
    per stage so far."""

    def __init__(self, run: Path, log=print, prefix: str = "pipeline"):
        self.file = Path(run) / "timings.json"
        timings = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.timings = timings
        self.wall: dict[str, float] = timings.setdefault("wall", {})
        self.cpu: dict[str, float] = timings.setdefault("cpu", {})
        self.log, self.prefix = log, prefix

    def __call__(self, stage: str, fn, *args):
        self.log(f"[{self.prefix}] {stage} ...")
        start, start_cpu = time.time(), _cpu_seconds()
        result = fn(*args)
        self.wall[stage] = self.wall.get(stage, 0.0) + time.time() - start
        self.cpu[stage] = self.cpu.get(stage, 0.0) + _cpu_seconds() - start_cpu
        self.file.write_text(json.dumps(self.timings, indent=2))
        return result


def run_pipeline(cfg: PipelineConfig, *, log=print) -> dict[str, Any]:
    """Run every stage (skipping complete ones), evaluate, write ``summary.json`` and the report."""
    t0 = time.time()
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "pipeline_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    timed = StageTimer(run, log=log)
    wall, cpu = timed.wall, timed.cpu

    files = timed("data", world_files, cfg)
    tokenizer = timed("tokenizer", tokenizer_file, cfg, files)
    configs = stage_configs(cfg, files, tokenizer)
    if "pretrain" in configs:
        timed("pretrain", train_sft, configs["pretrain"])
    timed("sft", train_sft, configs["sft"])
    ranked = timed("comparisons", build_comparisons, cfg, files, tokenizer)
    timed("rm", train_rm, configs["rm"])
    if cfg.algorithm in TRAINERS:
        timed(cfg.algorithm, TRAINERS[cfg.algorithm], configs[cfg.algorithm])
    summary: dict[str, Any] = {"name": cfg.name}
    if cfg.algorithm != "ppo":
        summary["algorithm"] = cfg.algorithm
    if cfg.task == "synthetic":
        summary.update(timed("evaluate", evaluate, cfg, configs, ranked))
    summary["stage_seconds"] = wall
    summary["stage_cpu_seconds"] = cpu
    summary["wall_seconds"] = time.time() - t0
    summary["wall_seconds_total"] = sum(wall.values())
    summary["cpu_seconds_total"] = sum(cpu.values())
    (run / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_report(cfg, summary, log=log)
    return summary
