"""GGUF import (llama.cpp's single-file format): ``load_gguf``, ``gguf_hf_config``, ``gguf_metadata``.

The file is parsed by ``rlhf_jax.gguf_reader`` and its tensors dequantised by
``rlhf_jax.gguf_quants``.  Tensor names (llama.cpp ``gguf-py/gguf/tensor_mapping.py``) are
renamed to ``transformers``' names and fed through ``rlhf_jax.hf``'s one name map, so a GGUF file
loads into exactly the parameter tree ``load_pretrained`` builds.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q``/``attn_k`` of ``llama``
models within each head from rotate-half to adjacent-pair RoPE order; ``load_gguf`` undoes it
(``transformers``' ``_reverse_permute_weights``; the same permutation as llama2.c's).  Qwen2 and
Qwen3 files are not permuted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import GGUFError
from rlhf_jax.gguf_reader import GGUFFile, read_gguf
from rlhf_jax.hf import _abstract_params, _read_params
from rlhf_jax.hf_config import config_from_hf
from rlhf_jax.llama2c import _halves_layout
from rlhf_jax.model import Params, Transformer, init_params

# general.architecture values load_gguf accepts.  Gemma 2/3 files are refused: llama.cpp stores
# their norms as 1 + w and leaves the soft-caps, query scale, local RoPE base and layer pattern
# to constants of its code that the file does not carry.
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_PERMUTED_ARCHS = ("llama",)  # whose q/k rows llama.cpp permutes


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata key/value pairs of a GGUF file (``general.*``, ``llama.*``,
    ``tokenizer.ggml.*``, ``tokenizer.chat_template``, ...); arrays are Python lists."""
    return read_gguf(path).metadata


# ------------------------------------------------------------------------------------ import

# GGUF tensor names -> transformers' (llama.cpp gguf-py tensor_mapping.py, MODEL_TENSOR names).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(name: str) -> str | None:
    """transformers' name for a GGUF tensor name, or None when there is none."""
    if m := _BLOCK_RE.fullmatch(name):
        block, kind = _BLOCK_NAMES.get(m[2]), m[3]
        return f"model.layers.{m[1]}.{block}.{kind}" if block else None
    stem, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES and kind in ("weight", "bias") else None


def gguf_hf_config(file: GGUFFile) -> dict[str, Any]:
    """The ``transformers`` ``config.json`` dict a GGUF file's metadata describes (its keys are
    ``{arch}.block_count``, ``{arch}.attention.head_count``, ...; llama.cpp ``constants.py``).

    Raises ``GGUFError`` naming the file for an architecture other than ``ARCHITECTURES``, a
    missing key, or RoPE scaling (not implemented by our model)."""
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: general.architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise GGUFError(f"{file.path}: metadata {full!r} is missing")
        return default

    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and key("rope.scaling.factor", 1.0) != 1.0):
        raise GGUFError(f"{file.path}: metadata '{arch}.rope.scaling.type' = {scaling!r} is not "
                        "supported (RoPE scaling is not implemented)")
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{file.path}: tensor 'token_embd.weight' is missing")
    d_model, n_heads = key("embedding_length"), key("attention.head_count")
    return {
        "model_type": arch,
        "vocab_size": file.tensors["token_embd.weight"].shape[0],
        "hidden_size": d_model,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": key("attention.key_length", key("rope.dimension_count", d_model // n_heads)),
        "intermediate_size": key("feed_forward_length"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "hidden_act": "silu",
    }


class _GGUFTensors:
    """``rlhf_jax.hf._read_params``' tensor source (``where``, ``read``, ``file_for``) over a GGUF
    file, by ``transformers`` name: dequantises, and un-permutes q/k rows where llama.cpp
    permuted them."""

    def __init__(self, file: GGUFFile, n_heads: int, n_kv_heads: int):
        self.file = file
        self.heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
        self.permuted = file.metadata["general.architecture"] in _PERMUTED_ARCHS
        self.where: dict[str, str] = {}
        unknown = []
        for name in file.tensors:
            hf = _hf_name(name)
            if hf is None:
                unknown.append(name)
            else:
                self.where[hf] = name
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
            raise GGUFError(f"{file.path}: tensors {shown} have no place in our "
                            f"{file.metadata['general.architecture']} model")

    def file_for(self, name: str) -> Path:
        return self.file.path

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        gguf_name = self.where[name]
        actual = self.file.tensors[gguf_name].shape
        if actual != shape:
            raise GGUFError(f"{self.file.path}: tensor {gguf_name!r} has shape {actual}, expected {shape}")
        arr = self.file.tensor(gguf_name)
        proj = name.split(".")[-2]
        if self.permuted and proj in self.heads:
            # llama.cpp's permute reshapes [h, 2, hd/2] -> [h, hd/2, 2]; this is its inverse.
            arr = _halves_layout(arr.reshape(shape[0], -1), self.heads[proj]).reshape(shape)
        return arr


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    head: str = "lm",
    key: jax.Array | None = None,
) -> tuple[Transformer, Params]:
    """Loads a GGUF model file (``general.architecture`` in ``ARCHITECTURES``) as our
    ``arch="llama"`` model, with the parameter tree ``rlhf_jax.load_pretrained`` builds.

    Every tensor is dequantised to float32 (types ``gguf_quants.SUPPORTED_QUANTS``); ``dtype`` is
    the compute dtype.  ``head="scalar"`` replaces the LM head with a fresh scalar head
    initialised from ``key`` exactly as ``init_params`` does (InstructGPT §3.5).  The tokenizer
    is ``Tokenizer.from_gguf(path)``.

    Raises ``FileNotFoundError`` and ``GGUFError`` (a ``ValueError``) naming the file and what is
    wrong: bad magic, truncated data, an unsupported architecture or quant type (named), a missing
    or misshapen tensor.
    """
    file = read_gguf(path)
    if head == "scalar" and key is None:
        raise ValueError(f"{file.path}: head='scalar' needs key= to initialise the score head")
    hf = gguf_hf_config(file)
    try:
        config = config_from_hf(hf, dtype=dtype, head=head, source=file.path)
    except ValueError as e:
        raise GGUFError(str(e)) from None
    model = Transformer(config)
    tensors = _GGUFTensors(file, config.n_heads, config.kv_heads)
    params = _read_params(tensors, config, _abstract_params(model), skip=lambda n: n == "score.weight")
    if head == "scalar":
        # Under jit, everything but the score head's initialisation is dead code.
        params["score_head"] = jax.jit(lambda k: init_params(model, k)["score_head"])(key)
    return model, params
