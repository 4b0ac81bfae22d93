"""Import of llama2.c legacy checkpoints (Karpathy's ``run.c`` format, e.g. ``stories260K.bin``).

Layout (``shared/models/stories260K/README.md``): a header of 7 int32 ``dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (``vocab_size`` negative when the classifier
is not shared with the token embedding), then float32 arrays: token embedding ``[V, dim]``,
attention RMSNorm ``[L, dim]``, ``wq [L, dim, dim]``, ``wk [L, kv_dim, dim]``,
``wv [L, kv_dim, dim]``, ``wo [L, dim, dim]``, FFN RMSNorm ``[L, dim]``, ``w1 [L, hidden, dim]``,
``w2 [L, dim, hidden]``, ``w3 [L, hidden, dim]``, final RMSNorm ``[dim]``, two RoPE tables
``[seq_len, head_dim / 2]`` (unused), and, when not shared, the classifier ``[V, dim]``.
Matrices are ``[out, in]``; FFN is ``w2(silu(w1 x) * w3 x)``, so ``w1``/``w3``/``w2`` are our
``gate``/``up``/``down``.

llama2.c's RoPE rotates adjacent pairs ``(x[2i], x[2i+1])``; ours (Hugging Face's) rotates halves
``(x[i], x[i + d/2])``.  Permuting the output rows of ``wq`` and ``wk`` within each head (pair
``i``'s two rows go to rows ``i`` and ``i + d/2``) makes the two equal, since q·k is unchanged by
applying one permutation to both (Hugging Face's ``convert_llama_weights_to_hf.permute``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import ModelConfig, Params, Transformer

_HEADER_INTS = 7
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions, not this format
_NORM_EPS = 1e-5
_ROPE_THETA = 10000.0


def _halves_layout(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of ``w [n_heads * head_dim, in]`` from adjacent-pair to rotate-half order per head."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def load_llama2c(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[Transformer, Params]:
    """Loads a llama2.c legacy ``.bin`` checkpoint as our ``arch="llama"`` model.

    ``dtype`` is the compute dtype; parameters are float32.  Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` naming the file for a bad header or a size that does not match
    the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    raw = path.read_bytes()
    if len(raw) < 4 * _HEADER_INTS:
        raise ValueError(f"{path}: {len(raw)} bytes is shorter than the {4 * _HEADER_INTS}-byte header")
    header = np.frombuffer(raw, "<i4", _HEADER_INTS)
    if header[0] == _VERSIONED_MAGIC:
        raise ValueError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy "
                         "format (export version 0) is supported")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(x) for x in header)
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "abs(vocab_size)", "seq_len")
    for name, value in zip(names, (dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len)):
        if value < 1:
            raise ValueError(f"{path}: header field {name} = {value} must be positive")
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"{path}: header n_heads={n_heads} must divide dim={dim} and be a "
                         f"multiple of n_kv_heads={n_kv_heads}")
    shared, vocab = vocab > 0, abs(vocab)
    head_dim = dim // n_heads
    kv_dim = head_dim * n_kv_heads
    L = n_layers
    shapes = {
        "embed": (vocab, dim), "attn_norm": (L, dim), "wq": (L, dim, dim), "wk": (L, kv_dim, dim),
        "wv": (L, kv_dim, dim), "wo": (L, dim, dim), "mlp_norm": (L, dim), "w1": (L, hidden, dim),
        "w2": (L, dim, hidden), "w3": (L, hidden, dim), "final_norm": (dim,),
        "rope_cos": (seq_len, head_dim // 2), "rope_sin": (seq_len, head_dim // 2),
    }
    if not shared:
        shapes["wcls"] = (vocab, dim)
    n_floats = sum(int(np.prod(s)) for s in shapes.values())
    expected = 4 * (_HEADER_INTS + n_floats)
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but the header {tuple(int(x) for x in header)} "
                         f"implies {expected}")

    arrays, offset = {}, 4 * _HEADER_INTS
    for name, shape in shapes.items():
        count = int(np.prod(shape))
        arrays[name] = np.frombuffer(raw, "<f4", count, offset).reshape(shape)
        offset += 4 * count

    config = ModelConfig(
        arch="llama", vocab_size=vocab, d_model=dim, n_layers=L, n_heads=n_heads,
        n_kv_heads=n_kv_heads, d_ff=hidden, max_len=seq_len, norm_eps=_NORM_EPS,
        rope_theta=_ROPE_THETA, tie_embeddings=shared, dtype=dtype,
    )

    def kernel(w: np.ndarray) -> jnp.ndarray:  # [out, in] -> our [in, out]
        return jnp.asarray(np.ascontiguousarray(w.T), jnp.float32)

    params: Params = {"embed": {"embedding": jnp.asarray(arrays["embed"])}}
    for i in range(L):
        params[f"layer_{i}"] = {
            "attn_norm": {"scale": jnp.asarray(arrays["attn_norm"][i])},
            "attn": {
                "q": {"kernel": kernel(_halves_layout(arrays["wq"][i], n_heads))},
                "k": {"kernel": kernel(_halves_layout(arrays["wk"][i], n_kv_heads))},
                "v": {"kernel": kernel(arrays["wv"][i])},
                "o": {"kernel": kernel(arrays["wo"][i])},
            },
            "mlp_norm": {"scale": jnp.asarray(arrays["mlp_norm"][i])},
            "mlp": {
                "gate": {"kernel": kernel(arrays["w1"][i])},
                "up": {"kernel": kernel(arrays["w3"][i])},
                "down": {"kernel": kernel(arrays["w2"][i])},
            },
        }
    params["final_norm"] = {"scale": jnp.asarray(arrays["final_norm"])}
    if not shared:
        params["lm_head"] = {"kernel": kernel(arrays["wcls"])}
    return Transformer(config), params
