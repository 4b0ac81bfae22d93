"""End-to-end tests of ``rlhf_jax.pipeline`` on a tiny world: every stage runs, the summary and
report are complete, and a run interrupted inside the PPO stage resumes to the same numbers as a
straight run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_jax.configs import ConfigError
from rlhf_jax.model import ModelConfig
from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.pipeline import SUMMARY_FILE, DataFiles, PipelineConfig, prompt_win_rates, run_pipeline, stage_configs, win_rate
from rlhf_jax.tasks import WorldConfig

REQUIRED = ("win_rate_vs_sft", "gold_score_sft", "gold_score_ppo", "rm_accuracy", "kl_to_sft", "ptx_loss_sft",
            "ptx_loss_ppo", "labeler_agreement", "wall_seconds")
TIMING = ("stage_seconds", "stage_cpu_seconds", "wall_seconds", "wall_seconds_total", "cpu_seconds_total")
PLOTS = ("overoptimization.png", "kl.png", "length.png", "losses.png")
PPO_STEPS = 4


def tiny(runs_dir, **kw) -> PipelineConfig:
    """A few steps per stage on a 1-layer model and a 9-word world."""
    loop = {"save_every": 1, "eval_every": 2}
    return PipelineConfig(
        name="tiny", runs_dir=str(runs_dir), seed=3,
        world=WorldConfig(n_words=9, max_len=3),
        n_pretrain=300, n_demos=48, n_prompts=64, n_comparison_prompts=24, n_eval_prompts=16, n_eval_demos=16,
        k=3, model=ModelConfig(arch="llama", vocab_size=384, d_model=16, n_layers=1, n_heads=2, max_len=32),
        prompt_len=12, response_len=6, best_of_n=(1, 2),
        pretrain={"batch_size": 8, "optimizer": {"warmup_steps": 0}, "loop": {"total_steps": 3, **loop}},
        sft={"batch_size": 8, "sample_prompts": 2, "optimizer": {"warmup_steps": 0}, "loop": {"total_steps": 3, **loop}},
        rm={"batch_size": 8, "loop": {"total_steps": 3, **loop}},
        ppo={"batch_size": 16, "ptx_batch_size": 2, "eval_samples": 4, "ppo": {"num_minibatches": 2, "epochs": 1},
             "loop": {"total_steps": PPO_STEPS, **loop}},
        **kw,
    )


def numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted tiny run: ``(config, summary)``."""
    cfg = tiny(tmp_path_factory.mktemp("straight"))
    return cfg, run_pipeline(cfg, log=lambda *_: None)


