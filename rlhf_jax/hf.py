"""Hugging Face format import/export: ``config.json`` + safetensors <-> ``(Transformer, params)``.

The model types supported and ``config.json`` itself are ``rlhf_jax.hf_config``'s; this module
holds the tensor name map and the safetensors I/O.  Never touches the network: ``path`` is a
local directory.

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

from rlhf_jax.hf_config import CONFIG_FILE, config_to_hf, read_config
from rlhf_jax.model import ModelConfig, Params, Transformer, init_params

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SIDE_FILE = "rlhf_jax.json"
# Buffers some checkpoints carry that hold no learned weights: GPT-2's causal masks, RoPE tables.
_HARMLESS = re.compile(r"(^|\.)(attn\.(masked_)?bias|crossattention\.(masked_)?bias|rotary_emb\.inv_freq)$")


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
