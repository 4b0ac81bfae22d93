"""Training stages, each a set of hooks for one driver (``skeleton.run_stage``): supervised
fine-tuning, the K-way reward model (``stages.ppo``, ``stages.grpo``, ``stages.dpo`` are imported
by name).  Shared pieces: ``sources`` (models, tokenizer), ``config`` (``StageConfig``),
``steps`` (mesh, jit, setup), ``export`` (export, fingerprint, completion), ``rollouts`` (RL
prompt batches); per-process data agreement is ``rlhf_jax.data.agreement``."""

from rlhf_jax.stages.config import StageConfig, StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.export import completed_model, export_model
from rlhf_jax.stages.skeleton import Stage, StageData, StageRun, SupervisedStage, make_step_fn, run_stage
from rlhf_jax.stages.sources import ModelSource, load_model, load_reward_model, load_tokenizer
from rlhf_jax.stages.steps import Setup, init_train_state, jit_on_mesh, setup_training
from rlhf_jax.stages.reward import (
    RMConfig,
    k_way_rewards,
    rm_batch_loss,
    rm_step_fn,
    rm_train_step,
    train_rm,
)
from rlhf_jax.stages.sft import (
    SFTConfig,
    sft_batch_loss,
    sft_step_fn,
    sft_train_step,
    train_sft,
)

__all__ = [
    "Stage",
    "StageData",
    "StageRun",
    "SupervisedStage",
    "make_step_fn",
    "run_stage",
    "ModelSource",
    "RMConfig",
    "SFTConfig",
    "StageConfig",
    "StageLoopConfig",
    "StageOptimizerConfig",
    "completed_model",
    "export_model",
    "init_train_state",
    "jit_on_mesh",
    "k_way_rewards",
    "load_model",
    "load_reward_model",
    "load_tokenizer",
    "rm_batch_loss",
    "rm_step_fn",
    "rm_train_step",
    "sft_batch_loss",
    "sft_step_fn",
    "setup_training",
    "Setup",
    "sft_train_step",
    "train_rm",
    "train_sft",
]
