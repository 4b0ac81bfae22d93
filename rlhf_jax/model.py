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
applies.  Its keys and values are stacked over the layers (``[L, b, kv_heads, slots, d]``) and each
layer writes its slots in place at its layer index, unrolled or scanned alike.

``ModelConfig.scan_layers`` runs the blocks as one ``jax.lax.scan`` over parameters stacked at
trace time, so compile time stops growing with depth; the stored parameter tree stays
``layer_{i}/...`` either way (Hugging Face / GGUF import, partition rules and checkpoints are
unchanged).
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

from rlhf_jax.sharding import BATCH_AXES

Array = jax.Array
Params = dict[str, Any]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCORE_POOLINGS = ("last", "mean")
REMAT_POLICIES = ("none", "dots", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")


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

    Execution switches (the parameters and the outputs do not depend on them):

    - ``dtype``: the compute dtype (parameters stay float32).
    - ``scan_layers``: run the blocks as one ``lax.scan`` over per-layer parameters stacked at
      trace time (compile time independent of depth) instead of unrolling them.
    - ``scan_decode`` (with ``scan_layers``): whether calls with a KV cache (prefill, decode
      steps) scan too; ``False`` unrolls them, which compiles the decode body once per layer but
      lets each matmul read its layer's weights in place (a scan body reads a dynamic slice of
      the stacked weights, which XLA may copy every step).
    - ``remat_policy``: what a block keeps for the backward pass — ``"none"`` (everything),
      ``"dots"`` (the matmul outputs, ``dots_with_no_batch_dims_saveable``; the rest is
      recomputed), ``"full"`` (only the block's input; ``remat=True`` is the old spelling of it).
    - ``attention_impl``: training / prefill attention — ``"xla"`` (our einsum with the
      segment-id mask), ``"cudnn"`` (``jax.nn.dot_product_attention`` with cuDNN flash attention:
      bf16/fp16 and GPU only, without a cache), ``"auto"`` (cuDNN where it applies, else XLA).
    - ``logits_chunk``: ``> 0`` computes the log-probs of chosen tokens (``sequence_logprobs``,
      the SFT and ptx losses) ``logits_chunk`` time steps at a time, so the ``[b, T, V]`` float32
      logits are never held whole (0: all at once).
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
    scan_layers: bool = False
    scan_decode: bool = True
    remat_policy: Literal["none", "dots", "full"] = "none"
    attention_impl: Literal["xla", "cudnn", "auto"] = "xla"
    logits_chunk: int = 0

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
        for f in ("scan_layers", "scan_decode"):
            if not isinstance(getattr(self, f), bool):
                bad(f, "must be a bool")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"must be one of {REMAT_POLICIES}")
        if self.remat and self.remat_policy not in ("none", "full"):
            bad("remat_policy", "conflicts with remat=True (which means 'full'); set one of them")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"must be one of {ATTENTION_IMPLS}")
        if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
            bad("logits_chunk", "must be an int >= 0 (0 = off)")

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

    def scans(self, cached: bool) -> bool:
        """Whether a forward runs the blocks as a scan: ``scan_layers``, and for calls with a KV
        cache also ``scan_decode``."""
        return self.scan_layers and (self.scan_decode or not cached)

    @property
    def remat_mode(self) -> str:
        """The effective remat policy: ``remat_policy``, or ``"full"`` when ``remat=True``."""
        return "full" if self.remat else self.remat_policy

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
    """An empty KV cache of ``length`` slots: ``k``/``v`` ``[n_layers, batch, kv_heads, length,
    head_dim]`` (stacked over the layers; heads before slots, so a decode step attends without
    transposing the cache) and ``seg`` ``[batch, length]`` (0 = empty slot)."""
    dtype = dtype or config.compute_dtype
    shape = (config.n_layers, batch, config.kv_heads, length, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "seg": jnp.zeros((batch, length), jnp.int32)}


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


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of ``tree`` cast to ``dtype`` (e.g. bf16 rollout weights)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _keep_batch_sharded(x: Array) -> Array:
    """Pin activations ``[b, ...]`` to batch sharding over ``data × fsdp`` when a mesh with those
    axes is set (``jax.set_mesh``; ``stages.common.jit_on_mesh`` does it).  Without it GSPMD lets
    an fsdp-sharded embedding pull the whole global batch onto every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXES))


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


def _attention_xla(q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig) -> Array:
    """Softmax attention with an explicit mask.  q ``[b, tq, H, d]``; k, v ``[b, kv_heads, tk, d]``;
    ``allowed`` ``[b, tq, tk]`` bool.  Returns ``[b, tq, H·d]`` in the compute dtype.  Scores and
    softmax are float32; a fully masked row gives the uniform average (never NaN)."""
    c = config
    b, t = q.shape[:2]
    groups = c.n_heads // c.kv_heads
    q = q.reshape(b, t, c.kv_heads, groups, c.head_dim)
    scores = jnp.einsum("bqhgd,bhkd->bhgqk", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / math.sqrt(c.head_dim)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(c.compute_dtype)
    out = jnp.einsum("bhgqk,bhkd->bqhgd", probs, v.astype(c.compute_dtype))
    return out.reshape(b, t, c.n_heads * c.head_dim)


def _attention_dpa(q: Array, k: Array, v: Array, allowed: Array, config: ModelConfig, implementation: str) -> Array:
    """``jax.nn.dot_product_attention`` (``implementation`` ``"xla"`` or ``"cudnn"``) with our mask,
    for a forward without a cache (queries and keys are the same ``t`` columns).  Causality goes
    in as ``is_causal`` (cuDNN skips the masked blocks); ``allowed`` (segments, padding) as the
    mask.  A query row with no allowed key (a padding column) attends to itself instead, so no
    row is empty: its output differs from ``_attention_xla``'s uniform average there, and such
    columns are never read.  Shapes as in ``_attention_xla``."""
    b, t = q.shape[:2]
    dt = config.compute_dtype
    eye = jnp.eye(t, dtype=bool)[None]
    allowed = allowed | (eye & ~jnp.any(allowed, axis=-1, keepdims=True))
    out = jax.nn.dot_product_attention(
        q.astype(dt), k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3).astype(dt),
        mask=allowed[:, None], is_causal=True, implementation=implementation)
    return out.reshape(b, t, config.n_heads * config.head_dim)


def _cudnn_applies(config: ModelConfig, cached: bool) -> bool:
    """Whether ``attention_impl="auto"`` picks cuDNN flash attention: a GPU backend, a 16-bit
    compute dtype, no KV cache (training and full forwards; decode and prefill stay on XLA), and
    head_dim a multiple of 8 up to 128."""
    return (not cached and config.dtype in ("bfloat16", "float16") and jax.default_backend() == "gpu"
            and config.head_dim % 8 == 0 and config.head_dim <= 128)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, seg, k_seg, cache, cache_index, layer):
        """x ``[b, t, d]``; ``seg`` the queries' segment ids ``[b, t]``; ``k_seg`` the keys' segment ids
        (``seg`` itself without a cache, the whole cache's ``[b, slots]`` with one).  ``cache``:
        ``{"k", "v"}`` stacked ``[L, b, kv_heads, slots, d]``; this layer (index ``layer``, an int
        or a traced scalar) writes its keys/values at ``[layer, :, :, cache_index:cache_index + t]``
        in place and attends to ``cache[layer]``."""
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
            zero = jnp.zeros((), jnp.int32)
            at = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
            cache = {name: jax.lax.dynamic_update_slice(cache[name], new[None].astype(cache[name].dtype), at)
                     for name, new in (("k", k), ("v", v))}
            k = jax.lax.dynamic_index_in_dim(cache["k"], layer, 0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(cache["v"], layer, 0, keepdims=False)
            q_slots = q_slots + cache_index
        k_slots = jnp.arange(k.shape[2])

        allowed = (
            (seg[:, :, None] == k_seg[:, None, :])
            & (k_seg[:, None, :] != 0)
            & (k_slots[None, None, :] <= q_slots[None, :, None])
        )  # [b, tq, tk]
        use_cudnn = cache is None and (c.attention_impl == "cudnn" or (
            c.attention_impl == "auto" and _cudnn_applies(c, cached=False)))
        if use_cudnn:
            out = _attention_dpa(q, k, v, allowed, c, "cudnn")
        else:
            out = _attention_xla(q, k, v, allowed, c)
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
    def __call__(self, x, positions, seg, k_seg, cache, cache_index, layer):
        h, cache = Attention(self.config, name="attn")(
            _norm(self.config, "attn_norm")(x), positions, seg, k_seg, cache, cache_index, layer
        )
        x = x + h
        x = x + MLP(self.config, name="mlp")(_norm(self.config, "mlp_norm")(x))
        return x, cache


_NO_REMAT = object()
_REMAT_POLICY = {"none": _NO_REMAT, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable, "full": None}


def _scan_blocks(config: ModelConfig, params: Params, x: Array, positions: Array, seg: Array, k_seg: Array,
                 kv: dict[str, Array] | None, cache_index: Array | int) -> tuple[Array, dict[str, Array] | None]:
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
        h, kv = block.apply({"params": layer_params}, h, positions, seg, k_seg, kv, cache_index, layer)
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
        unembed: bool = True,
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
            k_seg, kv = segment_ids, None
        else:
            k_seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, cache_index, 1)
            kv = {"k": cache["k"], "v": cache["v"]}

        if c.scans(cached=cache is not None) and not self.is_initializing():
            x, kv = _scan_blocks(c, self.variables["params"], x, positions, segment_ids, k_seg, kv, cache_index)
        else:  # unrolled (and always under init, which creates the stored layer_{i} parameters)
            policy = _REMAT_POLICY[c.remat_mode]
            block_cls = Block if policy is _NO_REMAT else nn.remat(Block, policy=policy)
            for i in range(c.n_layers):
                x = _keep_batch_sharded(x)
                x, kv = block_cls(c, name=f"layer_{i}")(x, positions, segment_ids, k_seg, kv, cache_index, i)
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
        return Output(logits=logits.astype(jnp.float32), hidden=hidden, cache=new_cache)


def unembed_fn(config: ModelConfig, params: Params):
    """``hidden [..., d] -> float32 logits [..., V]``: the LM head of ``Transformer`` as a function
    of ``params`` (tied: ``hidden·Eᵀ`` in float32, as ``nn.Embed.attend``; untied: the
    ``lm_head`` kernel in the compute dtype, as ``nn.Dense``), for callers that unembed a few
    columns at a time (``losses.chunked_logprobs``)."""
    if config.head != "lm":
        raise ValueError(f"unembed_fn: needs ModelConfig.head='lm' (got {config.head!r})")
    if config.tie_embeddings:
        embedding = params["embed"]["embedding"]
        return lambda h: jnp.dot(h.astype(jnp.float32), embedding.T).astype(jnp.float32)
    kernel, dt = params["lm_head"]["kernel"], config.compute_dtype
    return lambda h: jnp.dot(h.astype(dt), kernel.astype(dt)).astype(jnp.float32)


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
) -> Output:
    """Full forward pass.  ``tokens``, ``mask`` ``[batch, time]``; positions default to
    ``cumsum(mask) - 1`` so left padding is exact; ``segment_ids`` (packing) default to ``mask``.
    ``logits_slice=(start, stop)`` (static ints, Python slice semantics) unembeds only the columns
    ``hidden[:, start:stop]``, so ``logits`` holds those columns only; ``unembed=False`` skips the
    unembedding (``logits`` is None; see ``unembed_fn``)."""
    if positions is None:
        positions = positions_from_mask(mask)
    if segment_ids is None:
        segment_ids = mask
    return model.apply({"params": params}, tokens, positions, segment_ids, logits_slice=logits_slice, unembed=unembed)


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
