"""Writing small GGUF files for the tests with the `gguf` package (llama.cpp's own gguf-py), as
llama.cpp's `convert_hf_to_gguf.py` would: its tensor-name map, its q/k row permutation, its
metadata keys.  Everything here is independent of `rlhf_jax.gguf`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed for the GGUF tests")

from rlhf_jax.hf import _to_hf_tensors  # noqa: E402  (our HF export, itself tested against transformers)
from rlhf_jax.model import Params, Transformer  # noqa: E402
from rlhf_jax.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
CONTROL, USER_DEFINED, NORMAL = 3, 4, 1  # gguf.TokenType values


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's `convert_hf_to_gguf.py`, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def add_tensor(writer, name: str, arr: np.ndarray, qtype) -> None:
    """`arr` (float32) stored as `qtype`, quantised by `gguf.quants.quantize`."""
    data = gguf.quants.quantize(np.ascontiguousarray(arr, np.float32), qtype)
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=qtype)  # the writer turns byte shapes into value shapes


def add_tokenizer(writer, tok: Tokenizer, *, pre: str = "smollm", template: str | None = None,
                  pad_is_eos: bool = False, user_defined: tuple[str, ...] = ()) -> None:
    """`tokenizer.ggml.*` for a byte-level BPE `Tokenizer` (its `tokenizer.json` vocabulary and
    merges, in id order); its added special tokens are CONTROL, `user_defined` ones USER_DEFINED."""
    spec = json.loads(tok.hf.to_str())
    vocab = spec["model"]["vocab"]
    added = {t["content"] for t in spec["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in added else USER_DEFINED if t in user_defined else NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.bos_id)
    writer.add_eos_token_id(tok.eos_id)
    writer.add_pad_token_id(tok.eos_id if pad_is_eos else tok.pad_id)
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template(template)


def write_model_gguf(path: Path, model: Transformer, params: Params, *, qtype=Q.F32,
                     arch: str = "llama", tokenizer: Tokenizer | None = None, **tok_kwargs) -> Path:
    """Our `(model, params)` as llama.cpp would convert the `transformers` checkpoint: names
    through gguf-py's tensor-name map, q/k rows permuted for `llama` (not for `qwen2`), 2-D
    weights as `qtype`, norms and biases F32, no `output.weight` when the head is tied."""
    c = model.config
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]
    names = gguf.get_tensor_name_map(arch_enum, c.n_layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.n_layers)
    writer.add_context_length(c.max_len)
    writer.add_embedding_length(c.d_model)
    writer.add_feed_forward_length(c.ff_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.kv_heads)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.n_heads != c.d_model:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(1 if qtype == Q.F16 else 0)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, **tok_kwargs)
    for hf_name, arr in _to_hf_tensors(c, params).items():
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, c.n_heads, c.n_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, c.n_heads, c.kv_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        add_tensor(writer, name, arr, qtype if arr.ndim == 2 else Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
