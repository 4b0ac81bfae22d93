"""The pipeline's config (``PipelineConfig``) and the stage configs it builds.

The stages' tuned settings live in ``defaults.json`` beside this module (package data, so an
installed wheel has them); ``stage_configs`` merges, in order: those settings, what follows from
the ``PipelineConfig`` (paths, lengths, the model), and the user's ``PipelineConfig.<stage>``
tables.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from rlhf_jax.configs import from_dict, merge_dicts, to_dict
from rlhf_jax.distributed import DistributedConfig
from rlhf_jax.errors import check
from rlhf_jax.model import ModelConfig
from rlhf_jax.pipeline.inputs import pretrain_as_demos
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.stages.dpo import DPOConfig
from rlhf_jax.stages.grpo import GRPOStageConfig, RLOOStageConfig
from rlhf_jax.stages.ppo import PPOStageConfig
from rlhf_jax.stages.reward import RMConfig
from rlhf_jax.stages.sft import SFTConfig
from rlhf_jax.tasks import WorldConfig
from rlhf_jax.tokenizer import Tokenizer

DEFAULTS_FILE = "defaults.json"
ALGORITHMS = ("ppo", "grpo", "rloo", "dpo", "best_of_n")


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

    ``pretrain``/``sft``/``rm``/``ppo``/``grpo``/``rloo``/``dpo``: dicts merged over the stage
    configs the pipeline builds (same keys as ``SFTConfig``, ``RMConfig``, ``PPOStageConfig``,
    ``GRPOStageConfig``, ``RLOOStageConfig``, ``DPOConfig``; e.g. ``--set ppo.ppo.ptx_coef=1.0`` or
    ``--set sft.loop.total_steps=500``).
    ``algorithm``: how the SFT policy is aligned: ``"ppo"`` (InstructGPT), ``"grpo"``, ``"rloo"``
    (against the reward model), ``"dpo"`` (on the comparisons), or ``"best_of_n"`` (no training: the
    SFT policy's best of ``max(best_of_n)`` samples by the reward model).  Its stage writes under
    ``runs/<name>/<algorithm>/``, so switching reuses every earlier stage and trains only the new one.
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
    algorithm: Literal["ppo", "grpo", "rloo", "dpo", "best_of_n"] = "ppo"
    grpo: dict[str, Any] = dataclasses.field(default_factory=dict)
    rloo: dict[str, Any] = dataclasses.field(default_factory=dict)
    dpo: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.algorithm in ALGORITHMS, self, "algorithm", f"one of {ALGORITHMS}")
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


def _stage(cls: type, tuned: dict[str, Any], derived: dict[str, Any], overrides: dict[str, Any], where: str) -> Any:
    """``cls`` from the tuned defaults, then what the pipeline derives, then the user's overrides."""
    return from_dict(cls, merge_dicts(merge_dicts(tuned, derived), overrides), where=where)


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


def tuned_defaults() -> dict[str, dict[str, Any]]:
    """The stage settings tuned for the built-in world on a laptop CPU (``defaults.json``, shipped
    in the package): one table per stage (``pretrain``, ``sft``, ``rm``, ``ppo``), keys as in
    ``SFTConfig``, ``RMConfig`` and ``PPOStageConfig``.  ``stage_configs`` adds the paths and the
    shapes that follow from the ``PipelineConfig``, then the user's ``PipelineConfig.<stage>``
    overrides."""
    return json.loads(resources.files(__package__).joinpath(DEFAULTS_FILE).read_text(encoding="utf-8"))


