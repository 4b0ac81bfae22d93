"""Where a stage's models come from: ``ModelSource`` (a Hugging Face directory, e.g. the previous
stage's ``workdir/model``, or a random init from a ``ModelConfig``), the model config it gives
before any weight is read, the model loaded with a head, the tokenizer and its check against the
model's vocabulary, and a trained reward model with its normalisation (``load_reward_model``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import jax

from rlhf_jax import hf, hf_config
from rlhf_jax.configs import ConfigError
from rlhf_jax.data import DataError, TruncationStats
from rlhf_jax.model import ModelConfig, Params, Transformer, init_params
from rlhf_jax.model_config import ATTENTION_IMPLS, REMAT_POLICIES
from rlhf_jax.tokenizer import PAD_TOKEN, Tokenizer

log = logging.getLogger(__name__)

R = TypeVar("R")

NORMALIZATION_FILE = "reward_normalization.json"  # beside a reward model: its gain and bias


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a stage's starting model comes from: exactly one of

    - ``hf_dir``: a Hugging Face directory (``config.json`` + safetensors), e.g. the previous
      stage's ``workdir/model``, loaded with ``hf.load_pretrained``;
    - ``init``: a ``ModelConfig`` to initialise randomly (tests, the synthetic task's base model).
      Its ``head`` and ``dtype`` stay at their defaults: the stage picks the head, ``dtype`` below
      the compute dtype.

    ``dtype`` is the compute dtype (``ModelConfig.dtype``); parameters are always float32.
    ``scan_layers``, ``scan_decode``, ``remat``, ``remat_policy``, ``attention_impl``, ``logits_chunk``
    and ``cache_block`` set the ``ModelConfig`` execution switches of the same names (see there; the weights do not change;
    ``remat=true`` is ``remat_policy="full"``: keep only each block's input for the backward pass).
    """

    hf_dir: str | None = None
    init: ModelConfig | None = None
    dtype: str = "float32"
    scan_layers: bool = False
    scan_decode: bool = False
    remat_policy: str = "none"
    attention_impl: str = "xla"
    logits_chunk: int = 0
    cache_block: int = 0
    remat: bool = False

    def __post_init__(self) -> None:
        if (self.hf_dir is None) == (self.init is None):
            raise ConfigError(
                "ModelSource: set exactly one of 'hf_dir' (a Hugging Face directory) and 'init' "
                f"(a ModelConfig to initialise randomly); got hf_dir={self.hf_dir!r}, "
                f"init={'set' if self.init is not None else None}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"ModelSource.dtype must be one of float32, bfloat16, float16, got {self.dtype!r}"
            )
        for name in ("scan_layers", "scan_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelSource.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.remat, bool) or (self.remat and self.remat_policy not in ("none", "full")):
            raise ConfigError(f"ModelSource.remat must be true or false and, when true, remat_policy 'none' or "
                              f"'full' (remat=true means 'full'); got remat={self.remat!r}, "
                              f"remat_policy={self.remat_policy!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"ModelSource.remat_policy must be one of {', '.join(REMAT_POLICIES)}, "
                              f"got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"ModelSource.attention_impl must be one of {', '.join(ATTENTION_IMPLS)}, "
                              f"got {self.attention_impl!r}")
        for name in ("logits_chunk", "cache_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"ModelSource.{name} must be an int >= 0 (0 = off), got {value!r}")
        if self.init is not None and (self.init.head != "lm" or self.init.dtype != "float32"):
            raise ConfigError(
                "ModelSource.init.head/dtype must stay at their defaults ('lm', 'float32'): the "
                "stage picks the head and ModelSource.dtype sets the compute dtype"
            )

    def describe(self) -> str:
        return f"hf_dir {self.hf_dir}" if self.hf_dir is not None else "a random init"


def model_config(source: ModelSource, head: str = "lm", score_pooling: str | None = None) -> ModelConfig:
    """The ``ModelConfig`` that ``load_model(source, head, score_pooling=)`` builds, without
    reading weights."""
    config = with_execution(source, _source_config(source, head))
    return config if score_pooling is None else config.replace(score_pooling=score_pooling)


def with_execution(source: ModelSource, config: ModelConfig) -> ModelConfig:
    """``config`` with ``source``'s execution switches (a bad value is a ConfigError naming it)."""
    try:
        return config.replace(scan_layers=source.scan_layers, scan_decode=source.scan_decode, remat=source.remat,
                              remat_policy=source.remat_policy, attention_impl=source.attention_impl,
                              logits_chunk=source.logits_chunk, cache_block=source.cache_block)
    except ValueError as e:
        raise ConfigError(f"ModelSource: {e}") from e


def _source_config(source: ModelSource, head: str) -> ModelConfig:
    if source.init is not None:
        return source.init.replace(head=head, dtype=source.dtype)
    config_file = Path(source.hf_dir) / hf_config.CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (ModelSource.hf_dir)")
    return hf_config.read_config(source.hf_dir, dtype=source.dtype, head=head)


def load_model(
    source: ModelSource, head: str, key: jax.Array, score_pooling: str | None = None
) -> tuple[Transformer, Params]:
    """``(model, float32 params)`` from ``source`` with ``head`` ``"lm"`` or ``"scalar"``.

    ``head="scalar"`` on an LM checkpoint builds a reward/value model: the backbone's weights and
    a fresh scalar head initialised from ``key`` (InstructGPT §3.5: the RM is "the SFT model with
    the final unembedding layer removed" and a scalar projection added).  A checkpoint that
    already has a scalar head (a reward model) keeps it.  ``init`` sources draw every parameter
    from ``key`` (pass a fresh one per model: no default key is reused silently).
    ``score_pooling``: set ``ModelConfig.score_pooling`` (None keeps the source's).
    """
    if source.init is not None:
        model = Transformer(model_config(source, head, score_pooling))
        return model, init_params(model, key)
    model, params = hf.load_pretrained(source.hf_dir, dtype=source.dtype, head=head, key=key)
    model = Transformer(with_execution(source, model.config))
    if score_pooling is not None:
        model = Transformer(model.config.replace(score_pooling=score_pooling))
    return model, params


def load_tokenizer(path: str | os.PathLike | None, source: ModelSource) -> Tokenizer:
    """``Tokenizer`` from ``path`` (a ``tokenizer.json`` or a directory holding one); ``None``
    takes the one in ``source.hf_dir``."""
    if path is None:
        if source.hf_dir is None:
            raise ConfigError("tokenizer: required when the model is a random init (no hf_dir)")
        path = source.hf_dir
    return Tokenizer.from_file(path)


def check_vocab(tokenizer: Tokenizer, config: ModelConfig, where: str) -> None:
    """Raise ``ConfigError`` unless every id, the pad id included, fits the model's embedding:
    the pad never grows the vocabulary past it (``rlhf_jax.tokenizer``'s docstring)."""
    if tokenizer.vocab_size > config.vocab_size:
        added = (f" (its pad {PAD_TOKEN!r}, id {tokenizer.pad_id}, was added: the tokenizer has no spare "
                 "special token; name an existing token as pad_token in tokenizer_config.json)"
                 if tokenizer.added_pad and tokenizer.pad_id >= config.vocab_size else "")
        raise ConfigError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
            f"{config.vocab_size}{added}"
        )


def load_reward_model(path: str | Path, dtype: str = "float32") -> tuple[Transformer, Params, float, float]:
    """``(model, params, gain, bias)`` of a reward model directory (``train_rm``'s export, or any
    Hugging Face ``...ForSequenceClassification`` with one label).

    The normalised reward of ``tokens``/``mask`` ``[b, T]`` is
    ``generation.score(model, params, tokens, mask, gain=gain, bias=bias)``.  Without
    ``reward_normalization.json`` the reward is unnormalised (gain 1, bias 0; logged).
    """
    path = Path(path)
    model, params = hf.load_pretrained(path, dtype=dtype, head="scalar")
    file = path / NORMALIZATION_FILE
    if not file.is_file():
        log.warning("%s: no %s; using the raw reward (gain 1, bias 0)", path, NORMALIZATION_FILE)
        return model, params, 1.0, 0.0
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        gain, bias = float(data["gain"]), float(data["bias"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: expected {{\"gain\": float, \"bias\": float}} ({e!r})") from e
    if not (math.isfinite(gain) and math.isfinite(bias)):
        raise ValueError(f"{file}: gain and bias must be finite, got {gain}, {bias}")
    return model, params, gain, bias


# ------------------------------------------------------------------------------------ data files


def read_records(read: Callable[..., R], path: str | os.PathLike, what: str, stats: TruncationStats,
                 **kwargs: Any) -> R:
    """``read(path, **kwargs)`` (a ``data`` reader; its ``n_skipped`` bad lines are added to
    ``stats.bad_lines``); a ``DataError`` naming ``path`` when it holds no ``what``."""
    records = read(path, **kwargs)
    stats.bad_lines += records.n_skipped
    if not records:
        raise DataError(f"{path}: no {what}")
    return records


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a ``ValueError`` of the block (a record the tokenizer refuses) as a ``DataError``
    naming ``path``."""
    try:
        yield
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
