"""The decoder-only transformer: GPT-2, Llama, Mistral, Qwen2/3 and Gemma 2/3 in one Flax Linen module.

One file a reader can hold in their head (nanoGPT style). Parameters are float32; the compute
dtype is ``ModelConfig.dtype`` (bfloat16 on accelerators); softmax and the returned logits and
scalar head outputs are float32.

Attention masking is driven by *segment ids* ``[batch, time]``: token ``q`` attends token ``k``
when ``seg[q] == seg[k] != 0`` and ``k`` is not in ``q``'s future.  A plain 0/1 attention mask is
the one-segment case (left padding = segment 0), and packed sequences use 1, 2, 3, ... per
document so attention never crosses documents.  Positions are passed explicitly; for a padded
batch they are ``cumsum(mask) - 1`` (clipped at 0), which makes left padding exact.

The KV cache is an explicit pytree (no mutable Linen collections), so decoding is a pure
function: ``prefill`` writes the prompt's keys/values at slots ``[0, prompt_len)`` and each decode
step writes one slot.  The cache holds the segment id of each slot so the same masking rule
applies.  For the scanned form its keys and values are stacked over the layers (``[L, b, kv_heads,
slots, d]``, carried by the scan) and each layer writes its slots in place at its layer index; for
the unrolled form they are one array per layer, which each layer updates in place and attends to
as it is (reading a layer out of a stacked array is a copy of its whole cache on XLA's CPU
backend: 8 copies of 3 MB per decode step of the tiny benchmark model, ~25% of its step).

``ModelConfig.scan_layers`` runs the blocks as one ``jax.lax.scan`` over parameters stacked at
trace time, so compile time stops growing with depth; the stored parameter tree stays
``layer_{i}/...`` either way (Hugging Face / GGUF import, partition rules and checkpoints are
unchanged).  What differs between layers (the sliding window, the RoPE frequencies) lives in
constant per-layer tables indexed by the layer index, a Python int unrolled and the scan's
counter scanned, so both forms run the same code.

Sliding windows count in cache slots (columns): query column ``q`` sees key column ``k`` when
``q - window < k <= q``, as ``transformers``' ``sliding_window_overlay``.  The real tokens of a
left-padded row, a packed document or a decoded sequence are contiguous columns, so this is the
distance in positions; decoding past the window masks the older slots of the full-length cache.

``ModelConfig`` lives in ``model_config.py`` and the RoPE variants in ``rope.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.model_config import ModelConfig
from rlhf_jax.rope import apply_rope, default_inv_freq
from rlhf_jax.sharding import BATCH_AXES

Array = jax.Array
Params = dict[str, Any]


@flax.struct.dataclass
class Output:
    """What a forward pass returns.

    ``logits``: ``[batch, time, vocab]`` float32, or the ``logits_slice`` columns only (``None``
    for a scalar-head model);
    ``values``: ``[batch, time]`` float32 scalar head (``None`` for an LM);
    ``hidden``: ``[batch, time, d_model]`` final hidden states (after the final norm);
    ``cache``: the updated KV cache when one was passed, else ``None``.
    """

    logits: Array | None
    hidden: Array
    values: Array | None = None
    cache: Any = None


def positions_from_mask(mask: Array) -> Array:
    """``[batch, time]`` 0/1 mask -> positions ``cumsum(mask) - 1`` clipped at 0 (left padding exact)."""
    mask = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def init_cache(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> dict[str, Any]:
    """An empty KV cache of ``length`` slots: ``seg`` ``[batch, length]`` (0 = empty slot) and
    ``k``/``v``, heads before slots so a decode step attends without transposing the cache:
    ``[n_layers, batch, kv_heads, length, head_dim]`` stacked over the layers when the cached
    calls are scanned (``config.scans(cached=True)``), else a tuple of ``n_layers`` arrays
    ``[batch, kv_heads, length, head_dim]`` (the unrolled blocks then attend to their own array
    without copying it out of a stacked one).  ``Transformer`` accepts either form (the other
    one is only slower)."""
    dtype = dtype or config.compute_dtype
    shape = (batch, config.kv_heads, length, config.head_dim)
    if config.scans(cached=True):
        k = v = jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return {"k": k, "v": v, "seg": jnp.zeros((batch, length), jnp.int32)}


def resize_cache(cache: dict[str, Any], length: int) -> dict[str, Any]:
    """``cache`` (``init_cache``'s form, either layout) cut or zero-padded to ``length`` slots.
    Padded slots are empty (segment 0), as ``init_cache`` makes them; cutting keeps the first
    ``length`` slots (the caller knows they hold every filled one)."""
    def resize(x: Array, axis: int) -> Array:
        if x.shape[axis] == length:
            return x
        if x.shape[axis] > length:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        return jnp.pad(x, [(0, length - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])

    def kv(x: Any) -> Any:
        return tuple(resize(a, 2) for a in x) if isinstance(x, tuple) else resize(x, 3)

    return {"k": kv(cache["k"]), "v": kv(cache["v"]), "seg": resize(cache["seg"], 1)}


def stack_layers(params: Params, n_layers: int) -> Params:
    """``params`` with ``layer_0 .. layer_{n-1}`` replaced by one ``layers`` subtree whose leaves
    are the per-layer leaves stacked on a new leading axis ``[n_layers, ...]`` (the scanned
    form's layout).  Already stacked params are returned as they are.  ``Transformer`` with
    ``scan_layers=True`` accepts either form; stacking once outside a decode loop spares a copy
    of the weights per step."""
    if "layers" in params:
        return params
    names = [f"layer_{i}" for i in range(n_layers)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"stack_layers: params lack {missing[:3]} (ModelConfig.n_layers={n_layers})")
    rest = {k: v for k, v in params.items() if k not in names}
    return {**rest, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])}


def fuse_projections(params: Params, config: ModelConfig) -> Params:
    """Decode weights: each layer's ``q``/``k``/``v`` projections as one ``attn/qkv`` and (Llama
    family) ``mlp/gate``/``up`` as one ``mlp/gate_up``, so a decode step makes one matmul where it
    made three (or two).  At batch 32 and ``d_model`` 256 a step's matmuls are latency-bound, and
    the fused ones read the same weights in fewer, wider products (Megatron-LM and vLLM fuse them
    the same way).

    ``attn/qkv/kernel`` is ``[d, kv_heads, (groups + 2)·head_dim]``: for each key/value head its
    ``groups`` query heads, then its key, then its value, so splitting the last axis over a
    ``tensor`` mesh axis keeps a device's query heads with their key/value head; ``attn/qkv/bias``
    ``[kv_heads, (groups + 2)·head_dim]`` likewise.  ``mlp/gate_up/kernel`` is ``[d, 2, d_ff]``
    (gate, up).  Every output column is the same dot over ``d`` as before; on the CPU the outputs
    have been bitwise those of the separate matmuls in every shape tried (``test_model.py``, the
    default pipeline).  ``Transformer`` takes either form; fusing costs a copy of those weights,
    so it is done once per ``generate`` call, outside the decode loop.  Already fused params are
    returned as they are."""
    c = config
    groups = c.n_heads // c.kv_heads

    def by_kv_head(leaf: Array, heads_per_kv: int) -> Array:  # [..., heads·hd] -> [..., kv, heads_per_kv·hd]
        return leaf.reshape(*leaf.shape[:-1], c.kv_heads, heads_per_kv * c.head_dim)

    def fuse_layer(layer: Params) -> Params:
        attn, mlp = dict(layer["attn"]), dict(layer["mlp"])
        if "qkv" not in attn:
            parts = [attn.pop(n) for n in ("q", "k", "v")]
            attn["qkv"] = {leaf: jnp.concatenate([by_kv_head(p[leaf], h) for p, h in zip(parts, (groups, 1, 1))],
                                                 axis=-1)
                           for leaf in parts[0]}
        if "gate" in mlp:
            gate, up = mlp.pop("gate"), mlp.pop("up")
            mlp["gate_up"] = {"kernel": jnp.stack([gate["kernel"], up["kernel"]], axis=-2)}
        return {**layer, "attn": attn, "mlp": mlp}

    return {name: fuse_layer(sub) if name.startswith("layer_") else sub for name, sub in params.items()}


def _fused_dense(x: Array, param: Params, dtype: Any) -> Array:
    """``x [b, t, d]`` times a fused ``kernel [d, ...]`` (plus ``bias [...]``) -> ``[b, t, ...]``,
    cast as ``nn.Dense`` casts (inputs and weights in the compute ``dtype``)."""
    kernel = param["kernel"].astype(dtype)
    y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + param["bias"].astype(dtype) if "bias" in param else y


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype`` (e.g. bf16 rollout weights)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _batch_mesh(rows: int) -> Any:
    """The mesh set with ``jax.set_mesh`` (``stages.steps.jit_on_mesh`` does it) when it has the
    batch axes ``data × fsdp`` and they divide ``rows``, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return None
    return None if rows % math.prod(mesh.shape[a] for a in BATCH_AXES) else mesh


def _keep_batch_sharded(x: Array) -> Array:
    """Pin activations ``[b, ...]`` to batch sharding over ``data × fsdp`` when a mesh with those
    axes is set (``_batch_mesh``).  Without it GSPMD lets an fsdp-sharded embedding pull the whole
    global batch onto every device."""
    if _batch_mesh(x.shape[0]) is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


def _per_layer(table: Any, layer: Array | int) -> Array:
    """Row ``layer`` of a constant per-layer table (a Python int unrolled, the scan counter
    scanned)."""
    return jnp.asarray(table)[layer]


def _softcap(x: Array, cap: float | None) -> Array:
    """``cap·tanh(x / cap)`` (Gemma 2's soft-capping), or ``x`` when ``cap`` is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap


class RMSNorm(nn.Module):
    """RMSNorm in float32, scaled by ``w`` (Llama) or ``1 + w`` with ``w`` initialised at 0
    (``plus_one``, Gemma); the result is cast back to the input dtype."""

    eps: float
    plus_one: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


def _norm(config: ModelConfig, name: str) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(config.norm_eps, config.norm_plus_one, name=name)
    return nn.LayerNorm(epsilon=config.norm_eps, dtype=config.compute_dtype, name=name)


def _dense(config: ModelConfig, features: int, name: str, bias: bool) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=config.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _attention_xla(q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig) -> Array:
    """Softmax attention with an explicit mask.  q ``[b, tq, H, d]``; k, v ``[b, kv_heads, tk, d]``;
    ``allowed`` ``[b, tq, tk]`` bool.  Returns ``[b, tq, H·d]`` in the compute dtype.  Scores and
    softmax are float32; a fully masked row gives the uniform average (never NaN)."""
    c = config
    b, t = q.shape[:2]
    groups = c.n_heads // c.kv_heads
    q = q.reshape(b, t, c.kv_heads, groups, c.head_dim)
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k.astype(q.dtype)).astype(jnp.float32)
    # Divided by sqrt(head_dim) as before Gemma's scalar came, which keeps earlier runs bitwise.
    scaled = scores * _attention_scale(c) if c.query_pre_attn_scalar else scores / math.sqrt(c.head_dim)
    scores = _softcap(scaled, c.attn_softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.compute_dtype)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v.astype(c.compute_dtype))
    return out.reshape(b, t, c.n_heads * c.head_dim)


def _attention_scale(config: ModelConfig) -> float:
    """The score scale: ``query_pre_attn_scalar^-1/2`` (Gemma) or ``head_dim^-1/2``."""
    return (config.query_pre_attn_scalar or config.head_dim) ** -0.5


def _attention_dpa(q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig, implementation: str,
                   lengths: Array | None = None) -> Array:
    """``jax.nn.dot_product_attention`` (``implementation`` ``"xla"`` or ``"cudnn"``) with our mask,
    for a forward without a cache (queries and keys are the same ``t`` columns).  Causality goes
    in as ``is_causal`` (cuDNN skips the masked blocks).

    With ``lengths`` ``[b]`` (each row one sequence in columns ``[0, lengths)``, padding after: see
    ``Transformer``'s ``seq_lengths``) the padding goes in as sequence lengths and no mask is
    passed; ``allowed`` is not read (for such rows it is the causal mask within the lengths).
    Otherwise ``allowed`` (segments, padding, windows) goes in as the mask, which
    ``jax.nn.dot_product_attention`` turns into a ``[b, 1, t, t]`` additive bias that cuDNN reads
    for every head, and whose gradient jax's cuDNN backward computes too (before jax PR #39512).
    A query row with no allowed key (a padding column) attends to itself in the mask form and
    gets no key in the lengths form, so no row is empty under the mask; its output differs from
    ``_attention_xla``'s uniform average there, and such columns are never read.  Shapes as in
    ``_attention_xla``."""
    b, t = q.shape[:2]
    dt = config.compute_dtype
    if lengths is None:
        eye = jnp.eye(t, dtype=bool)[None]
        masking = {"mask": (allowed | (eye & ~jnp.any(allowed, axis=-1, keepdims=True)))[:, None]}
    else:
        lengths = lengths.astype(jnp.int32)
        masking = {"query_seq_lengths": lengths, "key_value_seq_lengths": lengths}
    out = jax.nn.dot_product_attention(
        q.astype(dt), k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3).astype(dt),
        scale=_attention_scale(config), is_causal=True, implementation=implementation, **masking)
    return out.reshape(b, t, config.n_heads * config.head_dim)


SPLASH_BLOCKS = (512, 256, 128)  # the splash kernel's tile, the largest that divides the columns


def splash_attention(config: ModelConfig, seq: int) -> bool:
    """Whether a forward without a KV cache over ``seq`` columns attends through Pallas's splash
    attention (``attention_impl="splash"``): not with sliding windows (``layer_windows``: the
    XLA path keeps them), and only when ``seq`` is a multiple of the kernel's smallest tile
    (128); otherwise the XLA path."""
    return config.attention_impl == "splash" and config.layer_windows is None and seq % SPLASH_BLOCKS[-1] == 0


def _attention_splash(q: Array, k: Array, v: Array, seg: Array, config: ModelConfig) -> Array:
    """Causal attention through Pallas's splash attention kernel (the TPU flash attention that
    MaxText uses; ``jax.experimental.pallas.ops.tpu.splash_attention``), in its grouped-query
    form: one kernel call per row and K/V head over that head's ``n_heads / kv_heads`` queries.
    Segments go in as the kernel's segment ids (a query attends to earlier keys of its own
    segment), soft-capping as its ``attn_logits_soft_cap``, the scale on the queries.  On a
    backend other than a TPU the kernel runs in Pallas's interpret mode (slow: for checking the
    wiring on a CPU).  Under a mesh with the batch axes (``jax.set_mesh``) it runs per device
    (``jax.shard_map``): rows over ``data × fsdp``, K/V heads over ``tensor`` where it divides them.

    A padding column (segment 0) attends to the earlier padding columns rather than getting
    ``_attention_xla``'s uniform average; such columns are never read.  q ``[b, t, H, d]``; k, v
    ``[b, kv_heads, t, d]``; ``seg`` ``[b, t]`` int; ``t`` a multiple of 128
    (``splash_attention``).  Returns ``[b, t, H·d]`` in the compute dtype."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    c, dt = config, config.compute_dtype
    b, t = q.shape[:2]
    groups = c.n_heads // c.kv_heads
    n = next(n for n in SPLASH_BLOCKS if t % n == 0)
    sizes = splash.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                              block_kv_dkv_compute=n, use_fused_bwd_kernel=True)
    kernel = splash.make_splash_mqa(masks.MultiHeadMask([masks.CausalMask((t, t))] * groups), block_sizes=sizes,
                                    attn_logits_soft_cap=c.attn_softcap, head_shards=1, q_seq_shards=1,
                                    interpret=jax.default_backend() != "tpu")

    def one(q: Array, k: Array, v: Array, seg: Array) -> Array:  # q [g, t, d]; k, v [t, d]; seg [t]
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))

    def attend(q: Array, k: Array, v: Array, seg: Array) -> Array:  # q [b, kv, g, t, d]; k, v [b, kv, t, d]
        return jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(q, k, v, seg)

    mesh = _batch_mesh(b)
    if mesh is not None:
        heads = "tensor" if "tensor" in mesh.axis_names and c.kv_heads % mesh.shape["tensor"] == 0 else None
        rows = jax.sharding.PartitionSpec(BATCH_AXES, heads)
        attend = jax.shard_map(attend, mesh=mesh, in_specs=(rows, rows, rows, jax.sharding.PartitionSpec(BATCH_AXES)),
                               out_specs=rows, check_vma=False)
    q = (q * _attention_scale(c)).astype(dt).reshape(b, t, c.kv_heads, groups, c.head_dim).transpose(0, 2, 3, 1, 4)
    out = attend(q, k.astype(dt), v.astype(dt), seg.astype(jnp.int32))  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.n_heads * c.head_dim)


