"""Evaluation and report of the ``smollm2_hh`` recipe: a held-out judge RM stands in for the
human labellers (Gao et al. 2022 "Scaling laws for reward model overoptimization"; AlpacaFarm).

On split C's prompts (never seen by SFT, either RM or PPO):

- the judge's win rate of the PPO policy against the SFT policy, averaged over all
  (PPO sample, SFT sample) pairs of a prompt (``pipeline.prompt_win_rates``), with the
  prompt-level standard error;
- both RMs' pairwise accuracy on C's human-labelled pairs (the RM stages' final evaluation);
- KL(PPO ‖ SFT) per response (k1 estimate on PPO's samples, ``pipeline.kl_per_sequence``) and
  the held-out ptx loss of SFT, PPO and PPO with γ = 0 (``pipeline.heldout_ptx_loss``);
- over-optimisation: mean proxy and judge scores against KL, for the PPO policy at each of the
  PPO stage's evaluations (its logged samples, rescored here) and for best-of-N from the SFT
  policy picked by the proxy (KL = log N − (N−1)/N, Stiennon et al. 2020 App. G.3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from rlhf_jax.data import Prompt, tokenize_prompts
from rlhf_jax.generation import score
from rlhf_jax.hf import load_pretrained
from rlhf_jax.model import Transformer
from rlhf_jax.pipeline import heldout_ptx_loss, kl_per_sequence, prompt_win_rates, sample
from rlhf_jax.report import format_table
from rlhf_jax.stages.sources import load_reward_model
from rlhf_jax.tokenizer import Tokenizer

RESULTS_FILE, GAMMA0_FILE = "results.json", "gamma0.json"

TABLE_KEYS = (
    ("win_rate_vs_sft", "judge win rate PPO vs SFT"),
    ("win_rate_stderr", "  its standard error (prompts)"),
    ("proxy_win_rate_vs_sft", "proxy win rate PPO vs SFT"),
    ("proxy_rm_accuracy", "proxy RM accuracy (C pairs)"),
    ("judge_rm_accuracy", "judge RM accuracy (C pairs)"),
    ("kl_to_sft", "KL(PPO || SFT) per response"),
    ("ptx_loss_sft", "ptx loss, SFT"),
    ("ptx_loss_ppo", "ptx loss, PPO (gamma > 0)"),
    ("ptx_loss_ppo_gamma0", "ptx loss, PPO (gamma = 0)"),
    ("kl_to_sft_gamma0", "KL(PPO gamma=0 || SFT)"),
    ("eos_rate_ppo", "PPO responses that end (EOS)"),
    ("wall_seconds_total", "wall seconds (all stages)"),
)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _last_eval(stage_dir: Path, key: str) -> float | None:
    """The last ``key`` a stage logged in ``metrics.jsonl`` (None if never)."""
    values = [r[key] for r in _jsonl(stage_dir / "metrics.jsonl") if key in r] if (stage_dir / "metrics.jsonl").exists() else []
    return values[-1] if values else None


def _load_policy(cfg: Any, path: Path) -> tuple[Transformer, Any]:
    """An exported policy with the recipe's compute dtype and ``scan_layers``."""
    model, params = load_pretrained(path, dtype=cfg.dtype)
    return Transformer(model.config.replace(scan_layers=cfg.scan_layers)), params


class _Scorer:
    """A reward model's normalised score of ``[b, P + N]`` rollouts: ``[b]`` numpy floats."""

    def __init__(self, path: Path, cfg: Any):
        model, self.params, self.gain, self.bias = load_reward_model(path, dtype=cfg.dtype)
        self.model = Transformer(model.config.replace(scan_layers=cfg.scan_layers))

    def __call__(self, tokens: Any, mask: Any) -> np.ndarray:
        return np.asarray(score(self.model, self.params, tokens, mask, gain=self.gain, bias=self.bias))


