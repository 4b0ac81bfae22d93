"""``rlhf-jax pipeline``: the whole InstructGPT recipe, end to end, resumable stage by stage.

    world files → tokenizer → base-model pretraining → SFT → comparisons (K samples of the SFT
    policy ranked by simulated labelers) → reward model → PPO-ptx → evaluation → report

Every stage writes under ``runs/<name>/<stage>/`` and is skipped when already complete; the
training stages resume from their last checkpoint, and the sampling stages are deterministic
from the seed, so killing the pipeline anywhere and re-running the same command ends with the
same numbers.  With ``task="files"`` the same path runs on your own data and model (a Hugging
Face directory and JSONL files); the gold-labeler evaluation is then skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.configs import from_dict, merge_dicts, to_dict
from rlhf_jax.data import read_comparisons, read_prompts, tokenize_comparisons, tokenize_prompts
from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.errors import check
from rlhf_jax.generation import GenerateConfig, generate, score, sequence_logprobs
from rlhf_jax.hf import load_pretrained
from rlhf_jax.losses import ptx_loss
from rlhf_jax.model import ModelConfig, forward
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.stages.ppo import PPOStageConfig, train_ppo
from rlhf_jax.stages.reward import RMConfig, k_way_rewards, load_reward_model, train_rm
from rlhf_jax.stages.sft import SFTConfig, train_sft
from rlhf_jax.tasks import (
    TARGET_AGREEMENT,
    WorldConfig,
    calibrate_noise,
    expected_agreement,
    gold_score,
    labeler_agreement,
    make_comparisons,
    make_world_files,
    pretraining_texts,
    write_jsonl,
)
from rlhf_jax.tokenizer import Tokenizer

SUMMARY_FILE = "summary.json"
EMPTY_RESPONSE = " <empty>"


@dataclasses.dataclass(frozen=True)
class DataFiles:
    """Your own data for ``task="files"`` (JSONL, formats in the README)."""

    demos: str | None = None
    demos_eval: str | None = None
    comparisons: str | None = None
    comparisons_eval: str | None = None
    prompts: str | None = None
    prompts_eval: str | None = None
    pretrain: str | None = None


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The pipeline: run layout, the built-in world's sizes, the model, and per-stage overrides.

    ``pretrain``/``sft``/``rm``/``ppo``: dicts merged over the stage configs the pipeline builds
    (same keys as ``SFTConfig``, ``RMConfig``, ``PPOStageConfig``; e.g.
    ``--set ppo.ppo.ptx_coef=1.0`` or ``--set sft.loop.total_steps=500``).
    ``base_model``: a Hugging Face directory to start SFT from (skips pretraining); otherwise
    ``model`` is initialised randomly and pretrained on the world's corpus.
    ``k``: responses ranked per comparison (IG §3.5: 4..9).  ``eval_samples``: responses per
    held-out prompt and policy for the gold comparison (the win rate averages all
    ``eval_samples²`` PPO-vs-SFT pairs of a prompt, which lowers its variance; its prompt-level
    standard error is reported).  ``best_of_n``: the N of the
    best-of-N baseline (its KL to the SFT policy is log N − (N−1)/N).
    ``distributed``: multi-host start-up (``rlhf_jax.distributed``), applied once by the CLI
    before the first stage; only with ``task="files"`` (the built-in world's sampling and
    evaluation stages write their files from one process).
    """

    name: str = "tiny"
    runs_dir: str = "runs"
    seed: int = 0
    task: Literal["synthetic", "files"] = "synthetic"
    world: WorldConfig = WorldConfig()
    files: DataFiles = DataFiles()
    n_pretrain: int = 80000
    n_demos: int = 6000
    n_prompts: int = 6144
    n_comparison_prompts: int = 6144
    n_eval_prompts: int = 256
    n_eval_demos: int = 128
    k: int = 6
    vocab_size: int = 384
    model: ModelConfig = ModelConfig(arch="llama", vocab_size=384, d_model=96, n_layers=3, n_heads=4, d_ff=256, max_len=40)
    base_model: str | None = None
    tokenizer: str | None = None
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    prompt_len: int = 16
    response_len: int = 12
    eval_temperature: float = 1.0
    eval_samples: int = 4
    best_of_n: tuple[int, ...] = (1, 2, 4, 8, 16)
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    sft: dict[str, Any] = dataclasses.field(default_factory=dict)
    rm: dict[str, Any] = dataclasses.field(default_factory=dict)
    ppo: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.task in ("synthetic", "files"), self, "task", "'synthetic' or 'files'")
        check(self.name and "/" not in self.name, self, "name", "a non-empty name without '/'")
        check(2 <= self.k <= 9, self, "k", "in [2, 9] (IG §3.5: 4..9)")
        check(self.base_model is not None or self.prompt_len + self.response_len <= self.model.max_len,
              self, "response_len", f"at most model.max_len={self.model.max_len} - prompt_len={self.prompt_len}")
        check(isinstance(self.eval_samples, int) and self.eval_samples >= 1, self, "eval_samples", "an int >= 1")
        check(self.best_of_n and min(self.best_of_n) >= 1, self, "best_of_n", "a non-empty list of ints >= 1")
        if self.task == "files":
            missing = [f for f in ("demos", "prompts") if getattr(self.files, f) is None]
            check(not missing and (self.base_model is not None or self.files.pretrain is not None), self, "files",
                  f"files.demos, files.prompts and a base_model or files.pretrain for task='files' "
                  f"(missing: {missing or ['pretrain']})")
            check(self.files.comparisons is not None,
                  self, "files", "files.comparisons (labelled rankings) too for task='files'")
        else:
            check(not self.distributed.enabled, self, "distributed",
                  "disabled for task='synthetic': multi-host runs need task='files' (the built-in world samples "
                  "and evaluates in one process)")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def _stage(cls: type, defaults: dict[str, Any], overrides: dict[str, Any], where: str) -> Any:
    return from_dict(cls, merge_dicts(defaults, overrides), where=where)


