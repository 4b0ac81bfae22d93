"""``ModelConfig``: the architecture of the one decoder-only transformer (``rlhf_jax.model``),
its family switches (docs/families.md) and its execution switches.

A frozen dataclass that checks itself on construction; ``rlhf_jax.model`` re-exports everything
here.  Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import check
from rlhf_jax.rope import RopeScaling, rope_frequencies

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SCORE_POOLINGS = ("last", "mean")
REMAT_POLICIES = ("none", "dots", "full")
ATTENTION_IMPLS = ("xla", "cudnn", "auto", "splash")
ACTIVATIONS = ("silu", "gelu_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' layer_types vocabulary


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    ``arch="gpt2"``: learned positions, LayerNorm, GELU (tanh approximation) MLP, biases
    everywhere, tied embeddings.  ``arch="llama"``: RoPE, RMSNorm, SwiGLU, grouped-query
    attention (``n_kv_heads`` < ``n_heads``), no biases (``qkv_bias=True`` gives Qwen2).

    Family switches of ``arch="llama"`` (defaults: plain Llama; docs/families.md):

    - ``d_head``: the head size when it is not ``d_model / n_heads`` (Qwen3, Gemma).
    - ``rope_scaling``: a ``rope.RopeScaling`` (``linear``, ``llama3``, ``yarn``); Gemma 3 applies it
      to its global layers only.  ``rope_local_theta``: the RoPE base of the sliding-window layers
      (Gemma 3's ``rope_local_base_freq``; ``None``: ``rope_theta``, with the scaling).
    - ``sliding_window``: attend to the last ``sliding_window`` columns only; ``layer_types``
      (``"sliding_attention"`` / ``"full_attention"`` per layer) says which layers slide
      (``None``: all of them, Mistral).
    - ``qk_norm``: RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3).
    - ``activation``: the gated MLP's ``"silu"`` (SwiGLU) or ``"gelu_tanh"`` (GeGLU, Gemma).
    - ``norm_plus_one``: RMSNorm scaled by ``1 + w`` (Gemma); ``embed_scale``: embeddings times
      ``sqrt(d_model)`` in the compute dtype (Gemma); ``post_norms``: a norm after the attention
      and after the MLP too, before the residual add (Gemma 2/3).
    - ``attn_softcap`` / ``final_softcap``: ``c·tanh(x / c)`` on the attention scores / the final
      logits (Gemma 2); ``query_pre_attn_scalar``: scores scaled by its ``-1/2`` power instead of
      ``head_dim``'s (Gemma).

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
      steps) scan too.  ``False`` (the default) unrolls them, which compiles the decode body once
      per layer but lets each matmul read its layer's weights and cache in place (a scan body
      reads a dynamic slice of the stacked weights and cache, which XLA copies every step): the
      decode step was 1.8× faster unrolled on an H200 (1.1B, batch 64) and 1.4× on the CPU
      (``docs/performance.md``); full forwards and gradients stay scanned.
    - ``remat_policy``: what a block keeps for the backward pass — ``"none"`` (everything),
      ``"dots"`` (the matmul outputs, ``dots_with_no_batch_dims_saveable``; the rest is
      recomputed), ``"full"`` (only the block's input; ``remat=True`` is the old spelling of it).
    - ``attention_impl``: training / prefill attention — ``"xla"`` (our einsum with the
      segment-id mask), ``"cudnn"`` (``jax.nn.dot_product_attention`` with cuDNN flash attention:
      bf16/fp16 and GPU only, without a cache), ``"auto"`` (cuDNN where it applies, else XLA),
      ``"splash"`` (Pallas's splash attention, the TPU flash attention kernel, without a cache,
      for column counts that are multiples of 128 and no ``layer_windows``, else XLA; elsewhere
      than on a TPU it runs in Pallas's interpret mode, for checking only; ``model.splash_attention``).
      Not yet measured on a TPU, so ``"auto"`` does not pick it.
    - ``logits_chunk``: ``> 0`` computes the log-probs of chosen tokens (``sequence_logprobs``,
      the SFT and ptx losses) ``logits_chunk`` time steps at a time, so the ``[b, T, V]`` float32
      logits are never held whole (0: all at once).
    - ``cache_block``: ``> 0`` grows ``generate``'s KV cache in blocks of ``cache_block`` slots
      (``generation.cache_lengths``), so a decode step attends to the slots filled so far rounded
      up to a block instead of the whole ``prompt + new`` cache; each block compiles its own
      decode loop.  0 (the default): one cache of ``prompt + new`` slots and one loop.  The
      rollout is the same up to float rounding (the softmax sums run over fewer empty slots):
      the same tokens, log-probs within ~1e-5 (``test_generation.py``), so a sampled run drifts
      from the one-cache run as after any re-association.  With 16 the tiny benchmark's decode
      step is ~15% faster on the CPU (``docs/performance.md``); the price is compile time, one
      decode body per block, so it is off by default.

    Attention through cuDNN (``attention_impl`` ``"cudnn"``/``"auto"``) takes the window in its
    mask and ``query_pre_attn_scalar`` as its scale; with ``attn_softcap``, which
    ``jax.nn.dot_product_attention`` cannot apply, attention runs on the XLA path.
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
    scan_decode: bool = False
    remat_policy: Literal["none", "dots", "full"] = "none"
    attention_impl: Literal["xla", "cudnn", "auto", "splash"] = "xla"
    logits_chunk: int = 0
    cache_block: int = 0
    d_head: int | None = None
    rope_scaling: RopeScaling | None = None
    rope_local_theta: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False
    activation: Literal["silu", "gelu_tanh"] = "silu"
    norm_plus_one: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None

    def __post_init__(self) -> None:
        check(self.arch in ("gpt2", "llama"), self, "arch", "'gpt2' or 'llama'")
        check(self.head in ("lm", "scalar"), self, "head", "'lm' or 'scalar'")
        check(self.score_pooling in SCORE_POOLINGS, self, "score_pooling", f"one of {SCORE_POOLINGS}")
        check(self.dtype in _DTYPES, self, "dtype", f"one of {sorted(_DTYPES)}")
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
            check(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, self, f, "a positive int")
        check(self.d_head is not None or self.d_model % self.n_heads == 0,
              self, "d_model", f"divisible by n_heads={self.n_heads} (or set d_head)")
        check(self.d_head is None or (isinstance(self.d_head, int) and self.d_head >= 1),
              self, "d_head", "a positive int or None")
        check(self.kv_heads >= 1 and self.n_heads % self.kv_heads == 0,
              self, "n_kv_heads", f"a divisor of n_heads={self.n_heads}")
        check(self.arch != "llama" or self.head_dim % 2 == 0,
              self, "d_model", "such that head_dim is even (RoPE rotates pairs)")
        check(self.norm_eps > 0, self, "norm_eps", "> 0")
        for f in ("scan_layers", "scan_decode"):
            check(isinstance(getattr(self, f), bool), self, f, "a bool")
        check(self.remat_policy in REMAT_POLICIES, self, "remat_policy", f"one of {REMAT_POLICIES}")
        check(not self.remat or self.remat_policy in ("none", "full"),
              self, "remat_policy", "'none' or 'full' with remat=True (which means 'full'); set one of them")
        check(self.attention_impl in ATTENTION_IMPLS, self, "attention_impl", f"one of {ATTENTION_IMPLS}")
        check(isinstance(self.logits_chunk, int) and self.logits_chunk >= 0,
              self, "logits_chunk", "an int >= 0 (0 = off)")
        check(isinstance(self.cache_block, int) and not isinstance(self.cache_block, bool) and self.cache_block >= 0,
              self, "cache_block", "an int >= 0 (0 = off)")
        family = ("d_head", "rope_scaling", "rope_local_theta", "sliding_window", "layer_types", "qk_norm",
                  "norm_plus_one", "embed_scale", "post_norms", "attn_softcap", "final_softcap",
                  "query_pre_attn_scalar")
        if self.arch == "gpt2":
            for f in family:
                check(getattr(self, f) in (None, False), self, f, "unset with arch='gpt2' (a switch of arch='llama' only)")
        check(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling),
              self, "rope_scaling", "a rlhf_jax.rope.RopeScaling or None")
        check(self.sliding_window is None or (isinstance(self.sliding_window, int) and self.sliding_window >= 1),
              self, "sliding_window", "a positive int or None")
        if self.layer_types is not None:
            check(len(self.layer_types) == self.n_layers and set(self.layer_types) <= set(LAYER_TYPES),
                  self, "layer_types", f"n_layers={self.n_layers} items of {LAYER_TYPES}")
            check(self.sliding_window is not None or "sliding_attention" not in self.layer_types,
                  self, "layer_types", "free of sliding_attention layers while sliding_window is None")
        check(self.activation in ACTIVATIONS, self, "activation", f"one of {ACTIVATIONS}")
        for f in ("qk_norm", "norm_plus_one", "embed_scale", "post_norms"):
            check(isinstance(getattr(self, f), bool), self, f, "a bool")
        for f in ("rope_local_theta", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            check(getattr(self, f) is None or getattr(self, f) > 0, self, f, "> 0 or None")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def layer_windows(self) -> tuple[int, ...] | None:
        """Each layer's window (``0``: global attention), or ``None`` when no layer slides."""
        if self.sliding_window is None:
            return None
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)

    def rope_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer RoPE constants (``rope.rope_frequencies``): ``inv_freq`` ``[n_layers,
        head_dim/2]`` float32 and the cos/sin factor ``[n_layers]``.  Sliding layers use
        ``rope_local_theta`` unscaled when it is set."""
        windows = self.layer_windows or (0,) * self.n_layers
        kinds = {False: (self.rope_theta, self.rope_scaling)}
        if self.rope_local_theta is not None:
            kinds[True] = (self.rope_local_theta, None)
        tables = {k: rope_frequencies(theta, self.head_dim, scaling, self.max_len)
                  for k, (theta, scaling) in kinds.items()}
        rows = [tables[bool(w) and self.rope_local_theta is not None] for w in windows]
        return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows], np.float32)

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
