"""Where a pipeline run's reward model helps and where it misleads, judged by the gold labeler.

    python -m experiments.rm_diagnostics runs/tiny [--n 8] [--seed 0]

For the run's held-out prompts it samples ``n + 1`` responses per prompt from the SFT policy (at
the run's evaluation temperature), scores them with the run's reward model and the world's gold
labeler, and prints:

- best-of-N picked by the reward model and by the gold labeler (the oracle), N = 1, 2, 4, ..., n:
  mean gold score, exact answers, and the win rate against the extra, independent SFT sample
  (ties count ½, as in ``summary.json``);
- the same per task family, for N = 1 and N = n;
- the reward model's pairwise accuracy on the gold order, split into pairs whose responses have
  the same number of words (only the content differs) and pairs of different lengths, with the
  mean score gap of each kind.

Only for the built-in world (``task="synthetic"``): the gold labeler is what judges.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import score
from rlhf_jax.data import read_prompts
from rlhf_jax.hf import load_pretrained
from rlhf_jax.pipeline import sample, win_rate
from rlhf_jax.stages.sources import load_reward_model
from rlhf_jax.tasks import gold_score, parse_prompt
from rlhf_jax.tokenizer import Tokenizer


def _samples(run: Path, n: int, seed: int) -> dict[str, np.ndarray | list]:
    """``n`` responses per held-out prompt: texts, gold and RM scores ``[prompts, n]``."""
    cfg = json.loads((run / "pipeline_config.json").read_text())
    if cfg.get("task", "synthetic") != "synthetic":
        raise SystemExit(f"{run}: task={cfg['task']!r}; the gold labeler only judges the built-in world")
    tokenizer = Tokenizer.from_file(run / "tokenizer" / "tokenizer.json")
    policy, params = load_pretrained(run / "sft" / "model")
    reward, reward_params, gain, bias = load_reward_model(run / "rm" / "model")
    prompts = [r.prompt for r in read_prompts(run / "data" / "prompts_eval.jsonl")]
    texts, gold, rm = [], np.zeros((len(prompts), n)), np.zeros((len(prompts), n))
    for j in range(n):
        t, ended, rollouts = sample(
            policy, params, tokenizer, prompts, max_prompt_len=cfg["prompt_len"],
            max_new_tokens=cfg["response_len"], temperature=cfg["eval_temperature"],
            key=jax.random.fold_in(jax.random.PRNGKey(seed), j),
        )
        texts.append(t)
        gold[:, j] = [gold_score(p, x, e) for p, x, e in zip(prompts, t, ended)]
        rm[:, j] = np.concatenate([
            np.asarray(score(reward, reward_params, ro.tokens, ro.mask, gain=gain, bias=bias))[:keep]
            for ro, keep in rollouts
        ])
    return {"prompts": prompts, "texts": list(zip(*texts)), "gold": gold, "rm": rm}


def _best_of(picker: np.ndarray, gold: np.ndarray, n: int) -> np.ndarray:
    """Gold score ``[prompts]`` of the candidate among the first ``n`` that ``picker`` ranks first."""
    return gold[np.arange(len(gold)), np.argmax(picker[:, :n], axis=1)]


def report(s: dict[str, np.ndarray | list], n: int) -> str:
    gold, rm = s["gold"][:, :n], s["rm"][:, :n]
    baseline = s["gold"][:, n]  # an independent SFT sample, never a candidate
    sizes = sorted({1, n, *[2**i for i in range(1, 8) if 2**i < n]})
    lines = ["| N | picked by | gold | exact | win vs an SFT sample |", "|---|---|---|---|---|"]
    for size in sizes:
        for name, picker in (("reward model", rm), ("gold (oracle)", gold)):
            g = _best_of(picker, gold, size)
            lines.append(f"| {size} | {name} | {g.mean():.3f} | {np.mean(g == 1):.3f} | {win_rate(g, baseline):.3f} |")
    families = np.array([parse_prompt(p)[0] for p in s["prompts"]])
    lines += ["", f"| family | prompts | exact, N = 1 | exact, best-of-{n} by RM | exact, best-of-{n} by gold |",
              "|---|---|---|---|---|"]
    for fam in sorted(set(families)):
        m = families == fam
        exact = [np.mean(x[m] == 1) for x in (gold[:, 0], _best_of(rm, gold, n), _best_of(gold, gold, n))]
        lines.append(f"| {fam} | {int(m.sum())} | " + " | ".join(f"{e:.2f}" for e in exact) + " |")
    kinds = {"same number of words": [0, 0, []], "different lengths": [0, 0, []]}
    for texts, g, r in zip(s["texts"], gold, rm):
        for i in range(n):
            for j in range(i + 1, n):
                if g[i] == g[j] or texts[i] == texts[j]:
                    continue
                kind = kinds["same number of words" if len(texts[i].split()) == len(texts[j].split()) else "different lengths"]
                kind[0] += (r[i] > r[j]) == (g[i] > g[j])
                kind[1] += 1
                kind[2].append(abs(r[i] - r[j]))
    lines += ["", "| pairs of distinct responses (gold differs) | pairs | RM accuracy on the gold order | mean RM gap |",
              "|---|---|---|---|"]
    for name, (right, total, gaps) in kinds.items():
        lines.append(f"| {name} | {total} | {right / max(total, 1):.3f} | {np.mean(gaps) if gaps else 0:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a pipeline run directory with sft/, rm/ and data/ (e.g. runs/tiny)")
    ap.add_argument("--n", type=int, default=8, help="largest best-of-N (n + 1 samples per prompt)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    for part in ("pipeline_config.json", "sft/model", "rm/model", "data/prompts_eval.jsonl"):
        if not (args.run / part).exists():
            ap.error(f"{args.run / part} does not exist: run `rlhf-jax pipeline` (built-in world) first")
    print(report(_samples(args.run, args.n + 1, args.seed), args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
