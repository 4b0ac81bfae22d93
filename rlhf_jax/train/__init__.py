"""Training machinery shared by the SFT, reward-model and PPO stages.

Import-light on purpose: ``train.state`` (``TrainState``) and ``train.optim`` (the AdamW
factory) belong to the pure core (``ppo.py`` and ``grpo.py`` import them), so importing this
package loads only those two.  The edge pieces (orbax checkpoints, the loop, the metric writers,
the workdir lock) load on first use of one of their names (PEP 562 ``__getattr__``).
"""

from __future__ import annotations

import importlib
from typing import Any

from rlhf_jax.train.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from rlhf_jax.train.state import TrainState

# name -> the edge module that defines it, imported when the name is first asked for
_EDGE_NAMES = {
    "CheckpointError": "rlhf_jax.errors",
    "NonFiniteError": "rlhf_jax.errors",
    "WorkdirError": "rlhf_jax.errors",
    "Checkpointer": "rlhf_jax.train.checkpoint",
    "guard_finite": "rlhf_jax.train.checkpoint",
    "CONFIG_FILE": "rlhf_jax.train.loop",
    "DONE_FILE": "rlhf_jax.train.loop",
    "LoopConfig": "rlhf_jax.train.loop",
    "StatefulIterator": "rlhf_jax.train.loop",
    "run_loop": "rlhf_jax.train.loop",
    "MetricsWriter": "rlhf_jax.train.metrics",
    "ProgressBar": "rlhf_jax.train.metrics",
    "workdir_lock": "rlhf_jax.train.workdir",
}

__all__ = ["OptimizerConfig", "TrainState", "decay_mask", "make_optimizer", "make_schedule", *_EDGE_NAMES]


def __getattr__(name: str) -> Any:
    if name not in _EDGE_NAMES:
        raise AttributeError(f"module 'rlhf_jax.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EDGE_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
