"""rlhf_jax: the InstructGPT recipe (SFT, K-way reward model, PPO-ptx) as a pure-JAX library.

The pure core is importable from here: the model (``forward``, ``init_params``), generation
(``generate``, ``score``, ``sequence_logprobs``), the losses and advantages, the KL controller,
the PPO-ptx iteration, the GRPO/RLOO/DPO losses, the GRPO/RLOO iteration and the policy EMA.
Stages live in ``rlhf_jax.stages``, the built-in synthetic world in ``rlhf_jax.tasks``, the
end-to-end driver in ``rlhf_jax.pipeline``.
"""

# the pure core
from rlhf_jax.advantages import KL_ESTIMATORS, gae, kl_penalty, last_index, per_token_rewards, whiten
from rlhf_jax.dpo import dpo_batch_loss, dpo_loss, ranked_pairs
from rlhf_jax.ema import ema_update
from rlhf_jax.errors import ConfigError
from rlhf_jax.generation import (
    GenerateConfig,
    Rollout,
    generate,
    score,
    score_rollout,
    sequence_logprobs,
    sequence_values,
)
from rlhf_jax.group_advantages import group_advantages, rloo_advantages
from rlhf_jax.grpo import (
    GRPO_PRESETS,
    GRPOConfig,
    GRPOModels,
    GRPOState,
    grpo_iteration,
    grpo_loss,
    init_grpo_state,
    make_grpo_iteration,
)
from rlhf_jax.kl_control import KLControllerConfig, KLState, init_kl_state, update_kl
from rlhf_jax.losses import (
    explained_variance,
    logprobs_of,
    ppo_policy_loss,
    ptx_loss,
    ranking_loss,
    sft_loss,
    token_entropy,
    token_logprobs,
    value_loss,
)
from rlhf_jax.masked import masked_mean, masked_var
from rlhf_jax.model import (
    ModelConfig,
    Output,
    Transformer,
    decode_step,
    forward,
    fuse_projections,
    init_cache,
    init_params,
    positions_from_mask,
)
from rlhf_jax.ppo import (
    PRESETS,
    PPOConfig,
    PPOModels,
    PPOState,
    init_ppo_state,
    make_ppo_iteration,
    ppo_iteration,
)
from rlhf_jax.sampling import filter_logits, sample_token
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params

# edges: model files and tokenizers
from rlhf_jax.gguf import load_gguf
from rlhf_jax.hf import load_pretrained, save_pretrained
from rlhf_jax.llama2c import load_llama2c
from rlhf_jax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    # the pure core
    "KL_ESTIMATORS", "gae", "kl_penalty", "last_index", "per_token_rewards", "whiten",
    "dpo_batch_loss", "dpo_loss", "ranked_pairs", "ema_update", "ConfigError", "GenerateConfig",
    "Rollout", "generate", "score", "score_rollout", "sequence_logprobs", "sequence_values",
    "group_advantages", "rloo_advantages", "GRPO_PRESETS", "GRPOConfig", "GRPOModels", "GRPOState",
    "grpo_iteration", "grpo_loss", "init_grpo_state", "make_grpo_iteration", "KLControllerConfig",
    "KLState", "init_kl_state", "update_kl", "explained_variance", "logprobs_of", "ppo_policy_loss",
    "ptx_loss", "ranking_loss", "sft_loss", "token_entropy", "token_logprobs", "value_loss",
    "masked_mean", "masked_var", "ModelConfig", "Output", "Transformer", "decode_step", "forward",
    "fuse_projections", "init_cache", "init_params", "positions_from_mask", "PRESETS", "PPOConfig",
    "PPOModels", "PPOState", "init_ppo_state", "make_ppo_iteration", "ppo_iteration", "filter_logits",
    "sample_token", "MeshConfig", "make_mesh", "shard_batch", "shard_params",
    # edges: model files and tokenizers
    "load_gguf", "load_pretrained", "save_pretrained", "load_llama2c", "Tokenizer",
]
