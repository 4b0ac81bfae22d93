"""Training machinery shared by the SFT, reward-model and PPO stages."""

from rlhf_jax.train.checkpoint import CheckpointError, Checkpointer, NonFiniteError, guard_finite
from rlhf_jax.train.loop import CONFIG_FILE, DONE_FILE, LoopConfig, StatefulIterator, run_loop
from rlhf_jax.train.metrics import MetricsWriter, ProgressBar
from rlhf_jax.train.optim import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.workdir import WorkdirError, workdir_lock

__all__ = [
    "CONFIG_FILE",
    "CheckpointError",
    "Checkpointer",
    "DONE_FILE",
    "LoopConfig",
    "MetricsWriter",
    "NonFiniteError",
    "OptimizerConfig",
    "ProgressBar",
    "StatefulIterator",
    "TrainState",
    "WorkdirError",
    "decay_mask",
    "guard_finite",
    "make_optimizer",
    "make_schedule",
    "run_loop",
    "workdir_lock",
]
