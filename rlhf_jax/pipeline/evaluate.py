"""The gold-labeler evaluation of the PPO policy against the SFT policy (built-in world): win
rates with their standard error, KL to the SFT policy, best-of-N, reward-model accuracy and the
held-out pretraining loss."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import read_comparisons, read_pretrain_texts, read_prompts, tokenize_comparisons, tokenize_texts
from rlhf_jax.generation import score, sequence_logprobs
from rlhf_jax.hf import load_pretrained
from rlhf_jax.losses import ptx_loss
from rlhf_jax.model import forward
from rlhf_jax.pipeline.comparisons import sample
from rlhf_jax.pipeline.config import PipelineConfig
from rlhf_jax.pipeline.inputs import world_files
from rlhf_jax.stages.reward import k_way_rewards
from rlhf_jax.stages.sources import load_reward_model
from rlhf_jax.tasks import gold_score
from rlhf_jax.tokenizer import Tokenizer


def prompt_win_rates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt, the fraction of (a sample, b sample) pairs that a wins, ties counting one half.

    Args:
      a, b: gold scores ``[prompts]`` (one sample each) or ``[prompts, samples]``.

    Returns:
      ``[prompts]``: the mean over all ``a``-``b`` sample pairs of the prompt.
    """
    a = np.asarray(a, np.float64).reshape(len(a), -1)[:, :, None]
    b = np.asarray(b, np.float64).reshape(len(b), -1)[:, None, :]
    return np.mean((a > b) + 0.5 * (a == b), axis=(1, 2))


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """P(a beats b): ``prompt_win_rates`` averaged over the prompts."""
    return float(np.mean(prompt_win_rates(a, b)))


def kl_per_sequence(policy, policy_params, ref_params, rollouts, temperature: float) -> float:
    """Mean over sampled responses of Σ_t log π(y_t)/π_SFT(y_t) (the k1 estimate of KL)."""
    total, count = 0.0, 0
    for ro, keep in rollouts:
        p = ro.response_start
        lp, _ = sequence_logprobs(policy, policy_params, ro.tokens, ro.mask, p, temperature=temperature)
        lr, _ = sequence_logprobs(policy, ref_params, ro.tokens, ro.mask, p, temperature=temperature)
        total += float(jnp.sum((lp - lr)[:keep]))
        count += keep
    return total / max(count, 1)


def heldout_ptx_loss(model, params, tokenizer: Tokenizer, path: Path, seq_len: int) -> float:
    """``losses.ptx_loss`` of a pretraining JSONL file cut into ``seq_len`` blocks, in one forward."""
    blocks = tokenize_texts([r.text for r in read_pretrain_texts(path)], tokenizer, seq_len)
    toks, mask = jnp.asarray(blocks["tokens"]), jnp.asarray(blocks["mask"])
    return float(ptx_loss(forward(model, params, toks, mask).logits, toks, mask))


def _rm_accuracy(reward, reward_params, tokenizer: Tokenizer, path: Path, gold: bool) -> float:
    """Pairwise accuracy of the RM on held-out comparisons: against the labeler's ranking, or
    (``gold``) against the gold labeler's order of each pair."""
    records = read_comparisons(path)
    arrays = tokenize_comparisons(records, tokenizer, max(len(r.responses) for r in records), reward.config.max_len)
    scores = np.asarray(k_way_rewards(reward, reward_params, jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["mask"])))
    right = total = 0
    for rec, s in zip(records, scores):
        g = [gold_score(rec.prompt, r, True) for r in rec.responses] if gold else None
        for i in range(len(rec.responses)):
            for j in range(i + 1, len(rec.responses)):
                if gold:
                    if g[i] == g[j]:
                        continue
                    right += (s[i] > s[j]) == (g[i] > g[j])
                else:
                    right += s[i] > s[j]  # responses are best-first
                total += 1
    return right / max(total, 1)


