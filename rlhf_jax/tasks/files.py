"""Write the synthetic world as the JSONL files the dataset readers take.

Formats, one JSON object a line:

    pretrain.jsonl                    {"text": ...}
    demos.jsonl, demos_eval.jsonl     {"prompt": ..., "response": ...}
    prompts.jsonl, prompts_eval.jsonl {"prompt": ...}
    comparisons (written by the pipeline from ``make_comparisons``)
                                      {"prompt": ..., "responses": [...], "ranking": [...]}

Each file draws from its own random stream ``default_rng([seed, stream])``, so changing one
file's size leaves the others unchanged. Evaluation prompts never appear in the training files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from rlhf_jax.tasks.corpus import pretraining_texts
from rlhf_jax.tasks.labelers import demonstrations
from rlhf_jax.tasks.world import WorldConfig, sample_prompts

WORLD_FILES = ("pretrain", "demos", "demos_eval", "prompts", "prompts_eval")


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping]) -> Path:
    """Write ``records`` one JSON object a line, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def make_world_files(
    directory: str | os.PathLike,
    seed: int,
    n_pretrain: int,
    n_demos: int,
    n_prompts: int,
    n_eval_demos: int = 200,
    n_eval_prompts: int = 200,
    config: WorldConfig | None = None,
) -> dict[str, Path]:
    """Write the five world files (module docstring) into ``directory``; returns name -> path.

    ``seed`` replaces ``config.seed``. Demonstrations (train and eval) have
    ``config.error_rate`` labeler mistakes; evaluation prompts are drawn first and excluded from
    ``demos`` and ``prompts``.
    """
    config = dataclasses.replace(config or WorldConfig(), seed=seed)
    for name, n in [("n_pretrain", n_pretrain), ("n_demos", n_demos), ("n_prompts", n_prompts),
                    ("n_eval_demos", n_eval_demos), ("n_eval_prompts", n_eval_prompts)]:  # fmt: skip
        if n < 0:
            raise ValueError(f"make_world_files: {name} must be >= 0, got {n}")

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([config.seed, stream])

    demos_eval = demonstrations(rng(2), n_eval_demos, config=config)
    prompts_eval = sample_prompts(rng(4), n_eval_prompts, config)
    held_out = {d["prompt"] for d in demos_eval} | set(prompts_eval)
    records = {
        "pretrain": [{"text": t} for t in pretraining_texts(rng(0), n_pretrain, config)],
        "demos": demonstrations(rng(1), n_demos, config=config, exclude=held_out),
        "demos_eval": demos_eval,
        "prompts": [
            {"prompt": p} for p in sample_prompts(rng(3), n_prompts, config, exclude=held_out)
        ],
        "prompts_eval": [{"prompt": p} for p in prompts_eval],
    }
    directory = Path(directory)
    return {name: write_jsonl(directory / f"{name}.jsonl", records[name]) for name in WORLD_FILES}
