"""Real data through the CLI (issue 21): `rlhf-jax rm` trains on Anthropic's HH-RLHF harmless-base
test file (../shared) with `skip_bad=true` (its 4 empty replies) and `truncation=left` (most
dialogues exceed `max_len`), on a tiny random model and a byte-level BPE trained on the file.
The counts the stage logs and writes to metrics.jsonl are checked against a recount here."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_jax.data import read_comparisons
from rlhf_jax.errors import DataError
from rlhf_jax.stages.ppo import PPOStageConfig
from rlhf_jax.stages.rollouts import prompt_arrays
from rlhf_jax.tokenizer import Tokenizer
from test_stage_sft import random_model_dir

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MAX_LEN = 128


@pytest.mark.slow  # ~15 s on 2 idle cores: a subprocess, 2308 dialogues tokenised twice
@pytest.mark.skipif(not HH.is_file(), reason=f"{HH} absent (../shared)")
def test_rm_trains_on_real_hh_rlhf_with_skip_bad_and_left_truncation(tmp_path):
    dialogues = [json.loads(line)["chosen"] for line in gzip.open(HH, "rt", encoding="utf-8")]
    tokenizer = Tokenizer.train(dialogues[:200], 1000)
    base = random_model_dir(tmp_path / "base", tokenizer, max_len=MAX_LEN)
    workdir = tmp_path / "rm"
    args = ["rm", "--set", f"workdir={workdir}", "--set", f"model.hf_dir={base}", "--set", f"train_data={HH}",
            "--set", "normalize=none", "--set", "batch_size=4", "--set", f"max_len={MAX_LEN}",
            "--set", f"buckets=[{MAX_LEN}]", "--set", "loop.total_steps=2", "--set", "skip_bad=true",
            "--set", "truncation=left"]
    run = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *args], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (workdir / "model" / "model.safetensors").is_file()

    # Recount: a comparison is cut or skipped when one of its [BOS] prompt response [EOS] is too long.
    records = read_comparisons(HH, skip_bad=True)
    lengths = iter(len(e.ids) + 2 for e in tokenizer.hf.encode_batch(
        [r.prompt + x for r in records for x in r.responses], add_special_tokens=False))
    long = sum(max(next(lengths) for _ in r.responses) > MAX_LEN for r in records)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    data = {k.removeprefix("data/train_data/"): v for k, v in lines[0].items() if k.startswith("data/")}
    assert lines[0]["step"] == 0
    assert data["records"] == len(records) and data["bad_lines"] == 4
    assert data["cut"] + data["skipped"] == long and data["cut"] > 0 and data["skipped"] > 0
    assert f"{data['cut'] + data['skipped']} of {len(records)} comparisons longer than {MAX_LEN} tokens" in run.stderr
    train = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(r["loss"] > 0 for r in train)


def test_ppo_prompts_follow_the_stage_truncation_option(tmp_path):
    """A too-long PPO prompt names the file, its line and `truncation`, an option PPOStageConfig has."""

    tokenizer = Tokenizer.train(["what is it ? a b yes no"] * 4, 300)
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "what is it ? a b yes no what is it"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"prompts.jsonl: prompt 1 \(line 2\) has \d+ tokens, more than max_len 6 "
                                        r"\(set truncation to 'left'"):
        prompt_arrays(str(path), tokenizer, 6)
    assert "truncation" in {f.name for f in dataclasses.fields(PPOStageConfig)}
    left = prompt_arrays(str(path), tokenizer, 6, truncation="left")
    assert left["mask"].sum(1).tolist() == [2, 6]
    assert len(prompt_arrays(str(path), tokenizer, 6, truncation="skip")["tokens"]) == 1