def evaluate(cfg: PipelineConfig, configs: dict[str, Any], comparisons: dict[str, Any]) -> dict[str, Any]:
    """Gold-labeler evaluation of the aligned policy (``cfg.algorithm``'s ``model/``) against the
    SFT policy (synthetic task).  Its keys end in the algorithm's name (``gold_score_ppo``,
    ``exact_grpo``, ...).  ``best_of_n`` trains nothing: its policy is the SFT policy's best of
    ``max(best_of_n)`` samples by the reward model, one per prompt, at KL log N − (N−1)/N."""
    name = cfg.algorithm
    tokenizer = Tokenizer.from_file(configs["sft"].tokenizer)
    policy, sft_params = load_pretrained(cfg.run_dir / "sft" / "model")
    ppo_params = None if name == "best_of_n" else load_pretrained(cfg.run_dir / name / "model")[1]
    reward, reward_params, gain, bias = load_reward_model(cfg.run_dir / "rm" / "model")
    files = world_files(cfg)
    prompts = [r.prompt for r in read_prompts(files["prompts_eval"])]
    kw = dict(max_prompt_len=cfg.prompt_len, max_new_tokens=cfg.response_len, temperature=cfg.eval_temperature)
    key = jax.random.PRNGKey(cfg.seed + 1000)

    def draws(params, stream: int) -> tuple[np.ndarray, list[str], list[bool], list[Any]]:
        """``eval_samples`` responses per prompt: gold scores ``[prompts, samples]``, the first
        sample's texts, and every sample's ended flags and rollouts."""
        gold, texts, ended, rollouts = [], [], [], []
        for j in range(cfg.eval_samples):
            t, e, ro = sample(policy, params, tokenizer, prompts, key=jax.random.fold_in(jax.random.fold_in(key, stream), j), **kw)
            gold.append([gold_score(p, x, end) for p, x, end in zip(prompts, t, e)])
            texts, ended, rollouts = texts or t, ended + e, rollouts + ro
        return np.asarray(gold).T, texts, ended, rollouts

    gold_sft, sft_texts, _, _ = draws(sft_params, 0)
    if ppo_params is not None:
        gold_ppo, ppo_texts, ppo_ended, ppo_rollouts = draws(ppo_params, 1)
        kl = kl_per_sequence(policy, ppo_params, sft_params, ppo_rollouts, cfg.eval_temperature)

    # Best-of-N from the SFT policy, picked by the reward model (KL = log N − (N−1)/N).
    n_max = max(cfg.best_of_n)
    cand_gold, cand_rm = np.zeros((len(prompts), n_max)), np.zeros((len(prompts), n_max))
    cand_texts, cand_ended = [], np.zeros((len(prompts), n_max), bool)
    for j in range(n_max):
        texts, ended, rollouts = sample(policy, sft_params, tokenizer, prompts, key=jax.random.fold_in(key, 100 + j), **kw)
        cand_gold[:, j] = [gold_score(p, t, e) for p, t, e in zip(prompts, texts, ended)]
        cand_texts.append(texts)
        cand_ended[:, j] = ended
        rm = [np.asarray(score(reward, reward_params, ro.tokens, ro.mask, gain=gain, bias=bias))[:keep]
              for ro, keep in rollouts]
        cand_rm[:, j] = np.concatenate(rm)
    best_of_n = []
    for n in cfg.best_of_n:
        pick = np.argmax(cand_rm[:, :n], axis=1)
        best_of_n.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                          "gold": float(cand_gold[np.arange(len(prompts)), pick].mean()),
                          "rm": float(cand_rm[np.arange(len(prompts)), pick].mean())})
    if ppo_params is None:  # best_of_n: the policy is the best of n_max (one pick per prompt)
        pick = np.argmax(cand_rm, axis=1)
        rows = np.arange(len(prompts))
        gold_ppo, ppo_ended = cand_gold[rows, pick][:, None], cand_ended[rows, pick]
        ppo_texts = [cand_texts[j][i] for i, j in enumerate(pick)]
        ppo_params, kl = sft_params, best_of_n[-1]["kl"]  # its pretraining loss is the SFT policy's
    per_prompt = prompt_win_rates(gold_ppo, gold_sft)
    matched = min(best_of_n, key=lambda r: abs(r["kl"] - kl))

    seq_len = cfg.prompt_len + cfg.response_len
    rm_eval = comparisons.get("eval")
    return {
        "gold_score_sft": float(np.mean(gold_sft)),
        f"gold_score_{name}": float(np.mean(gold_ppo)),
        "win_rate_vs_sft": float(np.mean(per_prompt)),
        "win_rate_stderr": float(np.std(per_prompt, ddof=1) / math.sqrt(len(prompts))) if len(prompts) > 1 else 0.0,
        "eval_samples": cfg.eval_samples,
        "exact_sft": float(np.mean(gold_sft == 1.0)),
        f"exact_{name}": float(np.mean(gold_ppo == 1.0)),
        "kl_to_sft": kl,
        "rm_accuracy": _rm_accuracy(reward, reward_params, tokenizer, Path(rm_eval), gold=False),
        "rm_gold_accuracy": _rm_accuracy(reward, reward_params, tokenizer, Path(rm_eval), gold=True),
        "ptx_loss_sft": heldout_ptx_loss(policy, sft_params, tokenizer, files["pretrain_eval"], seq_len),
        f"ptx_loss_{name}": heldout_ptx_loss(policy, ppo_params, tokenizer, files["pretrain_eval"], seq_len),
        "labeler_agreement": comparisons.get("labeler_agreement"),
        "labeler_noise": comparisons.get("labeler_noise"),
        "best_of_n": best_of_n,
        "best_of_n_matched_kl": matched,
        f"eos_rate_{name}": float(np.mean(ppo_ended)),
        "examples": [{"prompt": p, "sft": s, name: q} for p, s, q in list(zip(prompts, sft_texts, ppo_texts))[:8]],
    }
