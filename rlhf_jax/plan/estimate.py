"""The plan: exact parameter and optimizer bytes from ``jax.eval_shape`` on an ``AbstractMesh``,
analytic activations, logits and KV cache (the formulas in ``rlhf_jax.plan``'s docstring)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from rlhf_jax.hf import _abstract_params
from rlhf_jax.model import ModelConfig, Transformer, flash_attention, splash_attention
from rlhf_jax.plan.compiled import compiled_memory
from rlhf_jax.plan.config import DTYPE_BYTES, PHASES, PlanConfig, optimizer_config
from rlhf_jax.plan.result import Plan, Row
from rlhf_jax.sharding import AXES, DEFAULT_RULES, partition_specs
from rlhf_jax.train.optim import make_optimizer


# ------------------------------------------------------------------------------- exact parts


def _abstract_mesh(shape: tuple[int, int, int]) -> AbstractMesh:
    return AbstractMesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _local_bytes(tree: Any, mesh: AbstractMesh, itemsize: int | None = None) -> int:
    """Per-device bytes of ``tree`` (arrays or ``ShapeDtypeStruct`` s) placed by ``DEFAULT_RULES``;
    ``itemsize`` overrides the leaves' dtypes."""
    sizes = dict(mesh.shape)
    specs = jax.tree.leaves(partition_specs(tree, DEFAULT_RULES, mesh), is_leaf=lambda x: isinstance(x, P))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), specs, strict=True):
        local = 1
        for i, dim in enumerate(leaf.shape):
            entry = spec[i] if i < len(spec) else None
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            local *= dim // math.prod(sizes[n] for n in names)
        total += local * (itemsize or jnp.dtype(leaf.dtype).itemsize)
    return total


def _fallbacks(tree: Any, mesh: AbstractMesh) -> tuple[str, ...]:
    """Paths of the leaves whose rule asks for a sharding the mesh cannot divide."""
    wanted = partition_specs(tree, DEFAULT_RULES)
    fitted = partition_specs(tree, DEFAULT_RULES, mesh)
    flat = jax.tree_util.tree_flatten_with_path(wanted, is_leaf=lambda x: isinstance(x, P))[0]
    got = jax.tree.leaves(fitted, is_leaf=lambda x: isinstance(x, P))
    return tuple(jax.tree_util.keystr(path, simple=True, separator="/")
                 for (path, w), g in zip(flat, got) if w != g)


def _abstract(config: ModelConfig) -> Any:
    """The parameters' shapes (they do not depend on the attention, and tracing cuDNN's needs a GPU)."""
    return _abstract_params(Transformer(config.replace(attention_impl="xla")))


def _count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- analytic parts


def _split(n: int, t: int) -> int:
    """The tensor-parallel factor a dimension of size ``n`` is split by (1 when ``t`` does not divide it)."""
    return t if n % t == 0 else 1


