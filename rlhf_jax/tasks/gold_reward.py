"""The world's gold labeler as a reward function for the RL stages (the verifiable-reward setting).

PPO, GRPO and RLOO take any pure ``reward(params, tokens [b, T], mask [b, T], index [b]) -> [b]``
in place of a reward model (``ppo.PPOModels``, ``grpo.GRPOModels``).  ``GoldReward`` is one: inside
the compiled iteration it hands the token ids to the host (``jax.pure_callback``), decodes each
prompt and response with the tokenizer and scores them with ``world.gold_score``, the ground truth
the simulated labelers rank by.  Training on it measures what the learned reward model costs (its
over-optimisation) against the same run on the truth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.tasks.world import gold_score


@dataclasses.dataclass(frozen=True, eq=False)
class GoldReward:
    """``reward(params, tokens, mask, index) -> [b]`` float32 gold scores (``params`` and ``index``
    are unused).

    ``tokens``/``mask``: ``[b, prompt_len + N]`` rollouts, the prompt left-padded in the first
    ``prompt_len`` columns and the response right-padded after it (``generation.Rollout``).  A
    response has ``ended`` (no not-ended penalty) when it holds ``eos_id``.  ``decode``: token ids
    to text with the special tokens dropped (``Tokenizer.decode``), as the pipeline's evaluation
    decodes.  Hashable by identity, so one object keeps one compiled iteration.  Runs on the host.
    """

    decode: Callable[[Sequence[int]], str]
    eos_id: int
    prompt_len: int

    def __post_init__(self) -> None:
        if not (isinstance(self.prompt_len, int) and self.prompt_len >= 1):
            raise ValueError(f"GoldReward.prompt_len must be an int >= 1, got {self.prompt_len!r}")

    def __call__(self, params, tokens: jax.Array, mask: jax.Array, index: jax.Array) -> jax.Array:
        del params, index
        out = jax.ShapeDtypeStruct(tokens.shape[:1], jnp.float32)
        return jax.pure_callback(self.scores, out, tokens, mask, vmap_method="sequential")

    def scores(self, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Gold scores ``[b]`` float32 of host arrays ``tokens``/``mask`` ``[b, T]``."""
        tokens, keep = np.asarray(tokens), np.asarray(mask) != 0
        p, decode = self.prompt_len, self.decode
        out = np.zeros(len(tokens), np.float32)
        for i, (row, real) in enumerate(zip(tokens, keep)):
            prompt, response = row[:p][real[:p]], row[p:][real[p:]]
            ended = bool(np.any(response == self.eos_id))
            out[i] = gold_score(decode(prompt.tolist()), decode(response.tolist()), ended)
        return out
