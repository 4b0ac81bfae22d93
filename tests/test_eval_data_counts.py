"""Held-out files follow the truncation rule and `skip_bad` like the training file, and their
counts go to metrics.jsonl at the start step (`data/eval_data/<count>`) for every stage: SFT, RM,
PPO, GRPO and DPO, through each stage's `train_*` function, with `truncation="left"` (a long
prompt is cut, a response too long by itself is skipped) and a UTF-8 BOM at the file's start.
Each run stops at its first step (the loop's train step is replaced by one that raises): the
start record is written before it."""

from __future__ import annotations

import json

import pytest

from rlhf_jax.stages import skeleton
from rlhf_jax.stages.config import StageLoopConfig
from rlhf_jax.stages.dpo import train_dpo
from rlhf_jax.stages.grpo import train_grpo
from rlhf_jax.stages.ppo import train_ppo
from rlhf_jax.stages.reward import RMConfig, train_rm
from rlhf_jax.stages.sft import train_sft
from rlhf_jax.stages.sources import ModelSource
from test_stage_dpo import dpo_config, write_comparisons
from test_stage_grpo import grpo_config
from test_stage_ppo import make_ppo_world, ppo_config
from test_stage_sft import jsonl, sft_config

LONG = " ".join(["seven"] * 200)  # longer than every max_len below


def _with_bad_and_long(path, records, *long_records):
    """`records` as JSONL after a BOM, then one malformed line and the records too long for the stage."""
    lines = [json.dumps(r) for r in records] + ["{not json", *map(json.dumps, long_records)]
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_counts_world")
    files = make_ppo_world(root)
    demos = jsonl(files["demos_eval"])
    prompts = [r["prompt"] for r in jsonl(files["prompts"])]
    comparisons = write_comparisons(root / "comparisons.jsonl", prompts[:8], 0)
    (root / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos[:16]))
    return {**files, "base": files["sft"], "demos": root / "demos.jsonl", "comparisons": comparisons,
            "comparisons_eval": comparisons,
            "eval_demos": _with_bad_and_long(root / "eval_demos.jsonl", demos[16:24],
                                             {"prompt": LONG, "response": "a"}, {"prompt": "a", "response": LONG}),
            "eval_prompts": _with_bad_and_long(root / "eval_prompts.jsonl", jsonl(files["prompts_eval"]),
                                               {"prompt": LONG}),
            "eval_comparisons": _with_bad_and_long(root / "eval_comparisons.jsonl", jsonl(comparisons)[:4],
                                                   {"prompt": LONG, "chosen": "a", "rejected": "b"},
                                                   {"prompt": "a", "chosen": LONG, "rejected": "b"})}


def _rm_config(world, workdir, **overrides):
    return RMConfig(workdir=str(workdir), model=ModelSource(hf_dir=str(world["sft"])),
                    train_data=str(world["comparisons"]), batch_size=4, max_len=48, buckets=(48,), normalize="none",
                    **overrides)


STAGES = {
    "sft": (train_sft, sft_config, "eval_demos", 8, {"buckets": (64,), "batch_size": 4}),
    "rm": (train_rm, _rm_config, "eval_comparisons", 4, {}),
    "ppo": (train_ppo, ppo_config, "eval_prompts", 16, {}),
    "grpo": (train_grpo, grpo_config, "eval_prompts", 16, {}),
    "dpo": (train_dpo, dpo_config, "eval_comparisons", 4, {}),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_held_out_cut_and_skip_counts_go_to_metrics_jsonl(world, tmp_path, monkeypatch, stage):
    train, config, eval_file, n_good, extra = STAGES[stage]

    class Stop(Exception):
        pass

    def stop(state, batch):
        raise Stop

    real_loop = skeleton.run_loop
    monkeypatch.setattr(skeleton, "run_loop", lambda **kw: real_loop(**{**kw, "train_step": stop}))
    cfg = config(world, tmp_path, eval_data=str(world[eval_file]), truncation="left", skip_bad=True,
                 loop=StageLoopConfig(total_steps=1), **extra)
    with pytest.raises(Stop):
        train(cfg)
    first = jsonl(tmp_path / "metrics.jsonl")[0]
    assert first["step"] == 0
    got = {k: v for k, v in first.items() if k.startswith("data/eval_data/")}
    too_long_responses = 0 if eval_file == "eval_prompts" else 1  # prompts alone are only ever cut
    assert got == {"data/eval_data/records": n_good + 1 + too_long_responses, "data/eval_data/cut": 1,
                   "data/eval_data/skipped": too_long_responses, "data/eval_data/bad_lines": 1}, first