def _draws(policy, params, tokenizer: Tokenizer, prompts: list[str], n: int, key: jax.Array, cfg: Any,
           scorers: dict[str, _Scorer]) -> dict[str, Any]:
    """``n`` samples per prompt: ``texts``/``ended`` ``[n][prompts]``, each scorer's scores
    ``[prompts, n]`` and the rollouts (``[(rollout, kept rows)]``, for the KL)."""
    out: dict[str, Any] = {"texts": [], "ended": [], "rollouts": [], **{k: [] for k in scorers}}
    for j in range(n):
        texts, ended, rollouts = sample(policy, params, tokenizer, prompts, max_prompt_len=cfg.max_prompt_len,
                                        max_new_tokens=cfg.max_response_len, temperature=cfg.eval_temperature,
                                        key=jax.random.fold_in(key, j), batch_size=cfg.eval_batch_size)
        out["texts"].append(texts)
        out["ended"].append(ended)
        out["rollouts"] += rollouts
        for name, scorer in scorers.items():
            out[name].append(np.concatenate([scorer(ro.tokens, ro.mask)[:keep] for ro, keep in rollouts]))
    for name in scorers:
        out[name] = np.stack(out[name], axis=1)
    return out


def _ppo_curve(cfg: Any, ppo_dir: Path, prompts_file: Path, tokenizer: Tokenizer,
               scorers: dict[str, _Scorer]) -> list[dict[str, float]]:
    """Proxy and judge scores of the samples the PPO stage logged at each evaluation (sample
    ``i`` answers prompt ``i`` of its eval file), against the KL it logged there."""
    samples = _jsonl(ppo_dir / "samples.jsonl") if (ppo_dir / "samples.jsonl").exists() else []
    kl_at = {r["step"]: r["eval/kl"] for r in _jsonl(ppo_dir / "metrics.jsonl") if "eval/kl" in r}
    prompts = [r["prompt"] for r in _jsonl(prompts_file)]
    prompt_arrays = tokenize_prompts([Prompt(p) for p in prompts], tokenizer, cfg.max_prompt_len)
    width, b = cfg.max_response_len, cfg.eval_batch_size
    curve = []
    for step in sorted(kl_at):
        rows = [(int(r["key"].split("_")[-1]), json.loads(r["text"])) for r in samples if r["step"] == step]
        if not rows:
            continue
        idx = np.asarray([i for i, _ in rows])
        resp = np.full((len(rows), width), tokenizer.pad_id, np.int32)
        resp_mask = np.zeros((len(rows), width), np.int32)
        for r, (_, s) in enumerate(rows):
            ids = tokenizer.add_special(tokenizer.encode(s["response"]), False, bool(s["ended"]))[:width]
            resp[r, :len(ids)], resp_mask[r, :len(ids)] = ids, 1
        tokens = np.concatenate([prompt_arrays["tokens"][idx], resp], 1)
        mask = np.concatenate([prompt_arrays["mask"][idx], resp_mask], 1)
        point = {"step": step, "kl": kl_at[step]}
        for name, scorer in scorers.items():
            scores = [scorer(tokens[np.arange(s, s + b) % len(rows)], mask[np.arange(s, s + b) % len(rows)])
                      [: min(b, len(rows) - s)] for s in range(0, len(rows), b)]
            point[name] = float(np.mean(np.concatenate(scores)))
        curve.append(point)
    return curve


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def _eval_prompts(data: dict[str, Any]) -> list[dict[str, str]]:
    return _jsonl(Path(data["files"]["eval_prompts"]))


