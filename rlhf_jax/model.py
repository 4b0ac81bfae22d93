"""The decoder-only transformer: GPT-2 and Llama families in one Flax Linen module.

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
applies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import flax
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCORE_POOLINGS = ("last", "mean")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    ``arch="gpt2"``: learned positions, LayerNorm, GELU (tanh approximation) MLP, biases
    everywhere, tied embeddings.  ``arch="llama"``: RoPE, RMSNorm, SwiGLU, grouped-query
    attention (``n_kv_heads`` < ``n_heads``), no biases (``qkv_bias=True`` gives Qwen2).

    ``head="lm"`` ends in the unembedding; ``head="scalar"`` replaces it by a scalar head
    ``[d_model] -> 1`` (reward and value models, InstructGPT §3.5).

    ``score_pooling`` (scalar head only): how ``generation.score`` reads one reward per sequence
    from the per-token head values ``v_t`` — ``"last"``: ``v`` at the last real token, the EOS
    (InstructGPT, Stiennon et al. 2020, Hugging Face ``...ForSequenceClassification``);
    ``"mean"``: the mean of ``v_t`` over the real tokens up to it, so each token adds its own
    term, whatever the length.
    """

    arch: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 1024
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    d_ff: int | None = None
    max_len: int = 512
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    qkv_bias: bool = False
    head: Literal["lm", "scalar"] = "lm"
    score_pooling: Literal["last", "mean"] = "last"
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{field}: {why} (got {getattr(self, field)!r})")

        if self.arch not in ("gpt2", "llama"):
            bad("arch", "must be 'gpt2' or 'llama'")
        if self.head not in ("lm", "scalar"):
            bad("head", "must be 'lm' or 'scalar'")
        if self.score_pooling not in SCORE_POOLINGS:
            bad("score_pooling", f"must be one of {SCORE_POOLINGS}")
        if self.dtype not in _DTYPES:
            bad("dtype", f"must be one of {sorted(_DTYPES)}")
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive int")
        if self.d_model % self.n_heads:
            bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.arch == "llama" and self.head_dim % 2:
            bad("d_model", "head_dim must be even for RoPE")
        if self.norm_eps <= 0:
            bad("norm_eps", "must be > 0")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def compute_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


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
    """An empty KV cache of ``length`` slots: per layer ``k``/``v`` ``[batch, kv_heads, length, head_dim]``
    (heads before slots, so a decode step attends without transposing the cache) and ``seg``
    ``[batch, length]`` (0 = empty slot)."""
    dtype = dtype or config.compute_dtype
    shape = (batch, config.kv_heads, length, config.head_dim)
    return {
        "layers": [
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(config.n_layers)
        ],
        "seg": jnp.zeros((batch, length), jnp.int32),
    }


def _keep_batch_sharded(x: Array) -> Array:
    """Pin activations ``[b, ...]`` to batch sharding over ``data × fsdp`` when a mesh with those
    axes is set (``jax.set_mesh``; ``stages.common.jit_on_mesh`` does it).  Without it GSPMD lets
    an fsdp-sharded embedding pull the whole global batch onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names):
        return x
    if x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(("data", "fsdp")))


def _rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding, Hugging Face "rotate half" layout. x ``[b, t, h, d]``, positions ``[b, t]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(x.dtype)


def _norm(config: ModelConfig, name: str) -> nn.Module:
    if config.arch == "llama":
        return RMSNorm(config.norm_eps, name=name)
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


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, seg, k_seg, cache, cache_index):
        """x ``[b, t, d]``; ``seg`` the queries' segment ids ``[b, t]``; ``k_seg`` the keys' segment ids
        (``seg`` itself without a cache, the whole cache's ``[b, slots]`` with one)."""
        c = self.config
        b, t, _ = x.shape
        bias = c.arch == "gpt2" or c.qkv_bias
        q = _dense(c, c.n_heads * c.head_dim, "q", bias)(x).reshape(b, t, c.n_heads, c.head_dim)
        k = _dense(c, c.kv_heads * c.head_dim, "k", bias)(x).reshape(b, t, c.kv_heads, c.head_dim)
        v = _dense(c, c.kv_heads * c.head_dim, "v", bias)(x).reshape(b, t, c.kv_heads, c.head_dim)
        if c.arch == "llama":
            q = _rope(q, positions, c.rope_theta)
            k = _rope(k, positions, c.rope_theta)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv_heads, t, d]
        q_slots = jnp.arange(t)
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 2)
            v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 2)
            cache = {"k": k, "v": v}
            q_slots = q_slots + cache_index
        k_slots = jnp.arange(k.shape[2])

        allowed = (
            (seg[:, :, None] == k_seg[:, None, :])
            & (k_seg[:, None, :] != 0)
            & (k_slots[None, None, :] <= q_slots[None, :, None])
        )  # [b, tq, tk]
        groups = c.n_heads // c.kv_heads
        q = q.reshape(b, t, c.kv_heads, groups, c.head_dim)
        scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / math.sqrt(c.head_dim)
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(c.compute_dtype)
        out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v.astype(c.compute_dtype))
        out = out.reshape(b, t, c.n_heads * c.head_dim)
        return _dense(c, c.d_model, "o", c.arch == "gpt2")(out), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        if c.arch == "llama":  # SwiGLU (Shazeer 2020): down(silu(gate x) * up x)
            gate = _dense(c, c.ff_dim, "gate", False)(x)
            up = _dense(c, c.ff_dim, "up", False)(x)
            return _dense(c, c.d_model, "down", False)(nn.silu(gate) * up)
        h = _dense(c, c.ff_dim, "fc", True)(x)  # GPT-2: gelu_new (tanh approximation)
        return _dense(c, c.d_model, "proj", True)(nn.gelu(h, approximate=True))


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, seg, k_seg, cache, cache_index):
        h, cache = Attention(self.config, name="attn")(
            _norm(self.config, "attn_norm")(x), positions, seg, k_seg, cache, cache_index
        )
        x = x + h
        x = x + MLP(self.config, name="mlp")(_norm(self.config, "mlp_norm")(x))
        return x, cache


