"""``rlhf-jax generate``: one answer from a model, for a quick look at a checkpoint or a GGUF file.

    rlhf-jax generate --set model=models/smollm2 --set user="What is 2+2?"
    rlhf-jax generate --set model=SmolLM2-135M-Instruct.Q4_1.gguf --set user="Hi" --set temperature=0.7

``user`` (and ``system``) become messages rendered by the model's chat template with the
generation prompt; ``prompt`` is raw text instead (BOS added when the tokenizer's
``add_bos_token`` says so).  Decoding stops at any of the tokenizer's ``stop_ids``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import ConfigError, check
from rlhf_jax.generation import GenerateConfig, generate
from rlhf_jax.gguf import load_gguf
from rlhf_jax.hf import load_pretrained
from rlhf_jax.model import Params, Transformer
from rlhf_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """``model``: a Hugging Face directory (a stage's ``model/``, or ``rlhf-jax fetch smollm2
    --hf-dir``'s) or a ``.gguf`` file.  Exactly one of ``user`` (a chat turn, with an optional
    ``system`` message) and ``prompt`` (raw text).  ``temperature`` 0 is greedy; ``seed`` draws
    the samples otherwise."""

    model: str = ""
    user: str | None = None
    system: str | None = None
    prompt: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check(isinstance(self.model, str) and self.model != "", self, "model",
              "a Hugging Face directory or a .gguf file")
        check((self.user is None) != (self.prompt is None), self, "user",
              "set, or 'prompt' set instead (exactly one of them)")
        check(self.system is None or self.user is not None, self, "system", "used with 'user' only")
        check(self.dtype in ("float32", "bfloat16", "float16"), self, "dtype", "float32, bfloat16 or float16")


def load(path: str | Path, dtype: str = "float32") -> tuple[Transformer, Params, Tokenizer]:
    """``(model, params, tokenizer)`` of a Hugging Face directory or a GGUF file."""
    path = Path(path)
    if path.suffix == ".gguf":
        model, params = load_gguf(path, dtype=dtype)
        return model, params, Tokenizer.from_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory or .gguf file (SampleConfig.model)")
    model, params = load_pretrained(path, dtype=dtype)
    return model, params, Tokenizer.from_file(path)


def sample(cfg: SampleConfig) -> str:
    """The model's answer to ``cfg``'s prompt (the text after the prompt, special tokens dropped)."""
    model, params, tokenizer = load(cfg.model, cfg.dtype)
    if cfg.user is not None:
        messages: list[dict[str, Any]] = [{"role": "user", "content": cfg.user}]
        if cfg.system is not None:
            messages.insert(0, {"role": "system", "content": cfg.system})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tokenizer.encode(cfg.prompt, add_bos=tokenizer.add_bos_token)
    if not ids:
        raise ConfigError("SampleConfig: the prompt encodes to no tokens")
    room = model.config.max_len - len(ids)
    if room < 1:
        raise ConfigError(f"SampleConfig: the prompt has {len(ids)} tokens, the model's context {model.config.max_len}")
    gen = GenerateConfig(max_new_tokens=min(cfg.max_new_tokens, room), temperature=cfg.temperature, top_p=cfg.top_p,
                         eos_id=tokenizer.eos_id, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
    ids = np.asarray([ids], np.int32)
    rollout = generate(model, params, ids, np.ones_like(ids), jax.random.PRNGKey(cfg.seed), gen)
    response = np.asarray(rollout.response[0])[np.asarray(rollout.response_mask[0]) != 0]
    return tokenizer.decode(response)