def flash_attention(config: ModelConfig, backend: str | None = None) -> bool:
    """Whether a forward without a KV cache (training and full forwards; decode and prefill stay
    on XLA) attends through cuDNN flash attention on ``backend`` (default: this process's
    ``jax.default_backend()``): never with attention soft-capping; always with
    ``attention_impl="cudnn"``; with ``"auto"`` on a GPU with a 16-bit compute dtype and head_dim a
    multiple of 8 up to 128."""
    if config.attn_softcap is not None:
        return False
    if config.attention_impl == "cudnn":
        return True
    return (config.attention_impl == "auto" and (backend or jax.default_backend()) == "gpu"
            and config.dtype in ("bfloat16", "float16") and config.head_dim % 8 == 0 and config.head_dim <= 128)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, seg, k_seg, cache, cache_index, layer, lengths=None):
        """x ``[b, t, d]``; ``seg`` the queries' segment ids ``[b, t]``; ``k_seg`` the keys' segment ids
        (``seg`` itself without a cache, the whole cache's ``[b, slots]`` with one); ``lengths``
        ``[b]`` or None: ``Transformer``'s ``seq_lengths``, read by the cuDNN path only.  ``cache``:
        ``{"k", "v"}`` stacked ``[L, b, kv_heads, slots, d]``, where this layer (index ``layer``, an
        int or a traced scalar) writes its keys/values at ``[layer, :, :, cache_index:cache_index +
        t]`` in place and attends to ``cache[layer]``; or this layer's own ``[b, kv_heads, slots,
        d]``, written at ``[:, :, cache_index:cache_index + t]``."""
        c = self.config
        b, t, _ = x.shape
        bias = c.arch == "gpt2" or c.qkv_bias
        fused = self.variables.get("params", {}).get("qkv")  # fuse_projections' decode weights
        if fused is not None:
            qkv = _fused_dense(x, fused, c.compute_dtype).reshape(b, t, c.kv_heads, -1, c.head_dim)
            groups = c.n_heads // c.kv_heads
            q, k, v = qkv[:, :, :, :groups].reshape(b, t, c.n_heads, c.head_dim), qkv[:, :, :, groups], \
                qkv[:, :, :, groups + 1]
        else:
            q = _dense(c, c.n_heads * c.head_dim, "q", bias)(x).reshape(b, t, c.n_heads, c.head_dim)
            k = _dense(c, c.kv_heads * c.head_dim, "k", bias)(x).reshape(b, t, c.kv_heads, c.head_dim)
            v = _dense(c, c.kv_heads * c.head_dim, "v", bias)(x).reshape(b, t, c.kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.norm_eps, c.norm_plus_one, name="q_norm")(q)
            k = RMSNorm(c.norm_eps, c.norm_plus_one, name="k_norm")(k)
        if c.arch == "llama" and c.rope_scaling is None and c.rope_local_theta is None:
            inv_freq, factor = default_inv_freq(c.rope_theta, c.head_dim), 1.0
        elif c.arch == "llama":
            inv_freq, factor = c.rope_tables()
            inv_freq, factor = _per_layer(inv_freq, layer), _per_layer(factor, layer)
        if c.arch == "llama":
            q = apply_rope(q, positions, inv_freq, factor)
            k = apply_rope(k, positions, inv_freq, factor)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, d]
        q_slots = jnp.arange(t)
        if cache is not None:
            zero = jnp.zeros((), jnp.int32)
            stacked = cache["k"].ndim == 5
            at = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
            if stacked:
                at, k, v = (jnp.asarray(layer, jnp.int32), *at), k[None], v[None]
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new.astype(cache[name].dtype), at)
                     for name, new in (("k", k), ("v", v))}
            k, v = cache["k"], cache["v"]
            if stacked:
                k = jax.lax.dynamic_index_in_dim(k, layer, 0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False)
            q_slots = q_slots + cache_index
        k_slots = jnp.arange(k.shape[2])

        allowed = (
            (seg[:, :, None] == k_seg[:, None, :])
            & (k_seg[:, None, :] != 0)
            & (k_slots[None, None, :] <= q_slots[None, :, None])
        )  # [b, tq, tk]
        if c.layer_windows is not None:  # 0 (a global layer) lets every earlier slot through
            window = _per_layer([w or k.shape[2] + t for w in c.layer_windows], layer)
            allowed &= k_slots[None, None, :] > q_slots[None, :, None] - window
        if cache is None and flash_attention(c):
            out = _attention_dpa(q, k, v, allowed, c, "cudnn", lengths if c.layer_windows is None else None)
        elif cache is None and splash_attention(c, t):
            out = _attention_splash(q, k, v, seg, c)
        else:
            out = _attention_xla(q, k, v, allowed, c)
        return _dense(c, c.d_model, "o", c.arch == "gpt2")(out), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        if c.arch == "llama":  # SwiGLU / GeGLU (Shazeer 2020): down(act(gate x) * up x)
            fused = self.variables.get("params", {}).get("gate_up")  # fuse_projections' decode weights
            if fused is not None:
                gate_up = _fused_dense(x, fused, c.compute_dtype)
                gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
            else:
                gate = _dense(c, c.ff_dim, "gate", False)(x)
                up = _dense(c, c.ff_dim, "up", False)(x)
            act = nn.silu(gate) if c.activation == "silu" else nn.gelu(gate, approximate=True)
            return _dense(c, c.d_model, "down", False)(act * up)
        h = _dense(c, c.ff_dim, "fc", True)(x)  # GPT-2: gelu_new (tanh approximation)
        return _dense(c, c.d_model, "proj", True)(nn.gelu(h, approximate=True))


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, seg, k_seg, cache, cache_index, layer, lengths=None):
        c = self.config
        h, cache = Attention(c, name="attn")(_norm(c, "attn_norm")(x), positions, seg, k_seg, cache, cache_index, layer,
                                             lengths)
        if c.post_norms:
            h = _norm(c, "post_attn_norm")(h)
        x = x + h
        h = MLP(c, name="mlp")(_norm(c, "mlp_norm")(x))
        if c.post_norms:
            h = _norm(c, "post_mlp_norm")(h)
        return x + h, cache


