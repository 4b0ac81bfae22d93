"""The `rlhf-jax` command line: an end-to-end tiny SFT run from a TOML config with overrides, exit
codes and messages for bad overrides and bad data, the experiment scripts and shipped configs."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from rlhf_jax.cli import COMMANDS, main
from rlhf_jax.configs import load_config
from rlhf_jax.stages.export import completed_model
from test_stage_sft import jsonl, make_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("cli_world"), n_demos=32, n_eval=8)


def write_toml(path: Path, world: dict[str, Path], workdir: Path, train_data: Path | None = None) -> Path:
    """An SFT config with a randomly initialised model (`model.init`)."""
    path.write_text(f"""
workdir = "{workdir}"
tokenizer = "{world['tokenizer']}"
train_data = "{train_data or world['demos']}"
batch_size = 4
epochs = 1.0
buckets = [64]
sample_prompts = 0

[model.init]
arch = "gpt2"
vocab_size = 320
d_model = 32
n_layers = 2
n_heads = 2
max_len = 64

[optimizer]
lr = 1e-3
schedule = "cosine"
""")
    return path


def test_sft_end_to_end_with_overrides(world, tmp_path, capsys):
    config = write_toml(tmp_path / "sft.toml", world, tmp_path / "run")
    assert main(["sft", "--config", str(config), "--set", "loop.total_steps=3", "--set", "seed=5"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "run" / "model"))
    assert completed_model(tmp_path / "run", 3) == tmp_path / "run" / "model"
    assert [r["step"] for r in jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["seed"] == 5 and saved["loop"]["total_steps"] == 3 and saved["model"]["init"]["d_model"] == 32
    hf_config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert hf_config["n_layer"] == 2 and hf_config["model_type"] == "gpt2"


def test_bad_override_key_exits_2_naming_it(world, tmp_path, capsys):
    config = write_toml(tmp_path / "sft.toml", world, tmp_path / "run")
    assert main(["sft", "--config", str(config), "--set", "optimizer.lrr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lrr" in err and "Traceback" not in err
    assert main(["sft", "--config", str(config), "--set", "batch_size=-1"]) == 2
    assert "SFTConfig.batch_size must be an int >= 1" in capsys.readouterr().err
    assert main(["sft", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_bad_data_line_names_file_and_line(world, tmp_path, capsys):
    bad = tmp_path / "demos.jsonl"
    lines = Path(world["demos"]).read_text().splitlines()[:3]
    bad.write_text("\n".join([*lines, '{"prompt": "copy: cat\\nanswer:", "response": 7}']) + "\n")
    config = write_toml(tmp_path / "sft.toml", world, tmp_path / "run", train_data=bad)
    assert main(["sft", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}, line 4, field 'response'" in err and "Traceback" not in err


def test_usage_errors_and_print_config(capsys):
    assert main([]) == 2
    assert main(["nope"]) == 2
    capsys.readouterr()
    assert main(["rm", "--print-config", "--set", "workdir=w", "--set", "train_data=c.jsonl",
                 "--set", 'model={"hf_dir": "sft/model"}', "--set", "normalize=none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 9e-6 and printed["epochs"] == 1.0 and printed["batch_size"] == 64
    # Overriding one optimiser field keeps the stage's other paper defaults (IG C.1: cosine).
    assert main(["sft", "--print-config", "--set", "workdir=w", "--set", "train_data=d.jsonl",
                 "--set", 'model={"hf_dir": "base"}', "--set", "optimizer.lr=1e-4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["lr"] == 1e-4 and printed["optimizer"]["schedule"] == "cosine"
    assert printed["epochs"] == 16.0 and printed["prompt_masking"] is True
    assert set(COMMANDS) >= {"sft", "rm"}


@pytest.mark.parametrize("script, command, config", [
    ("sft.py", "sft", "sft_tiny.json"),
    ("reward_model.py", "rm", "rm_tiny.json"),
])
def test_experiment_scripts_and_shipped_configs(script, command, config, monkeypatch, capsys):
    """The scripts forward to the CLI, and the shipped configs parse into valid stage configs."""
    path = REPO / "experiments" / "configs" / config
    cfg = load_config(COMMANDS[command].config, path)
    assert cfg.workdir.startswith("runs/tiny/")
    monkeypatch.setattr(sys, "argv", [script, "--config", str(path), "--print-config"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "experiments" / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads(capsys.readouterr().out)["workdir"] == cfg.workdir


def test_ppo_preset_applies_before_overrides(capsys):
    base = ["--set", "workdir=w", "--set", "model.hf_dir=x", "--set", "train_data=t", "--set", "reward_model=r"]
    assert main(["ppo", "--preset", "trl", "--print-config", *base, "--set", "ppo.vf_coef=0.3"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["ppo"]["kl"]["init_kl_coef"] == 0.05 and cfg["ppo"]["ptx_coef"] == 0.0
    assert cfg["ppo"]["generation"]["temperature"] == 0.7 and cfg["ppo"]["score_position"] == "after_last"
    assert cfg["ppo"]["vf_coef"] == 0.3  # --set wins over the preset
    assert cfg["ppo"]["generation"]["max_new_tokens"] == 32  # untouched fields keep their defaults
    assert main(["ppo", "--print-config", *base]) == 2  # the default ptx_coef needs ptx_data
    assert "ptx_data" in capsys.readouterr().err
