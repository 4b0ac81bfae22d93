"""Hugging Face format import/export: ``config.json`` + safetensors <-> ``(Transformer, params)``.

Supported ``model_type``: ``gpt2``; ``llama`` (with ``linear``/``llama3``/``yarn`` RoPE scaling),
``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k norms), ``gemma2`` and ``gemma3_text`` as
our ``arch="llama"`` with its family switches (docs/families.md), sliding windows included.
Never touches the network: ``path`` is a local directory.

Tensor names (``transformers`` state dicts, the base-model prefix ``transformer.``/``model.`` is
optional on import)::

    GPT-2  transformer.wte/wpe, h.{i}.ln_1, h.{i}.attn.c_attn (fused q|k|v, Conv1D [in, out]),
           h.{i}.attn.c_proj, h.{i}.ln_2, h.{i}.mlp.c_fc, h.{i}.mlp.c_proj, ln_f
    Llama  model.embed_tokens, layers.{i}.input_layernorm, layers.{i}.self_attn.{q,k,v,o}_proj
           (nn.Linear [out, in], so transposed to our [in, out] kernels), post_attention_layernorm,
           layers.{i}.mlp.{gate,up,down}_proj, norm; Qwen3 / Gemma 3 also self_attn.{q,k}_norm
    Gemma  as Llama, but post_attention_layernorm is the norm *after* attention, and
           pre_feedforward_layernorm / post_feedforward_layernorm surround the MLP
    heads  lm_head.weight [V, d] (untied LM), score.weight [1, d] (``...ForSequenceClassification``
           with ``num_labels=1``; the scalar head of reward and value models, InstructGPT §3.5)

``transformers`` has no slot for the scalar head's bias, so ``save_pretrained`` writes it to the
side file ``rlhf_jax.json`` (``{"score_bias": [b]}``) and ``load_pretrained`` reads it back; a
``transformers`` model loaded from the directory computes our values minus that constant.
A scalar head that pools by averaging (``ModelConfig.score_pooling="mean"``) is marked by the
``config.json`` field ``rlhf_jax_score_pooling``; ``transformers`` keeps the field but reads the
last token's value whatever it says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rlhf_jax.model import SCORE_POOLINGS, ModelConfig, Params, Transformer, init_params
from rlhf_jax.rope import ROPE_TYPES, RopeScaling

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SIDE_FILE = "rlhf_jax.json"
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
# Buffers some checkpoints carry that hold no learned weights: GPT-2's causal masks, RoPE tables.
_HARMLESS = re.compile(r"(^|\.)(attn\.(masked_)?bias|crossattention\.(masked_)?bias|rotary_emb\.inv_freq)$")


# --------------------------------------------------------------------------------------- config


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


# ------------------------------------------------------------------------------------ name map


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One ``transformers`` tensor and the param(s) it holds: ``ours`` is one path, or three
    (q, k, v) concatenated along the last axis (GPT-2's fused ``c_attn``); ``transpose`` for
    ``nn.Linear`` ``[out, in]`` weights."""

    hf: str
    ours: tuple[tuple[str, ...], ...]
    transpose: bool = False