# ------------------------------------------------------------------------------ the stages


def _world(cfg: PipelineConfig) -> dict[str, Path]:
    """The synthetic world's JSONL files (idempotent: same seed, same bytes)."""
    data = cfg.run_dir / "data"
    if cfg.task == "files":
        return {k: Path(v) for k, v in dataclasses.asdict(cfg.files).items() if v is not None}
    files = {name: data / f"{name}.jsonl" for name in ("pretrain", "demos", "demos_eval", "prompts", "prompts_eval")}
    if not all(p.exists() for p in files.values()):
        files = make_world_files(data, cfg.seed, cfg.n_pretrain, cfg.n_demos, cfg.n_prompts,
                                 n_eval_demos=cfg.n_eval_demos, n_eval_prompts=cfg.n_eval_prompts, config=cfg.world)
    heldout = data / "pretrain_eval.jsonl"
    if not heldout.exists():
        rng = np.random.default_rng([cfg.seed, 99])
        write_jsonl(heldout, [{"text": t} for t in pretraining_texts(rng, 256, cfg.world)])
    return {**files, "pretrain_eval": heldout}


def _tokenizer(cfg: PipelineConfig, files: dict[str, Path]) -> Path:
    """A byte-level BPE trained on the world's text (or the given tokenizer)."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.base_model is not None:
        return Path(cfg.base_model)
    path = cfg.run_dir / "tokenizer" / "tokenizer.json"
    if not path.exists():
        texts = [json.loads(line)["text"] for line in files["pretrain"].read_text().splitlines()]
        texts += [json.loads(line)["prompt"] + json.loads(line)["response"]
                  for line in files["demos"].read_text().splitlines()]
        Tokenizer.train(texts, cfg.vocab_size).save(path.parent)
    return path


def _pretrain_data(cfg: PipelineConfig, files: dict[str, Path], tokenizer: Path) -> Path:
    """Pretraining rows as prompt-less demonstrations (the LM loss on every token is the SFT
    loss with an empty prompt): consecutive texts joined by the EOS token, as many as fit
    ``model.max_len`` with BOS and the final EOS.  This is the layout of the PPO-ptx stream
    (``data.tokenize_texts``: ``text EOS text EOS ...``), so the ptx term and ``ptx_loss_*``
    measure the distribution the base model was trained on (attention crosses documents and the
    token after an EOS starts a new text, as in GPT-style pretraining)."""
    path = cfg.run_dir / "data" / "pretrain_as_demos.jsonl"
    if not path.exists():
        tok = Tokenizer.from_file(tokenizer)
        eos = tok.hf.id_to_token(tok.eos_id)
        texts = [json.loads(line)["text"] for line in files["pretrain"].read_text().splitlines() if line.strip()]
        rows, row, used = [], [], 0
        for text, n in zip(texts, (len(e.ids) + 1 for e in tok.hf.encode_batch(texts, add_special_tokens=False))):
            if row and used + n > cfg.model.max_len - 1:  # + BOS
                rows.append(row)
                row, used = [], 0
            row.append(text)
            used += n
        rows.append(row)
        write_jsonl(path, [{"prompt": "", "response": eos.join(r)} for r in rows if r])
    return path


def _common(cfg: PipelineConfig, stage: str, tokenizer: Path) -> dict[str, Any]:
    return {"workdir": str(cfg.run_dir / stage), "tokenizer": str(tokenizer), "seed": cfg.seed,
            "mesh": to_dict(cfg.mesh), "distributed": to_dict(cfg.distributed)}


def _comparison_files(cfg: PipelineConfig, files: dict[str, Path]) -> dict[str, str | None]:
    """The RM's train/eval comparisons: the user's files (``task="files"``) or those the
    comparisons stage writes under ``runs/<name>/comparisons/``."""
    if cfg.task == "files":
        eval_file = files.get("comparisons_eval")
        return {"train_data": str(files["comparisons"]), "eval_data": str(eval_file) if eval_file else None}
    out = cfg.run_dir / "comparisons"
    return {"train_data": str(out / "train.jsonl"), "eval_data": str(out / "eval.jsonl")}


def stage_configs(cfg: PipelineConfig, files: dict[str, Path], tokenizer: Path) -> dict[str, Any]:
    """The stage configs the pipeline runs (defaults tuned for the built-in world on a laptop
    CPU; the paper's values are the stage configs' own defaults)."""
    configs: dict[str, Any] = {}
    vocab = Tokenizer.from_file(tokenizer).vocab_size
    base_source: dict[str, Any]
    if cfg.base_model is None:
        model = to_dict(cfg.model.replace(vocab_size=max(cfg.model.vocab_size, vocab)))
        configs["pretrain"] = _stage(SFTConfig, {
            **_common(cfg, "pretrain", tokenizer), "model": {"init": model},
            "train_data": str(_pretrain_data(cfg, files, tokenizer)), "batch_size": 16, "buckets": [cfg.model.max_len],
            "max_len": cfg.model.max_len, "truncation": "right", "prompt_masking": False, "sample_prompts": 0,
            "optimizer": {"lr": 3e-3, "schedule": "cosine", "warmup_steps": 20, "weight_decay": 0.0},
            "loop": {"total_steps": 1500, "save_every": 500},
        }, cfg.pretrain, "pretrain")
        base_source = {"hf_dir": str(cfg.run_dir / "pretrain" / "model")}
    else:
        base_source = {"hf_dir": cfg.base_model}
    sft_model = {"hf_dir": str(cfg.run_dir / "sft" / "model")}
    max_len = cfg.prompt_len + cfg.response_len
    configs["sft"] = _stage(SFTConfig, {
        **_common(cfg, "sft", tokenizer), "model": base_source, "train_data": str(files["demos"]),
        "eval_data": str(files["demos_eval"]) if "demos_eval" in files else None,
        "batch_size": 16, "buckets": [max_len], "max_len": max_len, "sample_prompts": 4,
        "sample_max_new_tokens": cfg.response_len,
        "optimizer": {"lr": 2e-3, "schedule": "cosine", "warmup_steps": 20}, "epochs": 4.0,
        "loop": {"eval_every": 500, "save_every": 500},
    }, cfg.sft, "sft")
    configs["rm"] = _stage(RMConfig, {
        **_common(cfg, "rm", tokenizer), "model": sft_model, **_comparison_files(cfg, files), "demos": str(files["demos"]),
        # Sampled responses may be cut without EOS (+1 when the EOS is appended) and re-encode to
        # other tokens: buckets for the usual short answers (most batches fit prompt + half the
        # response), the whole length, and the model's context for the rest.
        "batch_size": 32, "buckets": [cfg.prompt_len + cfg.response_len // 2, max_len + 1], "max_len": None,
        # The last token of a 3-layer model cannot check a multi-word answer word by word; a mean
        # over the tokens can (README "Results").  Duplicates are merged, so K is ragged (mean
        # 3.6 of 6): batches grouped by K skip the padded responses' compute.
        "epochs": 6.0, "score_pooling": "mean", "k_buckets": list(range(2, cfg.k + 1)),
        "optimizer": {"lr": 1e-3, "schedule": "cosine"}, "loop": {"eval_every": 128, "save_every": 128},
    }, cfg.rm, "rm")
    configs["ppo"] = _stage(PPOStageConfig, {
        **_common(cfg, "ppo", tokenizer), "model": sft_model, "reward_model": str(cfg.run_dir / "rm" / "model"),
        "train_data": str(files["prompts"]),
        "eval_data": str(files["prompts_eval"]) if "prompts_eval" in files else None,
        "ptx_data": str(files["pretrain"]) if "pretrain" in files else None,
        "batch_size": 256, "epochs": 1.0, "max_prompt_len": cfg.prompt_len, "ptx_batch_size": 8,
        "ptx_seq_len": cfg.prompt_len + cfg.response_len, "eval_samples": 64, "phase_timing": True,
        "ppo": {"generation": {"max_new_tokens": cfg.response_len, "temperature": 1.0},
                "num_minibatches": 4, "epochs": 1, "ptx_coef": 0.1, "missing_eos_penalty": 1.0,
                "kl": {"kind": "fixed", "init_kl_coef": 0.2}},
        "optimizer": {"lr": 3e-4, "warmup_steps": 3, "schedule": "constant"},
        "value_optimizer": {"lr": 1e-3, "schedule": "constant"},
        "loop": {"total_steps": 80, "eval_every": 10, "save_every": 10},
    }, cfg.ppo, "ppo")
    return configs


# ------------------------------------------------------------------------------ sampling


def sample(model, params, tokenizer: Tokenizer, prompts: list[str], *, max_prompt_len: int, max_new_tokens: int,
           temperature: float, key: jax.Array, batch_size: int = 64) -> tuple[list[str], list[bool], list[Any]]:
    """Sample one response per prompt: ``(texts, ended, rollouts)``; fixed batch shapes (the
    last batch is padded by repeating prompts) so the sampler compiles once."""
    from rlhf_jax.data import Prompt

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


def _comparisons(cfg: PipelineConfig, files: dict[str, Path], tokenizer_path: Path) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------ evaluation


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
    from rlhf_jax.data import read_pretrain_texts, tokenize_texts

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
    """Gold-labeler evaluation of the PPO policy against the SFT policy (synthetic task)."""
    tokenizer = Tokenizer.from_file(configs["sft"].tokenizer)
    policy, sft_params = load_pretrained(cfg.run_dir / "sft" / "model")
    _, ppo_params = load_pretrained(cfg.run_dir / "ppo" / "model")
    reward, reward_params, gain, bias = load_reward_model(cfg.run_dir / "rm" / "model")
    files = _world(cfg)
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
    gold_ppo, ppo_texts, ppo_ended, ppo_rollouts = draws(ppo_params, 1)
    kl = kl_per_sequence(policy, ppo_params, sft_params, ppo_rollouts, cfg.eval_temperature)
    per_prompt = prompt_win_rates(gold_ppo, gold_sft)

    # Best-of-N from the SFT policy, picked by the reward model (KL = log N − (N−1)/N).
    n_max = max(cfg.best_of_n)
    cand_gold, cand_rm = np.zeros((len(prompts), n_max)), np.zeros((len(prompts), n_max))
    for j in range(n_max):
        texts, ended, rollouts = sample(policy, sft_params, tokenizer, prompts, key=jax.random.fold_in(key, 100 + j), **kw)
        cand_gold[:, j] = [gold_score(p, t, e) for p, t, e in zip(prompts, texts, ended)]
        rm = [np.asarray(score(reward, reward_params, ro.tokens, ro.mask, gain=gain, bias=bias))[:keep]
              for ro, keep in rollouts]
        cand_rm[:, j] = np.concatenate(rm)
    best_of_n = []
    for n in cfg.best_of_n:
        pick = np.argmax(cand_rm[:, :n], axis=1)
        best_of_n.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                          "gold": float(cand_gold[np.arange(len(prompts)), pick].mean()),
                          "rm": float(cand_rm[np.arange(len(prompts)), pick].mean())})
    matched = min(best_of_n, key=lambda r: abs(r["kl"] - kl))

    seq_len = cfg.prompt_len + cfg.response_len
    rm_eval = comparisons.get("eval")
    return {
        "gold_score_sft": float(np.mean(gold_sft)),
        "gold_score_ppo": float(np.mean(gold_ppo)),
        "win_rate_vs_sft": float(np.mean(per_prompt)),
        "win_rate_stderr": float(np.std(per_prompt, ddof=1) / math.sqrt(len(prompts))) if len(prompts) > 1 else 0.0,
        "eval_samples": cfg.eval_samples,
        "exact_sft": float(np.mean(gold_sft == 1.0)),
        "exact_ppo": float(np.mean(gold_ppo == 1.0)),
        "kl_to_sft": kl,
        "rm_accuracy": _rm_accuracy(reward, reward_params, tokenizer, Path(rm_eval), gold=False),
        "rm_gold_accuracy": _rm_accuracy(reward, reward_params, tokenizer, Path(rm_eval), gold=True),
        "ptx_loss_sft": heldout_ptx_loss(policy, sft_params, tokenizer, files["pretrain_eval"], seq_len),
        "ptx_loss_ppo": heldout_ptx_loss(policy, ppo_params, tokenizer, files["pretrain_eval"], seq_len),
        "labeler_agreement": comparisons.get("labeler_agreement"),
        "labeler_noise": comparisons.get("labeler_noise"),
        "best_of_n": best_of_n,
        "best_of_n_matched_kl": matched,
        "eos_rate_ppo": float(np.mean(ppo_ended)),
        "examples": [{"prompt": p, "sft": s, "ppo": q} for p, s, q in list(zip(prompts, sft_texts, ppo_texts))[:8]],
    }


# ------------------------------------------------------------------------------ driver


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (``os.times``)."""
    t = os.times()
    return t.user + t.system


