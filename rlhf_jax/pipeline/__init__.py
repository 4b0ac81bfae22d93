"""``rlhf-jax pipeline``: the whole InstructGPT recipe, end to end, resumable stage by stage.

    world files → tokenizer → base-model pretraining → SFT → comparisons (K samples of the SFT
    policy ranked by simulated labelers) → reward model → PPO-ptx → evaluation → report

Every stage writes under ``runs/<name>/<stage>/`` and is skipped when already complete; the
training stages resume from their last checkpoint, and the sampling stages are deterministic
from the seed, so killing the pipeline anywhere and re-running the same command ends with the
same numbers.  With ``task="files"`` the same path runs on your own data and model (a Hugging
Face directory and JSONL files); the gold-labeler evaluation is then skipped.
"""

from rlhf_jax.pipeline.comparisons import EMPTY_RESPONSE, build_comparisons, sample
from rlhf_jax.pipeline.config import DataFiles, PipelineConfig, stage_configs, tuned_defaults
from rlhf_jax.pipeline.driver import SUMMARY_FILE, StageTimer, run_pipeline
from rlhf_jax.pipeline.evaluate import evaluate, heldout_ptx_loss, kl_per_sequence, prompt_win_rates, win_rate
from rlhf_jax.pipeline.inputs import pretrain_as_demos, tokenizer_file, world_files

__all__ = ["PipelineConfig", "DataFiles", "run_pipeline", "stage_configs", "tuned_defaults", "StageTimer",
           "SUMMARY_FILE", "EMPTY_RESPONSE", "build_comparisons", "sample", "evaluate", "heldout_ptx_loss",
           "kl_per_sequence", "prompt_win_rates", "win_rate", "pretrain_as_demos", "tokenizer_file", "world_files"]
