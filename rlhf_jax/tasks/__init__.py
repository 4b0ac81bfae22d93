"""The built-in synthetic instruction-following world (pure Python + NumPy, no JAX).

``world``: vocabulary, prompts, correct answers and the gold score; ``mistakes``: plausible
errors; ``corpus``: pretraining text; ``labelers``: imperfect demonstrations and noisy K-way
rankings calibrated to InstructGPT's inter-annotator agreement; ``files``: the JSONL writers.
"""

from rlhf_jax.tasks.corpus import pretraining_texts
from rlhf_jax.tasks.files import WORLD_FILES, make_world_files, write_jsonl
from rlhf_jax.tasks.labelers import (
    DEFAULT_LABELER_NOISE,
    TARGET_AGREEMENT,
    calibrate_noise,
    default_calibration_sets,
    demonstrations,
    expected_agreement,
    labeler_agreement,
    make_comparisons,
    rank_responses,
    sft_like_responses,
)
from rlhf_jax.tasks.mistakes import corrupt_answer
from rlhf_jax.tasks.world import (
    FAMILIES,
    LEXICON,
    NUMBER_WORDS,
    WORDS,
    WorldConfig,
    correct_answer,
    format_prompt,
    gold_score,
    gold_scores,
    parse_prompt,
    sample_prompts,
)

__all__ = [
    "DEFAULT_LABELER_NOISE",
    "FAMILIES",
    "LEXICON",
    "NUMBER_WORDS",
    "TARGET_AGREEMENT",
    "WORDS",
    "WORLD_FILES",
    "WorldConfig",
    "calibrate_noise",
    "correct_answer",
    "corrupt_answer",
    "default_calibration_sets",
    "demonstrations",
    "expected_agreement",
    "format_prompt",
    "gold_score",
    "gold_scores",
    "labeler_agreement",
    "make_comparisons",
    "make_world_files",
    "parse_prompt",
    "pretraining_texts",
    "rank_responses",
    "sample_prompts",
    "sft_like_responses",
    "write_jsonl",
]