class Transformer(nn.Module):
    """Decoder-only transformer.  Parameter tree (plain nested dicts)::

        embed/embedding [V, d]; pos_embed/embedding [max_len, d] (gpt2)
        layer_{i}/attn_norm, attn/{q,k,v,o}, mlp_norm, mlp/{fc,proj} | mlp/{gate,up,down}
        final_norm; lm_head/kernel [d, V] (untied LM only) | score_head/{kernel,bias} (scalar head)
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
    ) -> Output:
        c = self.config
        # Out-of-range ids (e.g. an added pad token) would be clamped silently by the gather.
        tokens = jnp.where((tokens >= 0) & (tokens < c.vocab_size), tokens, 0)
        embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(0.02),
                         param_dtype=jnp.float32, name="embed")
        x = embed(tokens).astype(c.compute_dtype)
        if c.arch == "gpt2":
            pos = nn.Embed(c.max_len, c.d_model, embedding_init=nn.initializers.normal(0.01),
                           param_dtype=jnp.float32, name="pos_embed")
            x = x + pos(jnp.clip(positions, 0, c.max_len - 1)).astype(c.compute_dtype)

        segment_ids = segment_ids.astype(jnp.int32)
        if cache is None:
            k_seg, layer_caches = segment_ids, [None] * c.n_layers
        else:
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
            layer_caches = cache["layers"]

        block_cls = nn.remat(Block) if c.remat else Block
        new_caches = []
        for i in range(c.n_layers):
            x = _keep_batch_sharded(x)
            x, layer_cache = block_cls(c, name=f"layer_{i}")(
                x, positions, segment_ids, k_seg, layer_caches[i], cache_index
            )
            new_caches.append(layer_cache)
        hidden = _norm(c, "final_norm")(x)
        new_cache = None if cache is None else {"layers": new_caches, "seg": k_seg}

        if c.head == "scalar":
            values = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(1.0 / math.sqrt(c.d_model + 1)),
                              name="score_head")(hidden.astype(jnp.float32))[..., 0]
            return Output(logits=None, hidden=hidden, values=values, cache=new_cache)
        # Unembed only the columns asked for: slicing the [b, t, V] logits afterwards would not
        # spare the matmul (nor, under grad, the full-size logits gradient).
        to_unembed = hidden if logits_slice is None else hidden[:, logits_slice[0]:logits_slice[1]]
        if c.tie_embeddings:
            logits = embed.attend(to_unembed.astype(jnp.float32))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                              param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                              name="lm_head")(to_unembed)
        return Output(logits=logits.astype(jnp.float32), hidden=hidden, cache=new_cache)


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
) -> Output:
    """Full forward pass.  ``tokens``, ``mask`` ``[batch, time]``; positions default to
    ``cumsum(mask) - 1`` so left padding is exact; ``segment_ids`` (packing) default to ``mask``.
    ``logits_slice=(start, stop)`` (static ints, Python slice semantics) unembeds only the columns
    ``hidden[:, start:stop]``, so ``logits`` holds those columns only."""
    if positions is None:
        positions = positions_from_mask(mask)
    if segment_ids is None:
        segment_ids = mask
    return model.apply({"params": params}, tokens, positions, segment_ids, logits_slice=logits_slice)


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
