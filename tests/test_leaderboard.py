"""experiments.leaderboard's tables: mean ± standard error over seeds, the markdown and the plot
(the whole --quick run takes minutes: it was run by hand, see docs/algorithms.md)."""

import numpy as np

from experiments.leaderboard import METRICS, VARIANTS, markdown, plot, quick_config, summarize


def test_summary_markdown_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    runs = [{name: {m: float(rng.normal()) for m in METRICS} for name in ("sft", *VARIANTS)} for _ in range(3)]
    summary = summarize(runs)
    gold = [r["grpo"]["gold"] for r in runs]
    assert summary["grpo"]["gold"]["mean"] == np.mean(gold)
    np.testing.assert_allclose(summary["grpo"]["gold"]["stderr"], np.std(gold, ddof=1) / np.sqrt(3))
    assert summarize(runs[:1])["dpo"]["kl"]["stderr"] == 0.0
    table = markdown(summary, 3, quick=False)
    assert table.count("\n| ") == len(VARIANTS) + 1 and "3 seed(s)" in table and "QUICK" not in table
    plot(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    cfg = quick_config(tmp_path, 2)  # a valid PipelineConfig with a table for every algorithm
    assert cfg.seed == 2 and all(getattr(cfg, a) for a in ("ppo", "grpo", "rloo", "dpo"))
