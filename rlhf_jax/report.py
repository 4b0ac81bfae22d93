"""The pipeline's report: ``report.md``, PNG plots and the final console table.

Plots (matplotlib, Agg backend; skipped with a note when matplotlib is missing):

- ``overoptimization.png``: reward-model score and gold score of held-out samples over PPO
  iterations, and both against KL to the SFT policy, with the best-of-N curve (Gao et al. 2022's
  over-optimisation picture);
- ``kl.png``, ``length.png``: KL to the reference and response length per iteration;
- ``losses.png``: pretraining / SFT / reward-model / PPO value and ptx losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rlhf_jax.tasks import gold_score

TABLE_KEYS = (
    ("gold_score_sft", "gold score, SFT policy"),
    ("gold_score_ppo", "gold score, PPO policy"),
    ("win_rate_vs_sft", "win rate PPO vs SFT (gold)"),
    ("win_rate_stderr", "  its standard error (prompts)"),
    ("exact_sft", "exact answers, SFT"),
    ("exact_ppo", "exact answers, PPO"),
    ("kl_to_sft", "KL(PPO || SFT) per response"),
    ("rm_accuracy", "RM accuracy (held-out labels)"),
    ("rm_gold_accuracy", "RM accuracy (gold order)"),
    ("labeler_agreement", "labeler-labeler agreement"),
    ("ptx_loss_sft", "pretraining loss, SFT"),
    ("ptx_loss_ppo", "pretraining loss, PPO"),
    ("wall_seconds_total", "wall seconds (all stages)"),
)


LABELS = {"ppo": "PPO", "grpo": "GRPO", "rloo": "RLOO", "dpo": "DPO", "best_of_n": "best-of-N"}


def table_keys(algorithm: str = "ppo") -> tuple[tuple[str, str], ...]:
    """``TABLE_KEYS`` for the policy of the pipeline's ``algorithm`` (``evaluate``'s key suffix)."""
    return tuple((key.replace("_ppo", f"_{algorithm}"), label.replace("PPO", LABELS[algorithm]))
                 for key, label in TABLE_KEYS)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gold_curve(ppo_dir: Path) -> list[dict[str, float]]:
    """Mean gold score of the held-out samples the PPO stage logged at each evaluation."""
    by_step: dict[int, list[float]] = {}
    for rec in _jsonl(ppo_dir / "samples.jsonl"):
        sample = json.loads(rec["text"])
        by_step.setdefault(rec["step"], []).append(gold_score(sample["prompt"], sample["response"], sample["ended"]))
    return [{"step": s, "gold": sum(v) / len(v)} for s, v in sorted(by_step.items())]


def format_table(summary: dict[str, Any], keys: tuple[tuple[str, str], ...] | None = None) -> str:
    """A markdown table of the ``(summary key, label)`` rows of ``keys`` (default: ``table_keys`` of
    the summary's ``algorithm``) that ``summary`` has."""
    keys = table_keys(summary.get("algorithm", "ppo")) if keys is None else keys
    rows = [(label, summary[key]) for key, label in keys if summary.get(key) is not None]
    width = max(len(label) for label, _ in rows) if rows else 0
    lines = [f"| {'metric':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {label:<{width}} | {value:.3f} |" for label, value in rows]
    bon = summary.get("best_of_n_matched_kl")
    if bon:
        lines.append(f"| {'best-of-' + str(bon['n']) + ' gold (matched KL)':<{width}} | {bon['gold']:.3f} |")
    return "\n".join(lines)


def _plots(run: Path, summary: dict[str, Any], curve: list[dict[str, float]]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    algorithm = summary.get("algorithm", "ppo")
    ppo = _jsonl(run / algorithm / "metrics.jsonl")
    train = [r for r in ppo if "score" in r]
    evals = [r for r in ppo if "eval/score" in r]
    written = []

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in evals], [r["eval/score"] for r in evals], "o-", label="reward model")
    a.plot([c["step"] for c in curve], [c["gold"] for c in curve], "s-", label="gold")
    a.set_xlabel("PPO iteration"), a.set_ylabel("held-out score"), a.legend(), a.set_title("RM vs gold")
    kl_at = {r["step"]: r["eval/kl"] for r in evals}
    b.plot([kl_at[c["step"]] for c in curve if c["step"] in kl_at], [c["gold"] for c in curve if c["step"] in kl_at],
           "s-", label="PPO (gold)")
    if summary.get("best_of_n"):
        b.plot([r["kl"] for r in summary["best_of_n"]], [r["gold"] for r in summary["best_of_n"]], "^--",
               label="best-of-N (gold)")
    b.set_xlabel("KL to SFT (nats)"), b.set_ylabel("gold score"), b.legend(), b.set_title("gold vs KL")
    fig.tight_layout(), fig.savefig(run / "overoptimization.png", dpi=100), plt.close(fig)
    written.append("overoptimization.png")

    for key, name, label in (("kl", "kl.png", "KL to SFT per response"), ("response_length", "length.png", "response length")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["step"] for r in train], [r[key] for r in train])
        ax.set_xlabel("PPO iteration"), ax.set_ylabel(label)
        fig.tight_layout(), fig.savefig(run / name, dpi=100), plt.close(fig)
        written.append(name)

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    policy_losses = ("vf_loss", "ptx_loss") if algorithm == "ppo" else ("pg_loss", "ptx_loss", "loss")
    for ax, stage, keys in zip(axes, ("pretrain", "sft", "rm", algorithm),
                               (("loss",), ("loss", "eval/loss"), ("loss", "eval/accuracy"), policy_losses)):
        rows = _jsonl(run / stage / "metrics.jsonl")
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(stage), ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
        else:  # a stage the run did not train (a pipeline from a base model has no pretrain stage)
            ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout(), fig.savefig(run / "losses.png", dpi=100), plt.close(fig)
    written.append("losses.png")
    return written


def write_report(cfg: Any, summary: dict[str, Any], *, log: Callable[[str], Any] = print) -> Path:
    """Write ``report.md`` and the plots into the run directory and print the final table."""
    run = Path(cfg.run_dir)
    algorithm = summary.get("algorithm", "ppo")
    curve = gold_curve(run / algorithm)
    plots = _plots(run, summary, curve)
    table = format_table(summary)
    lines = [f"# rlhf_jax pipeline report: {cfg.name}", "", table, ""]
    if curve:
        lines += ["## Gold score of held-out PPO samples over training", "",
                  "| iteration | gold |", "|---|---|"] + [f"| {c['step']} | {c['gold']:.3f} |" for c in curve] + [""]
    if summary.get("best_of_n"):
        lines += ["## Best-of-N from the SFT policy (picked by the reward model)", "",
                  "| N | KL | RM score | gold |", "|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['kl']:.2f} | {r['rm']:.3f} | {r['gold']:.3f} |" for r in summary["best_of_n"]] + [""]
    if summary.get("examples"):
        lines += ["## Examples", "", f"| prompt | SFT | {LABELS[algorithm]} |", "|---|---|---|"]
        lines += [f"| `{e['prompt']!r}` | `{e['sft']!r}` | `{e[algorithm]!r}` |" for e in summary["examples"]] + [""]
    lines += ["## Stage wall time (s)", ""] + [f"- {k}: {v:.1f}" for k, v in summary.get("stage_seconds", {}).items()]
    lines += [""] + [f"![{p}]({p})" for p in plots] if plots else ["", "(matplotlib not installed: no plots)"]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    log(table)
    log(f"[pipeline] report: {path}")
    return path
