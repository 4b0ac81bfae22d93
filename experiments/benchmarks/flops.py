"""FLOP and byte counts of a decoder-only transformer, and the roofline bound they imply.

Conventions (Kaplan et al. 2020, §2.1; PaLM, App. B): a multiply-add is 2 FLOPs; only matmuls
count; a forward pass costs ``2·N`` FLOPs per token for ``N`` matmul parameters, plus attention's
``QKᵀ`` and ``AV`` (``4·n_heads·head_dim`` per layer per query per attended key); a training step
costs 3 forwards (the backward pass is twice the forward).  Attention counts the causal context
only (the useful work; PaLM's MFU counts all ``T²`` pairs, which would read ≈ 2× higher on the
attention term).

The roofline (Williams et al. 2009): a program that does ``F`` FLOPs and moves ``B`` bytes takes at
least ``max(F / peak FLOP/s, B / bandwidth)``.  A decode step reads every weight once and the KV
cache of every sequence, so at small batch it is bandwidth-bound.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.model import ModelConfig


def block_matmul_params(c: ModelConfig) -> int:
    """Matmul weights of all transformer blocks: ``q``, ``o`` ``[d, n_heads·head_dim]``, ``k``,
    ``v`` ``[d, kv_heads·head_dim]`` and the MLP (GPT-2: fc + proj, ``2·d·d_ff``; Llama's SwiGLU:
    gate + up + down, ``3·d·d_ff``), times ``n_layers``.  Biases and norms are not matmuls."""
    d, hd = c.d_model, c.head_dim
    attn = 2 * d * c.n_heads * hd + 2 * d * c.kv_heads * hd
    mlp = (3 if c.arch == "llama" else 2) * d * c.ff_dim
    return c.n_layers * (attn + mlp)


def decode_matmul_sequence(c: ModelConfig) -> list[tuple[int, int]]:
    """The weight matmuls of one decode step in the order the step runs them, as ``(k, n)``: each
    multiplies ``[batch, k]`` by a ``[k, n]`` weight of its own, with the projections ``generate``
    fuses (``model.fuse_projections``: q, k and v as one ``[d, (n_heads + 2·kv_heads)·head_dim]``,
    Llama's gate and up as one ``[d, 2·d_ff]``): per layer qkv, o, then the MLP (gate_up, down |
    fc, proj); the head last."""
    d, hd, ff = c.d_model, c.head_dim, c.ff_dim
    attn = [(d, (c.n_heads + 2 * c.kv_heads) * hd), (c.n_heads * hd, d)]  # qkv, o
    mlp = [(d, 2 * ff), (ff, d)] if c.arch == "llama" else [(d, ff), (ff, d)]  # gate_up, down | fc, proj
    return (attn + mlp) * c.n_layers + [(d, c.vocab_size if c.head == "lm" else 1)]


def decode_matmul_shapes(c: ModelConfig) -> list[tuple[int, int, int]]:
    """``decode_matmul_sequence`` counted by shape: ``(k, n, count)``, ``count`` times per step.
    Their ``2·batch·k·n·count`` sum to ``2·batch·(blocks + head)``, the matmul part of
    ``decode_step_flops``."""
    counts: dict[tuple[int, int], int] = {}
    for shape in decode_matmul_sequence(c):
        counts[shape] = counts.get(shape, 0) + 1
    return [(k, n, count) for (k, n), count in counts.items()]


def head_matmul_params(c: ModelConfig) -> int:
    """The output head's matmul weights: the unembedding ``d·V`` (tied or not) or a scalar head ``d``."""
    return c.d_model * (c.vocab_size if c.head == "lm" else 1)


def attention_flops_per_key(c: ModelConfig) -> int:
    """``QKᵀ`` and ``AV`` for one query and one attended key, all layers: ``4·n_heads·head_dim·n_layers``."""
    return 4 * c.n_heads * c.head_dim * c.n_layers


def forward_flops(c: ModelConfig, batch: int, seq: int) -> float:
    """One forward pass over ``[batch, seq]`` tokens with the head at every position:
    ``batch · (2·(blocks + head)·seq + attention per key · seq·(seq + 1)/2)``."""
    causal_keys = seq * (seq + 1) / 2
    return batch * (2 * (block_matmul_params(c) + head_matmul_params(c)) * seq
                    + attention_flops_per_key(c) * causal_keys)


def train_step_flops(c: ModelConfig, batch: int, seq: int) -> float:
    """Forward + backward over ``[batch, seq]``: ``3 · forward_flops`` (``6·N·tokens`` + attention)."""
    return 3 * forward_flops(c, batch, seq)


def decode_step_flops(c: ModelConfig, batch: int, context: float) -> float:
    """One decode step of ``batch`` sequences, each attending to ``context`` keys:
    ``batch · (2·(blocks + head) + attention per key · context)``."""
    return batch * (2 * (block_matmul_params(c) + head_matmul_params(c)) + attention_flops_per_key(c) * context)


def decode_step_bytes(c: ModelConfig, batch: int, context: float, weight_bytes: int = 4,
                      kv_bytes: int | None = None) -> float:
    """Bytes a decode step must read: every matmul weight once (``weight_bytes`` each: 4 for
    float32 master weights) plus the K and V cache of every sequence (``2 · n_layers · kv_heads ·
    head_dim · context`` values of ``kv_bytes``, default the compute dtype's size)."""
    kv_bytes = np.dtype(c.compute_dtype).itemsize if kv_bytes is None else kv_bytes
    weights = weight_bytes * (block_matmul_params(c) + head_matmul_params(c))
    cache = 2 * c.n_layers * c.kv_heads * c.head_dim * context * kv_bytes
    return weights + batch * cache


def roofline_seconds(flops: float, bytes_moved: float, peak_flops: float, bandwidth: float) -> dict[str, float]:
    """``{"compute_s": F/peak, "memory_s": B/bandwidth, "bound_s": the larger, "intensity": F/B}``."""
    compute, memory = flops / peak_flops, bytes_moved / bandwidth
    return {"compute_s": compute, "memory_s": memory, "bound_s": max(compute, memory), "intensity": flops / bytes_moved}


def decode_bound_tokens_per_s(c: ModelConfig, batch: int, context: float, peak_flops: float, bandwidth: float,
                              weight_bytes: int = 4) -> dict[str, float]:
    """Tokens/s a decode step cannot beat: ``batch / max(flops / peak, bytes / bandwidth)``;
    ``bandwidth_tok_s = batch · bandwidth / bytes`` is the pure bandwidth bound."""
    flops = decode_step_flops(c, batch, context)
    moved = decode_step_bytes(c, batch, context, weight_bytes)
    r = roofline_seconds(flops, moved, peak_flops, bandwidth)
    return {**r, "flops": flops, "bytes": moved, "bound_tok_s": batch / r["bound_s"],
            "bandwidth_tok_s": batch * bandwidth / moved, "compute_tok_s": batch * peak_flops / flops}