_NO_REMAT = object()
_REMAT_POLICY = {"none": _NO_REMAT, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


def _scan_blocks(config: ModelConfig, params: Params, x: Array, positions: Array, seg: Array, k_seg: Array,
                 kv: dict[str, Array] | None, cache_index: Array | int,
                 lengths: Array | None = None) -> tuple[Array, dict[str, Array] | None]:
    """The blocks as one ``lax.scan`` over the layer-stacked parameters (``stack_layers``): one
    block body is traced and compiled whatever the depth.  The stacked KV cache rides in the
    carry and each step writes its layer's slots in place (no per-step copy of the cache as scan
    outputs).  Remat (``config.remat_mode``) wraps the body."""
    stacked = stack_layers(params, config.n_layers)["layers"]
    block = Block(config, parent=None)

    def body(carry, xs):
        h, kv = carry
        layer_params, layer = xs
        h = _keep_batch_sharded(h)
        h, kv = block.apply({"params": layer_params}, h, positions, seg, k_seg, kv, cache_index, layer, lengths)
        return (h, kv), None

    policy = _REMAT_POLICY[config.remat_mode]
    if policy is not _NO_REMAT:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, jnp.arange(config.n_layers, dtype=jnp.int32)))
    return x, kv


class Transformer(nn.Module):
    """Decoder-only transformer.  Parameter tree (plain nested dicts)::

        embed/embedding [V, d]; pos_embed/embedding [max_len, d] (gpt2)
        layer_{i}/attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{fc,proj} | mlp/{gate,up,down}
                  attn/{q_norm,k_norm} (qk_norm), post_attn_norm, post_mlp_norm (post_norms)
        final_norm; lm_head/kernel [d, V] (untied LM only) | score_head/{kernel,bias} (scalar head)

    ``seq_lengths`` ``[b]`` (optional, forwards without a cache): the caller's word that each row
    is one sequence in columns ``[0, seq_lengths)`` with padding after, that is ``segment_ids`` is
    ``1`` there and ``0`` after.  The cuDNN attention then masks padding by these lengths instead
    of a ``[b, 1, t, t]`` bias; every other path ignores them.  Outputs at the sequences' columns
    are the same either way.
    """

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        segment_ids: Array,
        cache: dict[str, Any] | None = None,
        cache_index: Array | int = 0,
        logits_slice: tuple[int, int] | None = None,
        unembed: bool = True,
        seq_lengths: Array | None = None,
    ) -> Output:
        c = self.config
        if seq_lengths is not None and cache is not None:
            raise ValueError("Transformer: seq_lengths is for forwards without a KV cache")
        # Out-of-range ids (e.g. an added pad token) would be clamped silently by the gather.
        tokens = jnp.where((tokens >= 0) & (tokens < c.vocab_size), tokens, 0)
        embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02),
                         param_dtype=jnp.float32, name="embed")
        x = embed(tokens).astype(c.compute_dtype)
        if c.embed_scale:
            x = x * jnp.asarray(math.sqrt(c.d_model), c.compute_dtype)
        if c.arch == "gpt2":
            pos = nn.Embed(c.max_len, c.d_model, embedding_init=nn.initializers.normal(0.01),
                           param_dtype=jnp.float32, name="pos_embed")
            x = x + pos(jnp.clip(positions, 0, c.max_len - 1)).astype(c.compute_dtype)

        segment_ids = segment_ids.astype(jnp.int32)
        if cache is None:
            k_seg, kv = segment_ids, None
        else:
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
            kv = {"k": cache["k"], "v": cache["v"]}

        if c.scans(cached=cache is not None) and not self.is_initializing():
            if kv is not None and isinstance(kv["k"], tuple):  # per-layer arrays: the carry is stacked
                kv = {name: jnp.stack(kv[name]) for name in kv}
            x, kv = _scan_blocks(c, self.variables["params"], x, positions, segment_ids, k_seg, kv, cache_index,
                                 seq_lengths)
        else:  # unrolled (and always under init, which creates the stored layer_{i} parameters)
            policy = _REMAT_POLICY[c.remat_mode]
            block_cls = Block if policy is _NO_REMAT else nn.remat(Block, policy=policy)
            per_layer = kv is not None and isinstance(kv["k"], tuple)
            for i in range(c.n_layers):
                x = _keep_batch_sharded(x)
                layer_kv = {name: kv[name][i] for name in kv} if per_layer else kv
                x, layer_kv = block_cls(c, name=f"layer_{i}")(x, positions, segment_ids, k_seg, layer_kv,
                                                              cache_index, i, seq_lengths)
                kv = {name: kv[name][:i] + (layer_kv[name],) + kv[name][i + 1:] for name in kv} if per_layer \
                    else layer_kv
        hidden = _norm(c, "final_norm")(x)
        new_cache = None if cache is None else {**kv, "seg": k_seg}

        if c.head == "scalar":
            values = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(1.0 / math.sqrt(c.d_model + 1)),
                              name="score_head")(hidden.astype(jnp.float32))[..., 0]
            return Output(logits=None, hidden=hidden, values=values, cache=new_cache)
        if not unembed:  # the caller unembeds (``unembed_fn``), e.g. in chunks
            return Output(logits=None, hidden=hidden, cache=new_cache)
        # Unembed only the columns asked for: slicing the [b, t, V] logits afterwards would not
        # spare the matmul (nor, under grad, the full-size logits gradient).
        to_unembed = hidden if logits_slice is None else hidden[:, logits_slice[0]:logits_slice[1]]
        if c.tie_embeddings:
            logits = embed.attend(to_unembed.astype(jnp.float32))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                              param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                              name="lm_head")(to_unembed)
        return Output(logits=_softcap(logits.astype(jnp.float32), c.final_softcap), hidden=hidden, cache=new_cache)


