"""rlhf_jax: the InstructGPT recipe (SFT, K-way reward model, PPO-ptx) as a pure-JAX library."""

from rlhf_jax.model import (
    ModelConfig,
    Output,
    Transformer,
    decode_step,
    forward,
    init_cache,
    init_params,
    positions_from_mask,
)

__version__ = "0.1.0"
