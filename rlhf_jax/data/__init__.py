"""Data edge: JSONL readers, tokenised NumPy batches and a resumable batch iterator."""

from rlhf_jax.data.batching import (
    DEFAULT_BUCKETS,
    bucket_length,
    pack_sequences,
    tokenize_comparisons,
    tokenize_demonstrations,
    tokenize_prompts,
    tokenize_texts,
)
from rlhf_jax.data.iterator import BatchIterator, ZipIterator
from rlhf_jax.data.truncation import TRUNCATIONS, TruncationStats, data_metrics
from rlhf_jax.data.readers import (
    Comparison,
    DataError,
    Demonstration,
    PretrainText,
    Prompt,
    Records,
    read_comparisons,
    read_demonstrations,
    read_jsonl,
    read_pretrain_texts,
    read_prompts,
    split_hh_dialogues,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "TRUNCATIONS",
    "TruncationStats",
    "BatchIterator",
    "ZipIterator",
    "Comparison",
    "DataError",
    "Demonstration",
    "PretrainText",
    "Prompt",
    "Records",
    "bucket_length",
    "data_metrics",
    "pack_sequences",
    "read_comparisons",
    "read_demonstrations",
    "read_jsonl",
    "read_pretrain_texts",
    "read_prompts",
    "split_hh_dialogues",
    "tokenize_comparisons",
    "tokenize_demonstrations",
    "tokenize_prompts",
    "tokenize_texts",
]