def _entries(c: ModelConfig) -> list[_Entry]:
    """The full name map for ``c``: backbone, then the LM or scalar head."""
    E = _Entry
    out: list[_Entry] = []
    if c.arch == "gpt2":
        p = "transformer."
        out += [E(p + "wte.weight", (("embed", "embedding"),)),
                E(p + "wpe.weight", (("pos_embed", "embedding"),))]
        for i in range(c.n_layers):
            h, L = f"{p}h.{i}.", f"layer_{i}"
            for hf_mod, ours in (("ln_1", (L, "attn_norm")), ("attn.c_proj", (L, "attn", "o")),
                                 ("ln_2", (L, "mlp_norm")), ("mlp.c_fc", (L, "mlp", "fc")),
                                 ("mlp.c_proj", (L, "mlp", "proj"))):
                is_norm = hf_mod.startswith("ln")
                out += [E(f"{h}{hf_mod}.weight", (ours + ("scale" if is_norm else "kernel",),)),
                        E(f"{h}{hf_mod}.bias", (ours + ("bias",),))]
            for leaf in ("kernel", "bias"):
                out.append(E(f"{h}attn.c_attn.{'weight' if leaf == 'kernel' else 'bias'}",
                             tuple((L, "attn", n, leaf) for n in "qkv")))
        out += [E(p + "ln_f.weight", (("final_norm", "scale"),)),
                E(p + "ln_f.bias", (("final_norm", "bias"),))]
    else:
        p = "model."
        out.append(E(p + "embed_tokens.weight", (("embed", "embedding"),)))
        # Gemma's post_attention_layernorm follows the attention; Llama's precedes the MLP.
        norms = ((("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attn_norm"),
                  ("pre_feedforward_layernorm", "mlp_norm"), ("post_feedforward_layernorm", "post_mlp_norm"))
                 if c.post_norms else (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")))
        for i in range(c.n_layers):
            h, L = f"{p}layers.{i}.", f"layer_{i}"
            out += [E(f"{h}{theirs}.weight", ((L, ours, "scale"),)) for theirs, ours in norms]
            if c.qk_norm:
                out += [E(f"{h}self_attn.{n}_norm.weight", ((L, "attn", f"{n}_norm", "scale"),)) for n in "qk"]
            for n in "qkvo":
                out.append(E(f"{h}self_attn.{n}_proj.weight", ((L, "attn", n, "kernel"),), True))
                if c.qkv_bias and n != "o":
                    out.append(E(f"{h}self_attn.{n}_proj.bias", ((L, "attn", n, "bias"),)))
            for n in ("gate", "up", "down"):
                out.append(E(f"{h}mlp.{n}_proj.weight", ((L, "mlp", n, "kernel"),), True))
        out.append(E(p + "norm.weight", (("final_norm", "scale"),)))
    if c.head == "scalar":
        out.append(E("score.weight", (("score_head", "kernel"),), True))
    elif not c.tie_embeddings:
        out.append(E("lm_head.weight", (("lm_head", "kernel"),), True))
    return out


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _hf_shape(entry: _Entry, abstract: Params) -> tuple[int, ...]:
    shapes = [tuple(_get(abstract, p).shape) for p in entry.ours]
    shape = shapes[0][:-1] + (sum(s[-1] for s in shapes),)
    return shape[::-1] if entry.transpose else shape


def _abstract_params(model: Transformer) -> Params:
    return jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(0))


# --------------------------------------------------------------------------------------- import


def _open_safetensors(file: Path) -> Any:
    """``safe_open(file, "numpy")``; a truncated or corrupt file is a ValueError naming it."""
    try:
        return safe_open(file, "numpy")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a valid safetensors file ({e})") from e


class _TensorFiles:
    """Tensor name -> file for one checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: Path):
        self.dir = path
        single, index = path / WEIGHTS_FILE, path / INDEX_FILE
        if single.is_file():
            self.index_file = None
            with _open_safetensors(single) as f:
                self.where = {name: single for name in f.keys()}
        elif index.is_file():
            self.index_file = index
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
            self.where = {name: path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(self.where.values())):
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard}: shard named in {index} does not exist")
        else:
            raise FileNotFoundError(f"{single}: no such file (nor {INDEX_FILE}) in {path}")
        self._open: dict[Path, Any] = {}

    def file_for(self, name: str) -> Path:
        """Where a missing tensor should have been: its shard, else the index, else the single file."""
        return self.where.get(name) or self.index_file or self.dir / WEIGHTS_FILE

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        file = self.where[name]
        if file not in self._open:
            self._open[file] = _open_safetensors(file)
        handle = self._open[file]
        actual = tuple(handle.get_slice(name).get_shape())
        if actual != shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {actual}, expected {shape}")
        return np.asarray(handle.get_tensor(name), dtype=np.float32)


def _read_params(
    files: _TensorFiles, config: ModelConfig, abstract: Params, skip: Callable[[str], bool]
) -> Params:
    """Reads every tensor of ``_entries(config)`` for which ``skip(hf_name)`` is false."""
    params: Params = {}
    used: set[str] = set()
    for entry in _entries(config):
        if skip(entry.hf):
            continue
        name = entry.hf
        if name not in files.where:
            stripped = name.split(".", 1)[1] if name.startswith(("transformer.", "model.")) else name
            name = stripped if stripped in files.where else name
        shape = _hf_shape(entry, abstract)
        if name not in files.where:
            raise ValueError(f"{files.file_for(name)}: tensor {name!r} is missing (expected shape {shape})")
        arr = files.read(name, shape)
        used.add(name)
        if entry.transpose:
            arr = arr.T
        sizes = np.cumsum([_get(abstract, p).shape[-1] for p in entry.ours])[:-1]
        for path, part in zip(entry.ours, np.split(arr, sizes, axis=-1)):
            _put(params, path, jnp.asarray(part))
    ignorable = {"lm_head.weight"} if config.head == "scalar" or config.tie_embeddings else set()
    extra = sorted(n for n in files.where if n not in used and n not in ignorable and not _HARMLESS.search(n))
    if extra:
        shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ValueError(f"{files.file_for(extra[0])}: unexpected tensors {shown} for {config.arch} "
                         f"with head={config.head!r}")
    return params


def _read_score_bias(file: Path) -> np.ndarray:
    try:
        bias = np.asarray(json.loads(file.read_text())["score_bias"], np.float32)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: expected {{\"score_bias\": [float]}} ({e!r})") from e
    if bias.shape != (1,):
        raise ValueError(f"{file}: 'score_bias' has shape {bias.shape}, expected (1,)")
    return bias


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


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    head: str = "lm",
    key: jax.Array | None = None,
) -> tuple[Transformer, Params]:
    """Loads a ``transformers`` checkpoint directory: ``config.json`` plus ``model.safetensors``
    or ``model.safetensors.index.json`` and its shards.

    ``dtype`` is the compute dtype (``ModelConfig.dtype``); parameters are always float32 (any
    stored float dtype is upcast).  ``head="scalar"`` builds a reward/value model: the backbone's
    weights, plus the checkpoint's ``score.weight`` (and our ``rlhf_jax.json`` bias) when it has
    one, else a fresh score head initialised from ``key`` exactly as ``init_params`` does (an LM
    checkpoint's ``lm_head.weight`` is then dropped; InstructGPT §3.5 starts the RM from the SFT
    model with its unembedding replaced by a scalar projection).

    Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` naming the file and the
    field or tensor (with expected and actual shapes) for anything unsupported or malformed.
    """
    path = Path(path)
    config = read_config(path, dtype=dtype, head=head)
    model = Transformer(config)
    abstract = _abstract_params(model)
    files = _TensorFiles(path)

    has_score = "score.weight" in files.where
    params = _read_params(files, config, abstract, skip=lambda n: n == "score.weight" and not has_score)
    if head == "scalar":
        if has_score:
            bias = np.zeros((1,), np.float32)
            if (path / SIDE_FILE).is_file():
                bias = _read_score_bias(path / SIDE_FILE)
            params["score_head"]["bias"] = jnp.asarray(bias)
        else:
            if key is None:
                raise ValueError(f"{path}: no 'score.weight' to load for head='scalar'; pass key= "
                                 "to initialise a fresh score head")
            # Under jit, everything but the score head's initialisation is dead code.
            params["score_head"] = jax.jit(lambda k: init_params(model, k)["score_head"])(key)
    return model, params


# --------------------------------------------------------------------------------------- export


def _check_params(model: Transformer, params: Params) -> None:
    """``params`` has every leaf of ``model``'s tree with the right shape."""
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(model))[0]:
        path = tuple(k.key for k in key_path)
        try:
            shape = tuple(np.shape(_get(params, path)))
        except (KeyError, TypeError):
            raise ValueError(f"params: no {'/'.join(path)} (needed by head={model.config.head!r}, "
                             f"arch={model.config.arch!r})") from None
        if shape != tuple(leaf.shape):
            raise ValueError(f"params: {'/'.join(path)} has shape {shape}, expected {tuple(leaf.shape)}")


def _to_hf_tensors(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    tensors = {}
    for entry in _entries(config):
        arr = np.concatenate([np.asarray(_get(params, p), np.float32) for p in entry.ours], axis=-1)
        tensors[entry.hf] = np.ascontiguousarray(arr.T if entry.transpose else arr)
    return tensors


def _shards(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    """Greedy split in name order; a tensor larger than ``limit`` gets a shard of its own."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    return shards


def save_pretrained(
    model: Transformer,
    params: Params,
    path: str | os.PathLike,
    *,
    shard_size_bytes: int | None = None,
    tokenizer: Any = None,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Writes ``path/config.json`` and float32 safetensors that ``transformers``'
    ``AutoModelForCausalLM.from_pretrained(path)`` (scalar head:
    ``AutoModelForSequenceClassification``) loads.  Returns ``path``.

    ``shard_size_bytes``: split the weights into ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``.  ``tokenizer``: anything with ``.save(directory)`` (our
    ``Tokenizer``); its ``bos_id``/``eos_id``/``pad_id``, when present and inside the model's
    vocabulary, go into ``config.json``.  ``extra_config``: more ``config.json`` fields, applied last.
    The scalar head's bias goes into the side file ``rlhf_jax.json`` (module docstring).
    """
    config = model.config
    if shard_size_bytes is not None and shard_size_bytes < 1:
        raise ValueError(f"shard_size_bytes must be a positive int (got {shard_size_bytes!r})")
    _check_params(model, params)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(config)
    if tokenizer is not None:
        tokenizer.save(path)
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_id", None)
            if token_id is not None and 0 <= token_id < config.vocab_size:
                hf[f"{name}_token_id"] = int(token_id)
    hf.update(extra_config or {})
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    for stale in [path / WEIGHTS_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)  # a previous save here would shadow or mix with this one
    tensors = _to_hf_tensors(config, params)
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if shard_size_bytes is None:
        save_file(tensors, path / WEIGHTS_FILE, metadata=metadata)
    else:
        shards = _shards(tensors, shard_size_bytes)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / name, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
                 "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    if config.head == "scalar":
        bias = np.asarray(params["score_head"]["bias"], np.float32).tolist()
        (path / SIDE_FILE).write_text(json.dumps({"score_bias": bias}) + "\n")
    return path
