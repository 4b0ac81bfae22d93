"""Hugging Face ``config.json`` <-> ``ModelConfig``: ``config_from_hf``, ``config_to_hf``,
``hf_model_type``, ``read_config``.

Supported ``model_type``: ``gpt2``; ``llama`` (with ``linear``/``llama3``/``yarn`` RoPE scaling),
``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms), ``gemma2`` and ``gemma3_text`` as
our ``arch="llama"`` with its family switches (docs/families.md), sliding windows included.
A scalar head that pools by averaging (``ModelConfig.score_pooling="mean"``) is marked by the
``config.json`` field ``rlhf_jax_score_pooling``; ``transformers`` keeps the field but reads the
last token's value whatever it says.  The weights are ``rlhf_jax.hf``'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rlhf_jax.model_config import SCORE_POOLINGS, ModelConfig
from rlhf_jax.rope import ROPE_TYPES, RopeScaling

CONFIG_FILE = "config.json"
POOLING_FIELD = "rlhf_jax_score_pooling"

_LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
_GEMMA_TYPES = ("gemma2", "gemma3_text")
# model_type -> the class-name prefixes of its causal LM and sequence classifier.
_CLASSES = {"llama": ("Llama", "Llama"), "mistral": ("Mistral", "Mistral"), "qwen2": ("Qwen2", "Qwen2"),
            "qwen3": ("Qwen3", "Qwen3"), "gemma2": ("Gemma2", "Gemma2"), "gemma3_text": ("Gemma3", "Gemma3Text")}
# RopeScaling field -> its transformers rope_parameters key.
_ROPE_KEYS = {"factor": "factor", "original_max_len": "original_max_position_embeddings",
              "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
              "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
              "mscale": "mscale", "mscale_all_dim": "mscale_all_dim", "truncate": "truncate"}
_GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both the tanh approximation of GELU


def config_from_hf(
    hf: Mapping[str, Any],
    *,
    dtype: str = "float32",
    head: str = "lm",
    source: str | os.PathLike = CONFIG_FILE,
) -> ModelConfig:
    """``ModelConfig`` from a ``transformers`` ``config.json`` dict.

    The family switches (docs/families.md) are read with ``transformers``' own defaults for
    absent fields.  Settings our model does not implement (RoPE types other than ``linear``,
    ``llama3`` and ``yarn``, partial rotary dims, other activations, o_proj/MLP biases,
    bidirectional attention) raise a ``ValueError`` naming ``source`` and the field rather than
    loading a silently different model.
    """

    def field(name: str, default: Any = ...) -> Any:
        if name in hf and hf[name] is not None:
            return hf[name]
        if default is ...:
            raise ValueError(f"{source}: required field {name!r} is missing")
        return default

    def reject(name: str, why: str) -> None:
        raise ValueError(f"{source}: field {name!r} = {hf.get(name)!r} is not supported ({why})")

    pooling = field(POOLING_FIELD, "last") if head == "scalar" else "last"
    if pooling not in SCORE_POOLINGS:
        reject(POOLING_FIELD, f"allowed: {', '.join(SCORE_POOLINGS)}")
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        if field("activation_function", "gelu_new") not in _GPT2_ACTIVATIONS:
            reject("activation_function", f"allowed: {', '.join(_GPT2_ACTIVATIONS)}")
        if not field("scale_attn_weights", True):
            reject("scale_attn_weights", "attention is always scaled by 1/sqrt(head_dim)")
        if field("scale_attn_by_inverse_layer_idx", False):
            reject("scale_attn_by_inverse_layer_idx", "must be false")
        if field("add_cross_attention", False):
            reject("add_cross_attention", "decoder-only models only")
        return ModelConfig(
            arch="gpt2",
            vocab_size=field("vocab_size"),
            d_model=field("n_embd"),
            n_layers=field("n_layer"),
            n_heads=field("n_head"),
            d_ff=field("n_inner", None),
            max_len=field("n_positions"),
            norm_eps=float(field("layer_norm_epsilon", 1e-5)),
            tie_embeddings=bool(field("tie_word_embeddings", True)),
            head=head,
            score_pooling=pooling,
            dtype=dtype,
        )
    if model_type not in _LLAMA_TYPES:
        raise ValueError(
            f"{source}: field 'model_type' = {model_type!r} is not supported "
            f"(allowed: gpt2, {', '.join(_LLAMA_TYPES)})"
        )
    gemma = model_type in _GEMMA_TYPES
    if gemma:
        if field("hidden_activation", field("hidden_act", "gelu_pytorch_tanh")) != "gelu_pytorch_tanh":
            reject("hidden_activation", "Gemma's GeGLU uses 'gelu_pytorch_tanh'")
    elif field("hidden_act", "silu") != "silu":
        reject("hidden_act", "SwiGLU uses 'silu'")
    d_model, n_heads = field("hidden_size"), field("num_attention_heads")
    n_layers, max_len = field("num_hidden_layers"), field("max_position_embeddings")
    head_dim = field("head_dim", d_model // n_heads)
    if field("mlp_bias", False):
        reject("mlp_bias", "must be false")
    if model_type != "qwen2" and field("attention_bias", False):
        reject("attention_bias", "it also biases o_proj; must be false")
    if field("use_bidirectional_attention", False):
        reject("use_bidirectional_attention", "decoder-only (causal) models only")
    window, layer_types = _windows_from_hf(hf, model_type, n_layers, field)
    if model_type == "gemma3_text":
        (theta, scaling), (local_theta, local_scaling) = (
            _rope_from_hf(hf, source, kind) for kind in ("full_attention", "sliding_attention"))
        if local_scaling is not None:
            reject("rope_parameters", "the sliding_attention layers' RoPE must be the default type")
    else:
        (theta, scaling), local_theta = _rope_from_hf(hf, source, None), None
    softcaps = {"gemma2": (50.0, 30.0), "gemma3_text": (None, None)}.get(model_type, (None, None))
    return ModelConfig(
        arch="llama",
        vocab_size=field("vocab_size"),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=field("num_key_value_heads", n_heads),
        d_ff=field("intermediate_size"),
        max_len=max_len,
        norm_eps=float(field("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        tie_embeddings=bool(field("tie_word_embeddings", gemma)),
        qkv_bias=model_type == "qwen2",
        head=head,
        score_pooling=pooling,
        dtype=dtype,
        d_head=None if head_dim * n_heads == d_model else head_dim,
        rope_scaling=scaling,
        rope_local_theta=None if local_theta is None else float(local_theta),
        sliding_window=window,
        layer_types=layer_types,
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        activation="gelu_tanh" if gemma else "silu",
        norm_plus_one=gemma,
        embed_scale=gemma,
        post_norms=gemma,
        attn_softcap=hf.get("attn_logit_softcapping", softcaps[0]) if gemma else None,
        final_softcap=hf.get("final_logit_softcapping", softcaps[1]) if gemma else None,
        query_pre_attn_scalar=float(field("query_pre_attn_scalar", 256)) if gemma else None,
    )


def _windows_from_hf(hf: Mapping[str, Any], model_type: str, n_layers: int,
                     field: Callable[..., Any]) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` as ``transformers`` derives them: Mistral slides every
    layer; Qwen2/3 only with ``use_sliding_window``, the layers from ``max_window_layers`` on;
    Gemma 2 every other layer from the first; Gemma 3 all but every ``sliding_window_pattern``-th
    (6).  An explicit ``layer_types`` wins.  ``layer_types`` is None when every layer slides."""
    if model_type == "llama":
        return None, None
    if model_type in ("qwen2", "qwen3") and not field("use_sliding_window", False):
        return None, None
    window = field("sliding_window", None)
    if window is None:
        return None, None
    if model_type == "mistral":  # transformers ignores layer_types for Mistral
        return int(window), None
    if field("layer_types", None) is not None:
        types = tuple(field("layer_types"))
    elif model_type in ("qwen2", "qwen3"):
        first = field("max_window_layers", 28)
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(n_layers))
    elif model_type == "gemma2":
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers))
    else:
        pattern = field("sliding_window_pattern", 6)
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))
    if "sliding_attention" not in types:
        return None, None
    return int(window), None if set(types) == {"sliding_attention"} else types