class StageTimer:
    """Runs a driver's stages, adding each one's wall and CPU seconds to ``run/timings.json``
    (kept across resumed runs: a stage's time is the sum over the runs that worked on it).

    ``timer(stage, fn, *args)`` logs the stage, returns ``fn(*args)``; ``wall``/``cpu``: seconds
    per stage so far."""

    def __init__(self, run: Path, log=print, prefix: str = "pipeline"):
        self.file = Path(run) / "timings.json"
        timings = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.timings = timings
        self.wall: dict[str, float] = timings.setdefault("wall", {})
        self.cpu: dict[str, float] = timings.setdefault("cpu", {})
        self.log, self.prefix = log, prefix

    def __call__(self, stage: str, fn, *args):
        self.log(f"[{self.prefix}] {stage} ...")
        start, start_cpu = time.time(), _cpu_seconds()
        result = fn(*args)
        self.wall[stage] = self.wall.get(stage, 0.0) + time.time() - start
        self.cpu[stage] = self.cpu.get(stage, 0.0) + _cpu_seconds() - start_cpu
        self.file.write_text(json.dumps(self.timings, indent=2))
        return result


def run_pipeline(cfg: PipelineConfig, *, log=print) -> dict[str, Any]:
    """Run every stage (skipping complete ones), evaluate, write ``summary.json`` and the report."""
    t0 = time.time()
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    (run / "pipeline_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    timed = StageTimer(run, log=log)
    wall, cpu = timed.wall, timed.cpu

    files = timed("data", _world, cfg)
    tokenizer = timed("tokenizer", _tokenizer, cfg, files)
    configs = stage_configs(cfg, files, tokenizer)
    if "pretrain" in configs:
        timed("pretrain", train_sft, configs["pretrain"])
    timed("sft", train_sft, configs["sft"])
    comparisons = timed("comparisons", _comparisons, cfg, files, tokenizer)
    timed("rm", train_rm, configs["rm"])
    timed("ppo", train_ppo, configs["ppo"])
    summary: dict[str, Any] = {"name": cfg.name}
    if cfg.task == "synthetic":
        summary.update(timed("evaluate", evaluate, cfg, configs, comparisons))
    summary["stage_seconds"] = wall
    summary["stage_cpu_seconds"] = cpu
    summary["wall_seconds"] = time.time() - t0
    summary["wall_seconds_total"] = sum(wall.values())
    summary["cpu_seconds_total"] = sum(cpu.values())
    (run / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    from rlhf_jax.report import write_report

    write_report(cfg, summary, log=log)
    return summary
