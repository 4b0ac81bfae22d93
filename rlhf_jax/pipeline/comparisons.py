"""Comparison data for the reward model: K samples of the SFT policy per prompt, ranked by a
simulated labeler (the built-in world), and the sampler the evaluation shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.data import Prompt, read_prompts, tokenize_prompts
from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.hf import load_pretrained
from rlhf_jax.pipeline.config import PipelineConfig
from rlhf_jax.tasks import (TARGET_AGREEMENT, calibrate_noise, expected_agreement, labeler_agreement,
                            make_comparisons, write_jsonl)
from rlhf_jax.tokenizer import Tokenizer

EMPTY_RESPONSE = " <empty>"


def sample(model, params, tokenizer: Tokenizer, prompts: list[str], *, max_prompt_len: int, max_new_tokens: int,
           temperature: float, key: jax.Array, batch_size: int = 64) -> tuple[list[str], list[bool], list[Any]]:
    """Sample one response per prompt: ``(texts, ended, rollouts)``; fixed batch shapes (the
    last batch is padded by repeating prompts) so the sampler compiles once."""
    arrays = tokenize_prompts([Prompt(p) for p in prompts], tokenizer, max_prompt_len, truncation="left")
    gen = GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
                         pad_id=tokenizer.pad_id)
    texts, ended, rollouts = [], [], []
    n = len(prompts)
    for i, start in enumerate(range(0, n, batch_size)):
        idx = np.arange(start, start + batch_size) % n
        ro = generate(model, params, arrays["tokens"][idx], arrays["mask"][idx], jax.random.fold_in(key, i), gen)
        resp, mask, end = (np.asarray(x) for x in (ro.response, ro.response_mask, ro.ended))
        keep = min(batch_size, n - start)
        for r in range(keep):
            texts.append(tokenizer.decode(resp[r][mask[r] != 0].tolist()))
            ended.append(bool(end[r]))
        rollouts.append((ro, keep))
    return texts, ended, rollouts


def build_comparisons(cfg: PipelineConfig, files: dict[str, Path], tokenizer_path: Path) -> dict[str, Any]:
    """K samples of the SFT policy per prompt, ranked by one simulated labeler (train and eval
    sets), and the labelers' agreement measured on the train sets.

    ``K`` samples per prompt (temperature 1, IG §3.5) are ranked; a pair of equal responses
    carries no preference, so duplicates are merged (K is ragged, at most ``cfg.k``) and prompts
    with fewer than two distinct samples are dropped.  (Sampling more and keeping K distinct ones
    would over-represent rare, mostly wrong answers, whose mutual pairs are nearly all ties.)  The
    readers reject empty responses, so a sample that stopped at once is written (and
    gold-labelled) as the junk word ``EMPTY_RESPONSE``; a sample whose text re-encodes longer than
    the model's context (undecodable bytes) is left out.  With ``world.labeler_noise=None`` the
    labelers' noise is calibrated on these train sets (``tasks.calibrate_noise``) so that two
    labelers agree on 73% of their pairs, as InstructGPT's did (IG §5.3), whatever the SFT
    policy's mistakes look like; where even noise-free labelers agree less (many pairs that the
    gold score ties), the noise is 0.
    """
    out = cfg.run_dir / "comparisons"
    stats_file = out / "stats.json"
    if cfg.task == "files":
        return {"train": files["comparisons"], "eval": files.get("comparisons_eval")}
    paths = {"train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")}
    if stats_file.exists():
        return {**json.loads(stats_file.read_text()), **paths}
    tokenizer = Tokenizer.from_file(tokenizer_path)
    model, params = load_pretrained(cfg.run_dir / "sft" / "model")
    splits = {"train": [r.prompt for r in read_prompts(files["prompts"])][: cfg.n_comparison_prompts],
              "eval": [r.prompt for r in read_prompts(files["prompts_eval"])]}
    sets: dict[str, tuple[list[str], list[list[str]], list[list[bool]]]] = {}
    for split, ps in splits.items():
        key = jax.random.PRNGKey(cfg.seed + (0 if split == "train" else 1))
        candidates: list[dict[tuple[str, bool], None]] = [{} for _ in ps]
        for j in range(cfg.k):
            texts, ended, _ = sample(model, params, tokenizer, ps, max_prompt_len=cfg.prompt_len,
                                     max_new_tokens=cfg.response_len, temperature=1.0, key=jax.random.fold_in(key, j))
            for p, distinct, t, e in zip(ps, candidates, texts, ended):
                t = t if t.strip() else EMPTY_RESPONSE
                if len(tokenizer.encode(p + t, add_bos=True, add_eos=True)) <= model.config.max_len:
                    distinct.setdefault((t, e), None)
        kept = [(p, list(d)) for p, d in zip(ps, candidates) if len(d) >= 2]
        sets[split] = ([p for p, _ in kept], [[t for t, _ in d] for _, d in kept], [[e for _, e in d] for _, d in kept])
    noise = cfg.world.labeler_noise
    if noise is None:
        reachable = expected_agreement(*sets["train"][:2], 0.0, sets["train"][2]) > TARGET_AGREEMENT
        noise = calibrate_noise(*sets["train"]) if reachable else 0.0
    rng = np.random.default_rng([cfg.seed, 7])
    for split, (ps, texts, ended) in sets.items():
        records = [rec for p, ts, es in zip(ps, texts, ended)
                   for rec in make_comparisons(rng, [p], [ts], [es], k=len(ts), noise=noise, config=cfg.world)]
        write_jsonl(out / f"{split}.jsonl", records)
    agreement, pairs = labeler_agreement(rng, *sets["train"][:2], noise, sets["train"][2])
    stats = {"labeler_agreement": agreement, "labeler_pairs": pairs, "labeler_noise": noise,
             "comparisons": len(sets["train"][0]), "mean_k": float(np.mean([len(t) for t in sets["train"][1]]))}
    stats_file.write_text(json.dumps(stats, indent=2))
    return {**stats, **paths}