def _rope_from_hf(hf: Mapping[str, Any], source: Any, layer_type: str | None) -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` from ``rope_parameters`` (transformers 5; Gemma 3's nested by layer
    type) or ``rope_theta`` + ``rope_scaling`` (transformers 4; Gemma 3's local base in
    ``rope_local_base_freq``).  An unimplemented ``rope_type`` is refused by name."""
    gemma3 = layer_type is not None
    default_theta = {None: 10000.0, "full_attention": 1e6, "sliding_attention": 10000.0}[layer_type]
    theta_key = "rope_local_base_freq" if layer_type == "sliding_attention" else "rope_theta"
    theta = hf.get(theta_key) if hf.get(theta_key) is not None else default_theta
    name, params = "rope_parameters", hf.get("rope_parameters")
    if gemma3 and isinstance(params, Mapping) and layer_type in params:
        name, params = f"rope_parameters.{layer_type}", params[layer_type]
    elif gemma3 and isinstance(params, Mapping) and set(params) & {"full_attention", "sliding_attention"}:
        params = None
    if not params and layer_type != "sliding_attention":
        name, params = "rope_scaling", hf.get("rope_scaling")
    if not params:
        return theta, None
    if not isinstance(params, Mapping):
        raise ValueError(f"{source}: field {name!r} = {params!r} is not supported (expected a dict)")
    params = dict(params)
    theta = params.pop("rope_theta", theta)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("type", None)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: field {name!r}: partial_rotary_factor must be 1")
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{source}: field {name!r}: rope_type {rope_type!r} is not supported "
                         f"(supported: default, {', '.join(ROPE_TYPES)})")
    by_hf = {v: k for k, v in _ROPE_KEYS.items()}
    unknown = sorted(set(params) - set(by_hf))
    if unknown:
        raise ValueError(f"{source}: field {name!r}: keys {unknown} are not supported for rope_type {rope_type!r}")
    try:
        return theta, RopeScaling(rope_type, **{by_hf[k]: v for k, v in params.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: field {name!r}: {e}") from None


def hf_model_type(config: ModelConfig) -> str:
    """The ``transformers`` ``model_type`` whose architecture is ``config``'s switches: Gemma 2 / 3
    (the Gemma switches; 3 with q/k norms), Qwen3 (q/k norms), Qwen2 (q/k/v biases), Mistral (a
    window on every layer), else Llama.  Raises ``ValueError`` naming the switch that family
    cannot express."""
    c = config
    if c.arch == "gpt2":
        return "gpt2"
    gemma = {"norm_plus_one": c.norm_plus_one, "embed_scale": c.embed_scale, "post_norms": c.post_norms,
             "activation": c.activation == "gelu_tanh"}
    if any(gemma.values()):
        model_type = "gemma3_text" if c.qk_norm else "gemma2"
        unset = [name for name, on in gemma.items() if not on]
        conflicts = unset + ["qkv_bias"] * c.qkv_bias + ["rope_local_theta"] * (
            model_type == "gemma2" and c.rope_local_theta is not None)
        if model_type == "gemma3_text" and c.rope_local_theta is None and c.rope_scaling is not None:
            conflicts.append("rope_local_theta")  # Gemma 3's sliding layers never scale RoPE
    else:
        model_type = ("qwen3" if c.qk_norm else "qwen2" if c.qkv_bias
                      else "mistral" if c.sliding_window is not None and c.layer_types is None else "llama")
        conflicts = [f for f in ("attn_softcap", "final_softcap", "query_pre_attn_scalar", "rope_local_theta")
                     if getattr(c, f) is not None]
        if model_type == "qwen3" and c.qkv_bias:
            conflicts.append("qkv_bias")
        if model_type == "llama" and c.sliding_window is not None:
            conflicts.append("layer_types")  # per-layer windows without biases or q/k norms
    if conflicts:
        raise ValueError(f"ModelConfig: no transformers model_type has this architecture ({model_type} "
                         f"but for {', '.join(conflicts)})")
    return model_type


def _int_if_whole(x: float) -> float | int:
    """transformers' strict Gemma configs type ``query_pre_attn_scalar`` as an int."""
    return int(x) if float(x).is_integer() else x


def _rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": "default" if scaling is None else scaling.rope_type, "rope_theta": theta}
    if scaling is not None:
        out.update({hf_key: getattr(scaling, ours) for ours, hf_key in _ROPE_KEYS.items()
                    if getattr(scaling, ours) is not None})
    return out


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``transformers`` ``config.json`` dict for ``config`` (``model_type`` from
    ``hf_model_type``); a scalar-head model is a ``...ForSequenceClassification`` with
    ``num_labels=1``."""
    c = config
    model_type = hf_model_type(c)
    if c.arch == "gpt2":
        prefix = seq_prefix = "GPT2"
        hf: dict[str, Any] = {
            "vocab_size": c.vocab_size,
            "n_embd": c.d_model,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_inner": c.d_ff,
            "n_positions": c.max_len,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
        }
    else:
        prefix, seq_prefix = _CLASSES[model_type]
        hf = {
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_dim,
            "intermediate_size": c.ff_dim,
            "max_position_embeddings": c.max_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,  # transformers 4 reads this, 5 reads rope_parameters
            "rope_parameters": _rope_to_hf(c.rope_theta, c.rope_scaling),
            "attention_bias": c.qkv_bias,
            "mlp_bias": False,
        }
        windows = c.layer_windows
        layer_types = [("sliding_attention" if w else "full_attention") for w in windows or (0,) * c.n_layers]
        if model_type in _GEMMA_TYPES:
            hf.update(hidden_activation="gelu_pytorch_tanh", layer_types=layer_types,
                      sliding_window=c.sliding_window or c.max_len,  # unused when no layer slides
                      attn_logit_softcapping=c.attn_softcap, final_logit_softcapping=c.final_softcap,
                      query_pre_attn_scalar=_int_if_whole(c.query_pre_attn_scalar or c.head_dim))
            if model_type == "gemma3_text":
                local = c.rope_theta if c.rope_local_theta is None else c.rope_local_theta
                hf.update(use_bidirectional_attention=False, rope_local_base_freq=local, rope_parameters={
                    "full_attention": _rope_to_hf(c.rope_theta, c.rope_scaling),
                    "sliding_attention": _rope_to_hf(local, None)})
        else:
            hf["hidden_act"] = "silu"
            if model_type in ("qwen2", "qwen3"):
                hf.update(use_sliding_window=windows is not None, sliding_window=c.sliding_window,
                          layer_types=layer_types, max_window_layers=c.n_layers)
            elif model_type == "mistral":
                hf["sliding_window"] = c.sliding_window
    if c.head == "scalar":
        hf.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if c.score_pooling != "last":
            hf[POOLING_FIELD] = c.score_pooling
        arch_name = f"{seq_prefix}ForSequenceClassification"
    else:
        arch_name = f"{prefix}LMHeadModel" if c.arch == "gpt2" else f"{prefix}ForCausalLM"
    return {
        "architectures": [arch_name],
        "model_type": model_type,
        "tie_word_embeddings": c.tie_embeddings,
        "dtype": "float32",
        "torch_dtype": "float32",
        **hf,
    }


def read_config(path: str | os.PathLike, *, dtype: str = "float32", head: str = "lm") -> ModelConfig:
    """The ``ModelConfig`` of the Hugging Face directory ``path`` (its ``config.json``, through
    ``config_from_hf``), without reading weights.  ``FileNotFoundError`` / ``ValueError`` name the
    file."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from e
    return config_from_hf(hf, dtype=dtype, head=head, source=config_file)
