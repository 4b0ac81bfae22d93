"""Model shapes the benchmarks share, each with the training batch it is timed on.

CPU: ``tiny`` (the shape of ``generation.py``'s and ``ppo_step.py``'s tiny GPT-2) and ``small``
(GPT-2 small, 124M).  Accelerator (bf16): GPT-2 medium and large and a 1.1B Llama (TinyLlama's
shape, as in ``gpu_check.py``), 8 × 1024 tokens with one remat'd layer at a time.  ``micro`` is
for dry runs that only check the wiring.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.model import ModelConfig

K = 4  # responses per prompt in the RM step (6 pairs)


@dataclasses.dataclass(frozen=True)
class Case:
    """A model shape and the batch it trains on: ``batch`` sequences of ``seq`` tokens (RM:
    ``batch / K`` prompts × ``K`` responses), the first ``prompt`` tokens of each masked out of
    the SFT loss."""

    key: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    vocab: int
    batch: int = 8
    seq: int = 128
    prompt: int = 32
    arch: str = "gpt2"
    n_kv_heads: int | None = None
    d_ff: int | None = None
    remat: bool = False

    def __post_init__(self) -> None:
        if self.batch % K:
            raise ValueError(f"Case.batch must be a multiple of K={K} (got {self.batch})")
        if not 0 < self.prompt < self.seq:
            raise ValueError(f"Case.prompt must be in (0, seq={self.seq}) (got {self.prompt})")

    def model_config(self, head: str, dtype: str = "float32") -> ModelConfig:
        return ModelConfig(arch=self.arch, vocab_size=self.vocab, d_model=self.d_model, n_layers=self.n_layers,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_ff=self.d_ff,
                           max_len=max(1024, self.seq), tie_embeddings=self.arch == "gpt2", head=head,
                           dtype=dtype, remat=self.remat)


CASES = {c.key: c for c in (
    Case("micro", "gpt2-micro (2L, d=64, V=256) [dry run]", 2, 64, 2, 256, batch=8, seq=32, prompt=8),
    Case("tiny", "gpt2-tiny (4L, d=256, V=1024)", 4, 256, 4, 1024),
    Case("small", "gpt2-small (124M)", 12, 768, 12, 50257),
    # GPU sizes, bf16 compute: one remat'd layer at a time keeps 8 × 1024 tokens of activations small.
    Case("gpt2-medium", "gpt2-medium (355M)", 24, 1024, 16, 50257, batch=8, seq=1024, prompt=256, remat=True),
    Case("gpt2-large", "gpt2-large (774M)", 36, 1280, 20, 50257, batch=8, seq=1024, prompt=256, remat=True),
    Case("llama-1b", "llama-1.1B (TinyLlama shape)", 22, 2048, 32, 32000, batch=8, seq=1024, prompt=256,
         arch="llama", n_kv_heads=4, d_ff=5632, remat=True),
)}