def stage_configs(cfg: PipelineConfig, files: dict[str, Path], tokenizer: Path) -> dict[str, Any]:
    """The stage configs the pipeline runs (defaults tuned for the built-in world on a laptop
    CPU; the paper's values are the stage configs' own defaults)."""
    configs: dict[str, Any] = {}
    tuned = tuned_defaults()
    vocab = Tokenizer.from_file(tokenizer).vocab_size
    base_source: dict[str, Any]
    if cfg.base_model is None:
        model = to_dict(cfg.model.replace(vocab_size=max(cfg.model.vocab_size, vocab)))
        configs["pretrain"] = _stage(SFTConfig, tuned["pretrain"], {
            **_common(cfg, "pretrain", tokenizer), "model": {"init": model},
            "train_data": str(pretrain_as_demos(cfg, files, tokenizer)), "buckets": [cfg.model.max_len],
            "max_len": cfg.model.max_len,
        }, cfg.pretrain, "pretrain")
        base_source = {"hf_dir": str(cfg.run_dir / "pretrain" / "model")}
    else:
        base_source = {"hf_dir": cfg.base_model}
    sft_model = {"hf_dir": str(cfg.run_dir / "sft" / "model")}
    max_len = cfg.prompt_len + cfg.response_len
    configs["sft"] = _stage(SFTConfig, tuned["sft"], {
        **_common(cfg, "sft", tokenizer), "model": base_source, "train_data": str(files["demos"]),
        "eval_data": str(files["demos_eval"]) if "demos_eval" in files else None,
        "buckets": [max_len], "max_len": max_len, "sample_max_new_tokens": cfg.response_len,
    }, cfg.sft, "sft")
    configs["rm"] = _stage(RMConfig, tuned["rm"], {
        **_common(cfg, "rm", tokenizer), "model": sft_model, **_comparison_files(cfg, files), "demos": str(files["demos"]),
        # Sampled responses may be cut without EOS (+1 when the EOS is appended) and re-encode to
        # other tokens: buckets for the usual short answers (most batches fit prompt + half the
        # response), the whole length, and (defaults.json: max_len null) the model's context for the rest.
        "buckets": [cfg.prompt_len + cfg.response_len // 2, max_len + 1],
        # The last token of a 3-layer model cannot check a multi-word answer word by word; a mean
        # over the tokens can (defaults.json: score_pooling "mean"; README "Results").  Duplicates
        # are merged, so K is ragged (mean 3.6 of 6): batches grouped by K skip the padded
        # responses' compute.
        "k_buckets": list(range(2, cfg.k + 1)),
    }, cfg.rm, "rm")
    configs["ppo"] = _stage(PPOStageConfig, tuned["ppo"], {
        **_common(cfg, "ppo", tokenizer), "model": sft_model, "reward_model": str(cfg.run_dir / "rm" / "model"),
        "train_data": str(files["prompts"]),
        "eval_data": str(files["prompts_eval"]) if "prompts_eval" in files else None,
        "ptx_data": str(files["pretrain"]) if "pretrain" in files else None,
        "max_prompt_len": cfg.prompt_len, "ptx_seq_len": cfg.prompt_len + cfg.response_len,
        "ppo": {"generation": {"max_new_tokens": cfg.response_len}},
    }, cfg.ppo, "ppo")
    if cfg.algorithm in ("grpo", "rloo"):
        cls = GRPOStageConfig if cfg.algorithm == "grpo" else RLOOStageConfig
        configs[cfg.algorithm] = _stage(cls, tuned[cfg.algorithm], {
            **_common(cfg, cfg.algorithm, tokenizer), "model": sft_model,
            "reward_model": str(cfg.run_dir / "rm" / "model"), "train_data": str(files["prompts"]),
            "eval_data": str(files["prompts_eval"]) if "prompts_eval" in files else None,
            "ptx_data": str(files["pretrain"]) if "pretrain" in files else None,
            "max_prompt_len": cfg.prompt_len, "ptx_seq_len": cfg.prompt_len + cfg.response_len,
            "grpo": {"generation": {"max_new_tokens": cfg.response_len}},
        }, getattr(cfg, cfg.algorithm), cfg.algorithm)
    elif cfg.algorithm == "dpo":
        configs["dpo"] = _stage(DPOConfig, tuned["dpo"], {
            **_common(cfg, "dpo", tokenizer), "model": sft_model, **_comparison_files(cfg, files),
            "buckets": [cfg.prompt_len + cfg.response_len // 2, max_len + 1],  # as the RM's
        }, cfg.dpo, "dpo")
    return configs