def evaluate_hh(cfg: Any, configs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The recipe's evaluation on split C (module docstring); stored in ``run/eval/results.json``
    and read back from there when present."""
    out = cfg.run_dir / "eval" / RESULTS_FILE
    if out.is_file():
        return json.loads(out.read_text())
    run = cfg.run_dir
    tokenizer = Tokenizer.from_file(configs["sft"].tokenizer)
    policy, sft_params = _load_policy(cfg, run / "sft" / "model")
    _, ppo_params = _load_policy(cfg, run / "ppo" / "model")
    scorers = {"proxy": _Scorer(run / "rm_proxy" / "model", cfg), "judge": _Scorer(run / "rm_judge" / "model", cfg)}
    rows = _eval_prompts(data)
    prompts = [r["prompt"] for r in rows]
    key = jax.random.PRNGKey(cfg.seed + 1000)
    sft = _draws(policy, sft_params, tokenizer, prompts, max(cfg.eval_samples, max(cfg.best_of_n)),
                 jax.random.fold_in(key, 0), cfg, scorers)
    ppo = _draws(policy, ppo_params, tokenizer, prompts, cfg.eval_samples, jax.random.fold_in(key, 1), cfg, scorers)
    per_prompt = prompt_win_rates(ppo["judge"], sft["judge"])
    proxy_per_prompt = prompt_win_rates(ppo["proxy"], sft["proxy"])
    kl = kl_per_sequence(policy, ppo_params, sft_params, ppo["rollouts"], cfg.eval_temperature)

    best_of_n = []
    for n in cfg.best_of_n:
        pick = np.argmax(sft["proxy"][:, :n], axis=1)
        rows_ = np.arange(len(prompts))
        best_of_n.append({"n": n, "kl": math.log(n) - (n - 1) / n, "proxy": float(sft["proxy"][rows_, pick].mean()),
                          "judge": float(sft["judge"][rows_, pick].mean())})
    ptx_file = Path(data["files"]["ptx_eval"])
    results = {
        "n_eval_prompts": len(prompts), "eval_samples_ppo": cfg.eval_samples, "eval_samples_sft": sft["judge"].shape[1],
        "win_rate_vs_sft": float(np.mean(per_prompt)), "win_rate_stderr": _stderr(per_prompt),
        "proxy_win_rate_vs_sft": float(np.mean(proxy_per_prompt)), "proxy_win_rate_stderr": _stderr(proxy_per_prompt),
        "judge_score_sft": float(sft["judge"].mean()), "judge_score_ppo": float(ppo["judge"].mean()),
        "proxy_score_sft": float(sft["proxy"].mean()), "proxy_score_ppo": float(ppo["proxy"].mean()),
        "proxy_rm_accuracy": _last_eval(run / "rm_proxy", "eval/accuracy"),
        "judge_rm_accuracy": _last_eval(run / "rm_judge", "eval/accuracy"),
        "kl_to_sft": kl,
        "ptx_loss_sft": heldout_ptx_loss(policy, sft_params, tokenizer, ptx_file, cfg.ptx_seq_len),
        "ptx_loss_ppo": heldout_ptx_loss(policy, ppo_params, tokenizer, ptx_file, cfg.ptx_seq_len),
        "eos_rate_sft": float(np.mean(sft["ended"])), "eos_rate_ppo": float(np.mean(ppo["ended"])),
        "best_of_n": best_of_n,
        "ppo_curve": _ppo_curve(cfg, run / "ppo", Path(data["files"]["ppo_eval_prompts"]), tokenizer, scorers),
        "ppo_final": {"kl": kl, "proxy": float(ppo["proxy"].mean()), "judge": float(ppo["judge"].mean())},
        "examples": [{"prompt": r["last_human"], "sft": s, "ppo": p, "judge_sft": float(js), "judge_ppo": float(jp)}
                     for r, s, p, js, jp in list(zip(rows, sft["texts"][0], ppo["texts"][0], sft["judge"][:, 0],
                                                     ppo["judge"][:, 0]))[: cfg.n_examples]],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    return results


def evaluate_gamma0(cfg: Any, configs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """The γ = 0 contrast: held-out ptx loss and KL to SFT (one sample per C prompt) of the PPO
    policy trained without the ptx term; stored in ``run/eval/gamma0.json``."""
    out = cfg.run_dir / "eval" / GAMMA0_FILE
    if out.is_file():
        return json.loads(out.read_text())
    run = cfg.run_dir
    tokenizer = Tokenizer.from_file(configs["sft"].tokenizer)
    policy, sft_params = _load_policy(cfg, run / "sft" / "model")
    _, params = _load_policy(cfg, run / "ppo_gamma0" / "model")
    prompts = [r["prompt"] for r in _eval_prompts(data)]
    _, _, rollouts = sample(policy, params, tokenizer, prompts, max_prompt_len=cfg.max_prompt_len,
                            max_new_tokens=cfg.max_response_len, temperature=cfg.eval_temperature,
                            key=jax.random.PRNGKey(cfg.seed + 2000), batch_size=cfg.eval_batch_size)
    results = {"kl_to_sft_gamma0": kl_per_sequence(policy, params, sft_params, rollouts, cfg.eval_temperature),
               "ptx_loss_ppo_gamma0": heldout_ptx_loss(policy, params, tokenizer, Path(data["files"]["ptx_eval"]),
                                                       cfg.ptx_seq_len)}
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


# ------------------------------------------------------------------------------ report


def _plots(run: Path, summary: dict[str, Any]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curve, bon = summary.get("ppo_curve", []), summary.get("best_of_n", [])
    for ax, name in zip(axes, ("proxy", "judge")):
        if curve:
            ax.plot([c["kl"] for c in curve], [c[name] for c in curve], "o-", label="PPO (evaluations)")
        ax.plot([r["kl"] for r in bon], [r[name] for r in bon], "^--", label="best-of-N from SFT")
        final = summary.get("ppo_final")
        if final:
            ax.plot([final["kl"]], [final[name]], "s", label="PPO final (split C)")
        ax.set_xlabel("KL to SFT (nats)"), ax.set_ylabel(f"{name} RM score"), ax.set_title(name), ax.legend()
    fig.tight_layout(), fig.savefig(run / "overoptimization.png", dpi=100), plt.close(fig)
    written.append("overoptimization.png")

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, stage, keys in zip(axes, ("sft", "rm_proxy", "rm_judge", "ppo"),
                               (("loss",), ("loss", "eval/accuracy"), ("loss", "eval/accuracy"), ("score", "kl", "ptx_loss"))):
        path = run / stage / "metrics.jsonl"
        rows = _jsonl(path) if path.exists() else []
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=key)
        if stage == "ppo":
            rows0 = _jsonl(run / "ppo_gamma0" / "metrics.jsonl") if (run / "ppo_gamma0" / "metrics.jsonl").exists() else []
            pts = [(r["step"], r["ptx_loss"]) for r in rows0 if "ptx_loss" in r]
            if pts:
                ax.plot(*zip(*pts), "--", label="ptx_loss (gamma=0)")
        ax.set_title(stage), ax.set_xlabel("step"), ax.legend()
    fig.tight_layout(), fig.savefig(run / "training.png", dpi=100), plt.close(fig)
    written.append("training.png")
    return written


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def write_hh_report(cfg: Any, summary: dict[str, Any], *, log: Callable[[str], Any] = print) -> Path:
    """``report.md`` and the PNG plots in the run directory; prints the table."""
    run = Path(cfg.run_dir)
    plots = _plots(run, summary)
    table = format_table(summary, TABLE_KEYS)
    data = summary.get("data", {})
    lines = [f"# {cfg.name}: SmolLM2-135M-Instruct, SFT -> RM -> PPO-ptx on HH-RLHF", "", table, "",
             f"Judge win rate over {summary.get('n_eval_prompts')} held-out prompts (split C), "
             f"{summary.get('eval_samples_ppo')} PPO x {summary.get('eval_samples_sft')} SFT samples per prompt, "
             f"temperature {cfg.eval_temperature}.", "",
             "## Data", "", f"- pairs per split (A: SFT/proxy RM/PPO, B: judge RM, C: evaluation): {data.get('pairs')}",
             f"- skipped records: {data.get('skipped')}", f"- left truncation and response cuts: {data.get('cuts')}", ""]
    if summary.get("best_of_n"):
        lines += ["## Over-optimisation: best-of-N from SFT (picked by the proxy) and PPO", "",
                  "| policy | KL | proxy | judge |", "|---|---|---|---|"]
        lines += [f"| best-of-{r['n']} | {r['kl']:.2f} | {r['proxy']:.3f} | {r['judge']:.3f} |" for r in summary["best_of_n"]]
        lines += [f"| PPO iteration {c['step']} | {c['kl']:.2f} | {c['proxy']:.3f} | {c['judge']:.3f} |"
                  for c in summary.get("ppo_curve", [])]
        f = summary.get("ppo_final")
        if f:
            lines.append(f"| PPO final (split C) | {f['kl']:.2f} | {f['proxy']:.3f} | {f['judge']:.3f} |")
        lines.append("")
    if summary.get("examples"):
        lines += [f"## {len(summary['examples'])} held-out prompts (last human turn), first sample of each policy", "",
                  "| prompt | SFT | PPO | judge SFT / PPO |", "|---|---|---|---|"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['sft'])} | {_cell(e['ppo'])} | "
                  f"{e['judge_sft']:.2f} / {e['judge_ppo']:.2f} |" for e in summary["examples"]] + [""]
    lines += ["## Stage wall time (s)", ""] + [f"- {k}: {v:.1f}" for k, v in summary.get("stage_seconds", {}).items()]
    lines += [""] + ([f"![{p}]({p})" for p in plots] if plots else ["(matplotlib not installed: no plots)"])
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(table)
    log(f"[recipe] report: {path}")
    return path
