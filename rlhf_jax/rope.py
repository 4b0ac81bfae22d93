"""Rotary position embeddings (RoPE) and their context-extension variants.

The inverse frequencies of each variant transcribe ``transformers``' ``ROPE_INIT_FUNCTIONS``
(``modeling_rope_utils.py``, transformers 5) in float32 NumPy; they are constants of the model
config, computed once at trace time:

- ``default``: ``inv_freq_i = theta^(-2i/d)``, ``i < d/2`` (Su et al. 2021).
- ``linear``: ``inv_freq / factor`` (position interpolation, Chen et al. 2023).
- ``llama3``: Llama 3.1's band-wise rule: wavelengths above ``original_max / low_freq_factor``
  divided by ``factor``, below ``original_max / high_freq_factor`` kept, a linear blend between.
- ``yarn``: NTK-by-parts (Peng et al. 2023, eq. 19-21): a ramp between interpolation and
  extrapolation over the dimensions ``[low, high]`` given by ``beta_fast``/``beta_slow``, and the
  attention factor ``0.1·ln(factor) + 1`` (or ``mscale``/``mscale_all_dim``'s ratio, or an explicit
  ``attention_factor``) that multiplies cos and sin, so the logits by its square.

Pure: no I/O, no globals.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import check

ROPE_TYPES = ("linear", "llama3", "yarn")  # besides the default (no RopeScaling)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A non-default RoPE variant (``transformers``' ``rope_parameters`` less ``rope_theta``).

    ``rope_type``: one of ``ROPE_TYPES``.  ``factor``: the context-extension factor (all types;
    yarn: ``None`` means ``max_len / original_max_len``).  ``original_max_len``: the pretraining
    context (llama3, yarn; ``None``: the model's ``max_len``).  ``low_freq_factor`` /
    ``high_freq_factor``: llama3's band edges.  ``beta_fast`` / ``beta_slow`` /
    ``attention_factor`` / ``mscale`` / ``mscale_all_dim`` / ``truncate``: yarn's (``None``: the
    defaults 32, 1, inferred, unset, unset, True).
    """

    rope_type: str
    factor: float | None = None
    original_max_len: int | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        check(self.rope_type in ROPE_TYPES, self, "rope_type",
              f"one of default, {', '.join(ROPE_TYPES)} (RoPE type {self.rope_type!r} is not implemented)")
        check(self.factor is not None or self.rope_type == "yarn",
              self, "factor", f"set for rope_type {self.rope_type!r} (it is required)")
        check(self.factor is None or self.factor > 0, self, "factor", "> 0")
        if self.rope_type == "llama3":
            for f in ("low_freq_factor", "high_freq_factor"):
                check(getattr(self, f) is not None, self, f, "set for rope_type 'llama3' (it is required)")
            check(self.high_freq_factor > self.low_freq_factor,
                  self, "high_freq_factor", f"> low_freq_factor={self.low_freq_factor}")
        check(self.original_max_len is None or self.original_max_len >= 1,
              self, "original_max_len", "a positive int")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(theta: float, dim: int, scaling: RopeScaling | None, max_len: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [dim/2] float32, attention_factor)`` for a head of ``dim`` rotated dims with
    base ``theta`` (module docstring; ``transformers``' ``_compute_*_parameters``)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base = np.float32(theta) ** exponents  # float32, as torch computes it
    inv_freq = (np.float32(1.0) / base).astype(np.float32)
    if scaling is None:
        return inv_freq, 1.0
    s = scaling
    original = s.original_max_len or max_len
    if s.rope_type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32), 1.0
    if s.rope_type == "llama3":
        low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(s.factor), inv_freq)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    # yarn
    factor = s.factor if s.factor is not None else max_len / original
    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = _yarn_mscale(factor, s.mscale) / _yarn_mscale(factor, s.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast or 32), correction_dim(s.beta_slow or 1)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = 1 - ramp
    interpolation = np.float32(1.0) / (np.float32(factor) * base)
    mixed = interpolation * (1 - extrapolation) + inv_freq * extrapolation
    return mixed.astype(np.float32), float(attention)


def default_inv_freq(theta: float, dim: int) -> jax.Array:
    """The default variant's ``inv_freq [dim/2]`` computed in the graph (XLA's float32 pow), the
    form every default-RoPE model used before the variants came: its values differ from the
    float32 NumPy table of ``rope_frequencies`` by a few ulp (11 at ``dim`` 24), well inside the
    ``transformers`` parity tolerance, and keeping it keeps earlier runs' numbers bitwise."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, attention_factor: jax.Array | float = 1.0) -> jax.Array:
    """Rotary embedding in the Hugging Face "rotate half" layout.  x ``[b, t, h, d]``, positions
    ``[b, t]``, inv_freq ``[d/2]``; cos and sin are multiplied by ``attention_factor`` (yarn)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq.astype(jnp.float32)  # [b, t, d/2]
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    return (x32 * cos + jnp.concatenate([-x2, x1], axis=-1) * sin).astype(x.dtype)