def activation_bytes(config: ModelConfig, batch: int, seq: int, tensor: int = 1, flash: bool = False) -> int:
    """Activations saved for the backward pass of ``config`` on one device's ``[batch, seq]``
    (excluding the logits: ``logits_bytes``).  Korthikanti et al. 2022 §4.1, adapted (module
    docstring); with ``config.remat`` (``remat_mode`` ``"full"``) only each layer's input plus one
    recomputed layer; with ``remat_policy="dots"`` (``dots_with_no_batch_dims_saveable``) each
    layer's input and its projections' outputs (q, k, v, o, the MLP's), not the attention's batched
    dots or anything elementwise, plus one recomputed layer.
    ``flash``: the attention is cuDNN's flash attention (``model.flash_attention``) or Pallas's
    splash attention (``model.splash_attention``), which keep their softmax statistics (float32
    ``[b, heads, s]``) instead of the ``[s, s]`` probabilities; the mask, and the ``[b, 1, s, s]``
    bias jax makes of it for cuDNN, are still counted (splash takes segment ids instead, so
    there the term is an upper bound)."""
    c, b, s = config, batch, seq
    act = jnp.dtype(c.compute_dtype).itemsize
    h, hd = c.d_model, c.head_dim
    t_heads = _split(c.kv_heads, tensor)
    t_ff = _split(c.ff_dim, tensor)
    mlp_tensors = 4 if c.arch == "llama" else 2
    if flash:  # softmax statistics per head; the mask and its bias
        attention = 4 * b * s * c.n_heads // t_heads + b * s * s * (1 + act)
    else:  # float32 softmax, its cast, the mask
        attention = b * s * s * (c.n_heads * (4 + act) // t_heads + 1)
    layer = (
        act * b * s * 4 * h  # both norms' inputs and outputs (replicated over tensor)
        + act * b * s * (2 * h + 2 * c.kv_heads * hd) // t_heads  # q, k, v, attention output
        + act * b * s * mlp_tensors * c.ff_dim // t_ff  # gate, up, silu(gate), product | fc, gelu
        + attention
    )
    outside = 2 * act * b * s * h  # the final norm's input and output
    if c.remat_mode == "full":
        return c.n_layers * act * b * s * h + layer + outside
    if c.remat_mode == "dots":  # the block's input and its matmuls' outputs; one layer rebuilt at a time
        mlp_dots = 2 if c.arch == "llama" else 1  # gate and up | fc
        kept = (act * b * s * 3 * h  # the block's input, the o and down | proj outputs
                + act * b * s * (h + 2 * c.kv_heads * hd) // t_heads  # q, k, v
                + act * b * s * mlp_dots * c.ff_dim // t_ff)
        return c.n_layers * kept + layer + outside
    return c.n_layers * layer + outside


def logits_bytes(config: ModelConfig, batch: int, seq: int, tensor: int = 1, per_entry: int = 12) -> int:
    """``[batch, seq, V / tensor]`` entries × ``per_entry`` bytes (12: float32 logits, their
    log-softmax and their gradient)."""
    return batch * seq * config.vocab_size // _split(config.vocab_size, tensor) * per_entry


def logit_steps(config: ModelConfig, seq: int) -> int:
    """The time steps whose logits a log-prob or loss over ``seq`` steps holds at once:
    ``config.logits_chunk`` when set and shorter (``losses.chunked_logprobs``), else ``seq``."""
    return min(config.logits_chunk, seq) if config.logits_chunk else seq


def kv_cache_bytes(config: ModelConfig, batch: int, length: int, tensor: int = 1) -> int:
    """Keys and values of every layer, ``[batch, length, kv_heads, head_dim]`` in the compute
    dtype, split over ``tensor`` when it divides ``kv_heads``."""
    act = jnp.dtype(config.compute_dtype).itemsize
    per_layer = 2 * batch * length * config.kv_heads * config.head_dim * act
    return config.n_layers * per_layer // _split(config.kv_heads, tensor)


# ---------------------------------------------------------------------------------- the plan


def plan(cfg: PlanConfig) -> Plan:
    """Per-device memory of ``cfg``: exact state, analytic activations, and (unless
    ``cfg.compile == "none"``) the compiler's numbers.  Allocates nothing on any device."""
    model_cfg = cfg.model_config()
    shape = cfg.mesh.shape(cfg.devices)
    mesh = _abstract_mesh(shape)
    data, fsdp, tensor = shape
    shards = data * fsdp

    tx = make_optimizer(optimizer_config(cfg))

    def trainable(tree: Any) -> tuple[int, int]:
        return _local_bytes(tree, mesh), _local_bytes(jax.eval_shape(tx.init, tree), mesh)

    lm = _abstract(model_cfg)

    def flash(seq: int) -> bool:  # a forward over ``seq`` columns keeps softmax statistics, not [s, s]
        return flash_attention(model_cfg, cfg.backend) or splash_attention(model_cfg, seq)

    rows: list[Row] = []
    if cfg.stage in ("sft", "rm", "dpo"):
        trained = _abstract(model_cfg.replace(head="scalar")) if cfg.stage == "rm" else lm
        p_bytes, o_bytes = trainable(trained)
        rows += [Row("params", "state", p_bytes, "exact", cfg.param_dtype),
                 Row("optimizer", "state", o_bytes, "exact", _opt_detail(cfg)),
                 Row("gradients", "update", p_bytes, "exact", "float32")]
        seqs = cfg.batch_size * (1 if cfg.stage == "sft" else cfg.k_responses) // shards
        fused = flash(cfg.seq_len)
        rows.append(Row("activations", "update", activation_bytes(model_cfg, seqs, cfg.seq_len, tensor, fused),
                        "analytic", f"{seqs} seq/device" + (", flash attention" if fused else "")))
        if cfg.stage != "rm":  # DPO builds its logits whole (no logits_chunk path)
            steps = logit_steps(model_cfg, cfg.seq_len) if cfg.stage == "sft" else cfg.seq_len
            rows.append(Row("logits", "update", logits_bytes(model_cfg, seqs, steps, tensor), "analytic",
                            "f32 + log-softmax + grad" + (f", {steps} steps at a time" if steps < cfg.seq_len else "")))
        if cfg.stage == "dpo":  # the frozen reference: its weights, and its logits in the same step
            rows += [Row("frozen models", "state", _local_bytes(lm, mesh, DTYPE_BYTES[cfg.frozen_dtype]),
                         "exact", f"ref, {cfg.frozen_dtype}"),
                     Row("logits (reference)", "update",
                         logits_bytes(model_cfg, seqs, cfg.seq_len, tensor, per_entry=8),
                         "analytic", "f32 + log-softmax, no grad")]
        fallbacks = _fallbacks(trained, mesh)
    else:
        rows += _rl_rows(cfg, model_cfg, lm, mesh, trainable, shards, tensor, flash)
        fallbacks = _fallbacks(lm, mesh)
    if fsdp > 1:
        layer = _local_bytes(lm["layer_0"], _abstract_mesh((1, 1, tensor)))
        rows.append(Row("gathered weights", "update", 2 * layer, "analytic", "fsdp: 1 layer + grad"))
    rows.sort(key=lambda r: PHASES.index(r.phase))
    result = Plan(cfg, model_cfg, shape, _count(lm), tuple(rows), fallbacks)
    if cfg.compile != "none":
        result = dataclasses.replace(result, compiled=compiled_memory(cfg))
    return result


def _rl_rows(cfg: PlanConfig, model_cfg: ModelConfig, lm: Any, mesh: AbstractMesh,
             trainable: Any, shards: int, tensor: int, flash: Callable[[int], bool]) -> list[Row]:
    """PPO's and GRPO's rows: the policy (and PPO's value model) trained on minibatches of the
    rollouts, frozen reference (and reward model, unless ``reward_model`` is false) in
    ``frozen_dtype``, the policy's EMA (``ema``), the rollout's KV cache and the scoring logits.  GRPO is PPO
    without the value model on ``batch_size × group_size`` rollouts.  ``flash(seq)``: whether a
    forward over ``seq`` columns runs flash attention (``plan``'s rule)."""
    ppo = cfg.stage == "ppo"
    value = _abstract(model_cfg.replace(head="scalar"))
    lm_bytes, lm_opt = trainable(lm)
    v_bytes, v_opt = trainable(value) if ppo else (0, 0)
    frozen_size = DTYPE_BYTES[cfg.frozen_dtype]
    frozen = _local_bytes(lm, mesh, frozen_size) + (_local_bytes(value, mesh, frozen_size) if cfg.reward_model else 0)
    length = cfg.prompt_len + cfg.max_new_tokens
    episodes = cfg.batch_size * (1 if ppo else cfg.group_size)
    mb = episodes // cfg.ppo_minibatches // shards
    ptx = cfg.ptx_batch_size // shards
    fused = flash(length)
    policy_act = activation_bytes(model_cfg, mb, length, tensor, fused)
    policy_logits = logits_bytes(model_cfg, mb, logit_steps(model_cfg, length), tensor)
    if ptx:
        policy_act += activation_bytes(model_cfg, ptx, cfg.seq_len, tensor, flash(cfg.seq_len))
        policy_logits += logits_bytes(model_cfg, ptx, logit_steps(model_cfg, cfg.seq_len), tensor)
    value_act = activation_bytes(model_cfg.replace(head="scalar"), mb, length, tensor, fused) if ppo else 0
    rollouts = episodes // shards
    if model_cfg.logits_chunk:  # the response's log-probs and entropy, a chunk at a time
        scoring = logits_bytes(model_cfg, rollouts, logit_steps(model_cfg, cfg.max_new_tokens), tensor)
    else:  # the whole sequence's logits, the response's log-softmax and entropy terms
        scoring = (logits_bytes(model_cfg, rollouts, length, tensor, per_entry=4)
                   + logits_bytes(model_cfg, rollouts, cfg.max_new_tokens, tensor, per_entry=8))
    trained = "policy + value" if ppo else "policy"
    rows = [
        Row("params", "state", lm_bytes + v_bytes, "exact", f"{trained}, {cfg.param_dtype}"),
        Row("optimizer", "state", lm_opt + v_opt, "exact", _opt_detail(cfg)),
        Row("frozen models", "state", frozen, "exact",
            f"ref{' + reward' if cfg.reward_model else ''}, {cfg.frozen_dtype}"),
        Row("gradients", "update", lm_bytes + v_bytes, "exact", "float32"),
        Row("activations", "update", policy_act + value_act, "analytic",
            f"{trained}, {mb}{f' + {ptx} ptx' if ptx else ''} seq/device" + (", flash attention" if fused else "")),
        Row("logits", "update", policy_logits, "analytic",
            "f32 + log-softmax + grad" + (f", {model_cfg.logits_chunk} steps at a time" if model_cfg.logits_chunk
                                          else "")),
        Row("KV cache", "rollout", kv_cache_bytes(model_cfg, rollouts, length, tensor), "analytic",
            f"{rollouts} seq/device × {length}"),
        Row("logits (scoring)", "experience", scoring, "analytic", f"{rollouts} seq/device"),
    ]
    if cfg.ema:
        rows.insert(3, Row("EMA weights", "state", lm_bytes, "exact", f"policy, {cfg.param_dtype}"))
    return rows


def _opt_detail(cfg: PlanConfig) -> str:
    return "AdamW mu, nu f32" + (" + accumulator" if cfg.grad_accum_steps > 1 else "")