def test_summary_report_and_plots(straight):
    cfg, summary = straight
    on_disk = json.loads((cfg.run_dir / SUMMARY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in REQUIRED:
        assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
    assert 0.0 <= on_disk["win_rate_vs_sft"] <= 1.0 and on_disk["eval_samples"] == cfg.eval_samples
    assert 0.0 <= on_disk["win_rate_stderr"] <= 0.5 / math.sqrt(cfg.n_eval_prompts - 1)
    assert 0.0 <= on_disk["rm_accuracy"] <= 1.0 and 0.5 <= on_disk["labeler_agreement"] <= 1.0
    assert -3.0 <= on_disk["gold_score_sft"] <= 1.0 and -3.0 <= on_disk["gold_score_ppo"] <= 1.0
    assert on_disk["ptx_loss_sft"] > 0 and on_disk["ptx_loss_ppo"] > 0
    assert set(on_disk["stage_seconds"]) == set(on_disk["stage_cpu_seconds"]) >= {
        "pretrain", "sft", "comparisons", "rm", "ppo", "evaluate"}
    assert [r["n"] for r in on_disk["best_of_n"]] == [1, 2]
    report = (cfg.run_dir / "report.md").read_text()
    assert "win rate PPO vs SFT" in report
    for png in PLOTS:
        path = cfg.run_dir / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"![{png}]({png})" in report


def test_win_rate_averages_every_pair_of_samples():
    """Against a loop over prompts and sample pairs (scores on a coarse grid, so ties occur)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (7, 3)) / 3, rng.integers(0, 4, (7, 5)) / 3
    want = [np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in a[i] for y in b[i]]) for i in range(7)]
    np.testing.assert_allclose(prompt_win_rates(a, b), want)
    assert win_rate(a, b) == pytest.approx(np.mean(want))
    assert win_rate(a[:, 0], b[:, 0]) == pytest.approx(np.mean((a[:, 0] > b[:, 0]) + 0.5 * (a[:, 0] == b[:, 0])))


def test_comparisons_have_distinct_ranked_responses(straight):
    cfg, _ = straight
    stats = json.loads((cfg.run_dir / "comparisons" / "stats.json").read_text())
    for split in ("train", "eval"):
        records = [json.loads(line) for line in (cfg.run_dir / "comparisons" / f"{split}.jsonl").open()]
        assert records
        for rec in records:
            assert 2 <= len(rec["responses"]) <= cfg.k
            assert sorted(rec["ranking"]) == list(range(len(rec["responses"])))
            assert all(r.strip() for r in rec["responses"])
    assert stats["comparisons"] == sum(1 for _ in (cfg.run_dir / "comparisons" / "train.jsonl").open())
    assert stats["labeler_noise"] > 0


def test_rerun_of_a_finished_pipeline_skips_every_stage(straight, monkeypatch):
    cfg, summary = straight

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    for where in ("rlhf_jax.stages.skeleton.setup_training", "rlhf_jax.stages.ppo.load_ppo_models",
                  "rlhf_jax.stages.skeleton.run_loop", "rlhf_jax.pipeline.comparisons.calibrate_noise"):
        monkeypatch.setattr(where, fail)
    again = run_pipeline(cfg, log=lambda *_: None)
    assert numbers(again) == numbers(summary)


class Interrupted(Exception):
    pass


def _crash_in_loop(monkeypatch, module, call: int, after_steps: int) -> None:
    """Make the ``call``-th ``run_loop`` of ``module`` (``stages.skeleton``, every stage's driver)
    raise ``Interrupted`` before its ``after_steps + 1``-th step (after the checkpoints of the
    first steps)."""
    original = module.run_loop
    calls = {"loops": 0}

    def run_loop_then_crash(**kw):
        calls["loops"] += 1
        if calls["loops"] != call:
            return original(**kw)
        step, steps = kw["train_step"], {"n": 0}

        def crashing(*args):
            steps["n"] += 1
            if steps["n"] == after_steps + 1:
                raise Interrupted
            return step(*args)

        return original(**{**kw, "train_step": crashing})

    monkeypatch.setattr(module, "run_loop", run_loop_then_crash)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "sft", "comparisons", "rm", "ppo"])
def test_interrupted_stage_resumes_to_the_straight_numbers(stage, straight, tmp_path, monkeypatch):
    """Kill the pipeline inside one stage, re-run the same command: the final numbers equal an
    uninterrupted run's (training stages resume from their checkpoints; the comparisons stage
    is redone from the seed)."""
    import rlhf_jax.pipeline as pipeline
    import rlhf_jax.stages.skeleton as skeleton

    _, expected = straight
    cfg = tiny(tmp_path)
    if stage == "comparisons":  # both splits written, statistics not yet
        def crash(*args, **kwargs):
            raise Interrupted
        monkeypatch.setattr(pipeline.comparisons, "labeler_agreement", crash)
    else:
        call = {"pretrain": 1, "sft": 2, "rm": 3, "ppo": 4}[stage]  # the stages' run_loop calls, in order
        _crash_in_loop(monkeypatch, skeleton, call, after_steps=2)
    with pytest.raises(Interrupted):
        run_pipeline(cfg, log=lambda *_: None)
    assert not (cfg.run_dir / SUMMARY_FILE).exists()
    if stage != "comparisons":
        checkpoints = cfg.run_dir / stage / "checkpoints"
        assert checkpoints.is_dir() and any(checkpoints.iterdir())
        assert not (cfg.run_dir / stage / "model").exists()
    monkeypatch.undo()
    resumed = run_pipeline(cfg, log=lambda *_: None)
    assert numbers(resumed) == numbers(expected)


@pytest.mark.parametrize("field, value, match", [
    ("k", 10, r"PipelineConfig\.k"),
    ("name", "a/b", r"PipelineConfig\.name"),
    ("response_len", 30, r"PipelineConfig\.response_len.*max_len=40"),
    ("best_of_n", (), r"PipelineConfig\.best_of_n"),
    ("eval_samples", 0, r"PipelineConfig\.eval_samples"),
    ("task", "web", r"PipelineConfig\.task"),
])
def test_config_errors_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        PipelineConfig(**{field: value})


def test_files_task_trains_the_rm_on_the_given_comparisons(straight, tmp_path):
    """``task="files"``: the RM stage reads the user's comparison files, not the run directory."""
    cfg, _ = straight
    data = cfg.run_dir / "data"
    files = {"demos": data / "demos.jsonl", "prompts": data / "prompts.jsonl", "pretrain": data / "pretrain.jsonl",
             "comparisons": cfg.run_dir / "comparisons" / "train.jsonl",
             "comparisons_eval": cfg.run_dir / "comparisons" / "eval.jsonl"}
    mine = tiny(tmp_path, task="files", base_model=str(cfg.run_dir / "sft" / "model"),
                files=DataFiles(**{k: str(v) for k, v in files.items()}))
    configs = stage_configs(mine, files, cfg.run_dir / "tokenizer" / "tokenizer.json")
    assert "pretrain" not in configs
    assert (configs["rm"].train_data, configs["rm"].eval_data) == (str(files["comparisons"]), str(files["comparisons_eval"]))


def test_multi_host_needs_the_files_task():
    with pytest.raises(ConfigError, match=r"PipelineConfig\.distributed"):
        PipelineConfig(distributed=DistributedConfig(auto=True))


def test_rm_diagnostics_tables_match_a_hand_computed_case():
    """Two prompts, best-of-2 from 3 samples (the third is the SFT baseline), values worked out by hand."""
    from experiments.rm_diagnostics import report

    s = {"prompts": ["copy: red cat\nanswer:", "first: dog pig\nanswer:"],
         "texts": [(" red cat", " red pig", " red"), (" pig dog", " dog", " dog")],
         "gold": np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]),
         "rm": np.array([[0.2, 0.9, 0.0], [0.1, 0.5, 0.3]])}
    lines = report(s, 2).splitlines()
    for row in ("| 1 | reward model | 0.500 | 0.500 | 0.500 |",   # samples 0: gold 1, 0 vs baseline 0.5, 1
                "| 2 | reward model | 0.500 | 0.500 | 0.250 |",   # picks 1, 1: gold 0 (loses), 1 (ties)
                "| 2 | gold (oracle) | 1.000 | 1.000 | 0.750 |",  # wins, ties
                "| copy | 1 | 1.00 | 0.00 | 1.00 |", "| first | 1 | 0.00 | 1.00 | 1.00 |",
                "| same number of words | 1 | 0.000 | 0.700 |",  # copy: RM prefers the wrong " red pig"
                "| different lengths | 1 | 1.000 | 0.400 |"):
        assert row in lines, (row, lines)


def test_rm_diagnostics_runs_on_a_pipeline_run(straight, capsys):
    from experiments.rm_diagnostics import main

    cfg, _ = straight
    assert main([str(cfg.run_dir), "--n", "2"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 | ")]
    assert len(rows) == 2 and rows[0][2:] == rows[1][2:]  # best-of-1 is sample 0, whoever picks


def test_loss_plots_of_a_run_without_some_stages(tmp_path):
    """A stage the run did not train (no metrics file) gets an empty panel that says so, not a
    legend without lines (matplotlib's "No artists with labels" warning)."""
    import warnings

    from rlhf_jax.report import _plots

    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = _plots(tmp_path, {"algorithm": "ppo"}, [])
    assert "losses.png" in written and (tmp_path / "losses.png").read_bytes()[:4] == b"\x89PNG"