def unembed_fn(config: ModelConfig, params: Params):
    """``hidden [..., d] -> float32 logits [..., V]``: the LM head of ``Transformer`` as a function
    of ``params`` (tied: ``hidden·Eᵀ`` in float32, as ``nn.Embed.attend``; untied: the
    ``lm_head`` kernel in the compute dtype, as ``nn.Dense``; then ``final_softcap``), for callers
    that unembed a few columns at a time (``losses.chunked_logprobs``)."""
    if config.head != "lm":
        raise ValueError(f"unembed_fn: needs ModelConfig.head='lm' (got {config.head!r})")
    cap = config.final_softcap
    if config.tie_embeddings:
        embedding = params["embed"]["embedding"]
        return lambda h: _softcap(jnp.dot(h.astype(jnp.float32), embedding.T).astype(jnp.float32), cap)
    kernel, dt = params["lm_head"]["kernel"], config.compute_dtype
    return lambda h: _softcap(jnp.dot(h.astype(dt), kernel.astype(dt)).astype(jnp.float32), cap)


@functools.partial(jax.jit, static_argnums=0)
def init_params(model: Transformer, key: Array) -> Params:
    """Random float32 parameters (plain nested dict, without the ``"params"`` collection level).
    Jitted (the model is static), so initialisation is one compiled program."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    variables = model.init(key, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))
    return flax.core.unfreeze(variables["params"])


def forward(
    model: Transformer,
    params: Params,
    tokens: Array,
    mask: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    logits_slice: tuple[int, int] | None = None,
    unembed: bool = True,
    right_padded: bool = False,
) -> Output:
    """Full forward pass.  ``tokens``, ``mask`` ``[batch, time]``; positions default to
    ``cumsum(mask) - 1`` so left padding is exact; ``segment_ids`` (packing) default to ``mask``.
    ``logits_slice=(start, stop)`` (static ints, Python slice semantics) unembeds only the columns
    ``hidden[:, start:stop]``, so ``logits`` holds those columns only; ``unembed=False`` skips the
    unembedding (``logits`` is None; see ``unembed_fn``).  ``right_padded=True`` (static) is the
    caller's word that every row of ``mask`` is ones then zeros (``data.batching``'s SFT, reward
    and DPO rows, no packing): the cuDNN attention then masks by the rows' lengths
    (``Transformer``'s ``seq_lengths``) rather than by a bias; other paths are unchanged.  An
    empty row counts as one column, so no sequence is empty (its columns are never read)."""
    if right_padded and segment_ids is not None:
        raise ValueError("forward: right_padded=True is for rows of one sequence each; "
                         "packed rows (segment_ids) go in as a mask")
    if positions is None:
        positions = positions_from_mask(mask)
    lengths = jnp.maximum(jnp.sum(mask != 0, axis=1, dtype=jnp.int32), 1) if right_padded else None
    if segment_ids is None:
        segment_ids = mask
    return model.apply({"params": params}, tokens, positions, segment_ids, logits_slice=logits_slice, unembed=unembed,
                       seq_lengths=lengths)


def decode_step(
    model: Transformer,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    cache: dict[str, Any],
    cache_index: Array | int,
) -> Output:
    """Run ``tokens`` ``[batch, t]`` against the cache, writing their keys/values at slots
    ``[cache_index, cache_index + t)``.  Prefill is the call with the whole prompt at index 0."""
    return model.apply({"params": params}, tokens, positions, segment_ids, cache, cache_index)
