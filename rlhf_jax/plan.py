"""Per-device memory plan of a training stage on a target mesh, computed without allocating.

    rlhf-jax plan --config experiments/configs/plan_llama_7b_8xh100.json --set remat=true

Each row of the plan is one kind of buffer, in bytes *per device*, and says how it was obtained:

* **exact** — parameters and optimizer state: the shapes of ``jax.eval_shape(init_params)`` and
  of ``jax.eval_shape(make_optimizer(...).init)`` (AdamW: ``mu``, ``nu`` float32 like the
  parameters, plus step counts; ``optax.MultiSteps`` adds a float32 gradient accumulator), each
  leaf divided by its ``sharding.partition_specs`` on an ``AbstractMesh`` of the target's shape.
  Replicated leaves (norms, biases) and dimensions the mesh does not divide (replicated by
  ``sharding._fit``) are counted whole.  Gradients are float32 and sharded like the parameters.
* **analytic** — activations, logits and the KV cache, from shapes:

  - activations saved for the backward pass, per layer and device, following the accounting of
    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    §4.1: ``s·b·h·(34 + 5·a·s/h)`` bytes for a 16-bit GPT layer), adapted to this model: no
    dropout masks, SwiGLU (four ``[b, s, d_ff]`` tensors) or GELU (two), grouped-query K/V, and
    a float32 softmax kept beside its compute-dtype copy::

        layer = act·b·s·(4·h + (2·h + 2·kv·hd + m·d_ff) / t) + b·s²·(a·(4 + act) / t + 1)

    with ``act`` the compute dtype's bytes, ``b`` the per-device batch (global batch / (data ×
    fsdp)), ``t`` the tensor-parallel size (heads and ``d_ff`` split over it), ``m`` = 4 (SwiGLU)
    or 2 (GELU).  With ``remat`` (``nn.remat`` per block, nothing saved inside) a layer keeps only
    its input ``act·b·s·h``, and the backward pass holds one recomputed layer at a time
    (Korthikanti et al. §4.3, "full recomputation").
  - logits: float32 ``[b, s, V / t]``: the logits, their log-softmax and their gradient (12 bytes
    per entry) while training; when PPO scores a rollout, the logits of the whole sequence and
    the log-softmax and entropy terms of the response (4 + 8 bytes per entry).
  - gathered weights (``fsdp`` > 1): FSDP all-gathers a layer's weights where it is used and
    reduce-scatters its gradient, so one layer's float32 weights and gradient are held whole
    (split only over ``tensor``): 2 × one layer's parameters.  The compiler may gather earlier
    (prefetch) and hold more.
  - KV cache: ``2·layers·b·(prompt_len + max_new_tokens)·kv_heads·head_dim·act / t`` (keys and
    values, split over ``tensor`` when it divides ``kv_heads``).

* **compiled** — XLA's own buffer assignment: the jitted train step (forward + backward + AdamW
  update, the state donated) lowered with ``jax.ShapeDtypeStruct`` inputs carrying
  ``NamedSharding`` s, compiled, and read from ``compiled.memory_analysis()`` (per device:
  arguments, outputs, aliased (donated) bytes and temporaries).  ``compile="cpu"`` (default)
  compiles in a child process on ``devices`` *simulated CPU devices*
  (``--xla_force_host_platform_device_count``), so it runs on a laptop for any target: its
  arguments, outputs and aliases are the target's, but the CPU compiler computes bfloat16 in
  float32 and fuses less, so its temporaries are several times the GPU's (TinyLlama-1.1B SFT
  step, batch 4 × 2048, remat, one device: CPU temp 27 GiB, H200 temp 5.3 GiB).  It is still
  the way to see how a *sharding* behaves: compare a mesh's temporaries with another's at the
  same per-device batch.  ``compile="local"`` compiles for the devices this process sees (on
  the target itself); on an H200 its peak was within 1% of the measured
  ``peak_bytes_in_use`` (17.6 vs 17.7 GiB; analytic 23.6 GiB).
  A model of ``L`` layers is compiled with ``compile_layers - 1`` and ``compile_layers`` layers
  and every quantity extrapolated linearly to ``L`` (the layers are unrolled, so each adds the
  same buffers; on the H200, 1 and 2 layers extrapolated to 22 gave 17.50 GiB against 17.62
  compiled whole); ``compile_layers=0`` compiles the whole model.  For PPO the compiled program
  is the policy's update at the PPO minibatch shape (``sft_loss`` on ``[minibatch, prompt_len +
  max_new_tokens]``), a proxy for the policy half of the update phase.

The analytic rows are an upper bound: XLA fuses the AdamW update into the gradient and the
log-softmax into the loss, so neither is held whole.  The verdict uses them.

Phases.  Parameters, optimizer state and frozen models live throughout (``state``); the other
rows live only in one phase of a step: ``update`` (gradients, activations, training logits,
gathered weights), ``rollout`` (PPO's KV cache) and ``experience`` (PPO's scoring logits).  The
total is ``state`` plus the largest phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from rlhf_jax import hf
from rlhf_jax.configs import load_config, to_dict
from rlhf_jax.errors import ConfigError, PlanError, check
from rlhf_jax.model import ModelConfig, Transformer, init_params
from rlhf_jax.sharding import AXES, BATCH_AXES, DEFAULT_RULES, MeshConfig, make_mesh, partition_specs, state_shardings
from rlhf_jax.train.optim import OptimizerConfig, make_optimizer
from rlhf_jax.train.state import TrainState

__all__ = ["PlanConfig", "Plan", "Row", "CompiledMemory", "PlanError", "plan", "check_fits",
           "compiled_memory", "activation_bytes", "logits_bytes", "kv_cache_bytes", "main"]

GiB = 2**30
STAGES = ("sft", "rm", "ppo")
PHASES = ("state", "update", "rollout", "experience")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_REPO = Path(__file__).resolve().parents[1]
_STATS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to plan: a model, a stage and its batch shapes, a mesh, and the target's devices.

    ``model`` (a ``ModelConfig``) or ``hf_config`` (a Hugging Face ``config.json``, or the
    directory holding one, read with ``hf.config_from_hf``): exactly one.  ``compute_dtype`` and
    ``remat`` replace the model's ``dtype`` and ``remat``.

    ``devices``: JAX devices of the target (``jax.device_count()``): 8 on an 8×H100 host; 16 on
    a TPU v4-32 (the name counts TensorCores: 16 chips × 2 cores, and each chip's two cores are
    one JAX device, "megacore").  ``device_memory_gib``: memory per device (H100 80, H200 141,
    TPU v4 32, v5e 16, v5p 95); ``headroom``: the usable fraction (runtime, fragmentation; JAX on
    GPU preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.75 of it unless told otherwise).

    Batch shapes (global, over all devices): ``sft``: ``batch_size`` sequences of ``seq_len``;
    ``rm``: ``batch_size`` prompts × ``k_responses`` sequences of ``seq_len``; ``ppo``:
    ``batch_size`` rollout episodes of ``prompt_len + max_new_tokens`` tokens, updated in
    ``ppo_minibatches`` minibatches (InstructGPT App. C.4: 512 episodes, minibatch 64), each with
    ``ptx_batch_size`` pretraining sequences of ``seq_len``.  ``batch_size`` is one step's
    (micro-)batch; ``grad_accum_steps`` > 1 adds ``optax.MultiSteps``'s accumulator.

    PPO holds four models of the same architecture: policy (LM) and value (scalar head) trained
    with AdamW, reference (LM) and reward (scalar head) frozen, stored in ``frozen_dtype`` (the
    PPO stage's ``PPOStageConfig.frozen_dtype``: set both the same).
    """

    model: ModelConfig | None = None
    hf_config: str | None = None
    mesh: MeshConfig = MeshConfig()
    devices: int = 8
    device_memory_gib: float = 80.0
    headroom: float = 0.9
    stage: Literal["sft", "rm", "ppo"] = "sft"
    batch_size: int = 32  # IG App. C.1: SFT batch 32
    seq_len: int = 2048
    k_responses: int = 4  # IG §3.5: K = 4..9
    prompt_len: int = 256
    max_new_tokens: int = 256
    ppo_minibatches: int = 8  # IG App. C.4: 512 episodes / minibatch 64
    ptx_batch_size: int = 0
    grad_accum_steps: int = 1
    param_dtype: Literal["float32"] = "float32"  # design.md: float32 master weights
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    remat: bool = False
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    optimizer: Literal["adam"] = "adam"  # AdamW (train.optim): two float32 moments
    compile: Literal["cpu", "local", "none"] = "cpu"
    compile_layers: int = 2

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if (self.model is None) == (self.hf_config is None):
            raise ConfigError("PlanConfig: set exactly one of 'model' (a ModelConfig) and 'hf_config' "
                              f"(a config.json path); got model={'set' if self.model else None}, "
                              f"hf_config={self.hf_config!r}")
        choices = {"stage": STAGES, "param_dtype": ("float32",), "optimizer": ("adam",),
                   "compute_dtype": tuple(_DTYPE_BYTES), "frozen_dtype": ("float32", "bfloat16"),
                   "compile": ("cpu", "local", "none")}
        for field, allowed in choices.items():
            check(getattr(self, field) in allowed, self, field, f"one of {allowed}")
        for field in ("devices", "batch_size", "seq_len", "k_responses", "prompt_len", "max_new_tokens",
                      "ppo_minibatches", "grad_accum_steps"):
            check(is_int(getattr(self, field)) and getattr(self, field) >= 1, self, field, "an int >= 1")
        check(self.stage != "rm" or self.k_responses >= 2, self, "k_responses", "an int >= 2 (IG §3.5: K = 4..9)")
        check(is_int(self.ptx_batch_size) and self.ptx_batch_size >= 0, self, "ptx_batch_size", "an int >= 0")
        check(is_int(self.compile_layers) and self.compile_layers != 1 and self.compile_layers >= 0,
              self, "compile_layers", "0 (compile the whole model) or an int >= 2")
        check(isinstance(self.device_memory_gib, (int, float)) and self.device_memory_gib > 0,
              self, "device_memory_gib", "> 0")
        check(isinstance(self.headroom, (int, float)) and 0 < self.headroom <= 1, self, "headroom", "in (0, 1]")
        check(isinstance(self.remat, bool), self, "remat", "true or false")
        try:
            data, fsdp, _ = self.mesh.shape(self.devices)
        except ValueError as e:
            raise ConfigError(f"PlanConfig.mesh: {e}") from e
        shards = data * fsdp
        per_step = {"sft": ("batch_size", self.batch_size), "rm": ("batch_size", self.batch_size),
                    "ppo": ("batch_size / ppo_minibatches", self.batch_size // self.ppo_minibatches)}
        check(self.stage != "ppo" or self.batch_size % self.ppo_minibatches == 0,
              self, "batch_size", f"divisible by ppo_minibatches={self.ppo_minibatches}")
        name, rows = per_step[self.stage]
        if rows % shards:
            raise ConfigError(f"PlanConfig.{name} = {rows} does not divide over the mesh's {shards} "
                              f"batch shards (data×fsdp = {data}×{fsdp}); use a multiple of {shards}")
        check(not (self.stage == "ppo" and self.ptx_batch_size % shards),
              self, "ptx_batch_size", f"a multiple of the {shards} batch shards (data×fsdp)")

    def model_config(self) -> ModelConfig:
        """The planned ``ModelConfig`` (LM head), with ``compute_dtype`` and ``remat`` applied;
        reads ``hf_config`` if that is the source."""
        if self.model is not None:
            config = self.model
        else:
            path = Path(self.hf_config)
            if path.is_dir():
                path = path / hf.CONFIG_FILE
            try:
                data = json.loads(path.read_text())
            except OSError as e:
                raise ConfigError(f"PlanConfig.hf_config: cannot read {path}: {e.strerror or e}") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
            try:
                config = hf.config_from_hf(data, source=path)
            except ValueError as e:
                raise ConfigError(f"PlanConfig.hf_config: {e}") from e
        config = config.replace(dtype=self.compute_dtype, remat=self.remat, head="lm")
        longest = {"sft": self.seq_len, "rm": self.seq_len,
                   "ppo": max(self.prompt_len + self.max_new_tokens,
                              self.seq_len if self.ptx_batch_size else 0)}[self.stage]
        if config.arch == "gpt2" and longest > config.max_len:
            raise ConfigError(f"PlanConfig: sequences of {longest} tokens exceed the model's learned "
                              f"positions (max_len={config.max_len}); shorten seq_len/prompt_len/max_new_tokens")
        return config


@dataclasses.dataclass(frozen=True)
class Row:
    """One buffer kind: ``bytes`` per device, the ``phase`` it lives in, ``source`` ``"exact"``
    or ``"analytic"``, and what it holds (``detail``)."""

    name: str
    phase: str
    bytes: int
    source: str
    detail: str


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """``compiled.memory_analysis()`` of the train step, per device, extrapolated to
    ``n_layers`` from the compiled layer counts ``layers`` (see the module docstring)."""

    program: str
    backend: str
    devices: int
    layers: tuple[int, ...]
    n_layers: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments + outputs − donated (aliased) bytes + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory of ``config`` on its mesh (see the module docstring)."""

    config: PlanConfig
    model: ModelConfig
    mesh_shape: tuple[int, int, int]
    n_params: int
    rows: tuple[Row, ...]
    fallbacks: tuple[str, ...]
    compiled: CompiledMemory | None = None

    def phase_bytes(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES[1:], key=self.phase_bytes)

    @property
    def total_bytes(self) -> int:
        """``state`` + the largest of the other phases."""
        return self.phase_bytes("state") + self.phase_bytes(self.peak_phase)

    @property
    def usable_bytes(self) -> int:
        return int(self.config.device_memory_gib * self.config.headroom * GiB)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def row_bytes(self, name: str) -> int:
        """Bytes of the rows whose name starts with ``name`` (0 if none)."""
        return sum(r.bytes for r in self.rows if r.name.startswith(name))

    def table(self) -> str:
        """The plan as a text table, per device, in GiB (2³⁰ bytes), or MiB for plans under 1 GiB."""
        c, m = self.config, self.model
        unit, size = ("GiB", GiB) if self.total_bytes >= GiB else ("MiB", 2**20)
        source = c.hf_config or f"{m.arch} d_model {m.d_model}, {m.n_layers} layers"
        lines = [
            f"rlhf-jax plan: stage {c.stage}, {source}, {self.n_params / 1e9:.2f}B parameters",
            f"  {c.devices} devices × {c.device_memory_gib:g} GiB, mesh data×fsdp×tensor = "
            f"{'×'.join(map(str, self.mesh_shape))}, compute {c.compute_dtype}, remat {c.remat}, "
            f"{self._shape_text()}",
            "",
            f"  {'per device':<56}{'phase':<12}{unit:>8}  source",
        ]
        for r in self.rows:
            lines.append(f"  {r.name + ' (' + r.detail + ')':<56}{r.phase:<12}{r.bytes / size:>8.2f}  {r.source}")
        lines += [
            f"  {'total = state + largest phase (' + self.peak_phase + ')':<68}{self.total_bytes / size:>8.2f}",
            f"  {'usable: ' + format(c.headroom, 'g') + ' × ' + format(c.device_memory_gib, 'g') + ' GiB':<68}"
            f"{self.usable_bytes / size:>8.2f}",
        ]
        if self.fallbacks:
            lines.append(f"  note: {len(self.fallbacks)} parameter dims not divisible by their mesh axes are "
                         f"replicated ({', '.join(self.fallbacks[:3])}{', ...' if len(self.fallbacks) > 3 else ''})")
        free = 1 - self.total_bytes / self.usable_bytes
        verdict = (f"fits: {self.total_bytes / size:.2f} of {self.usable_bytes / size:.2f} {unit} usable "
                   f"({free:.0%} free)" if self.fits else
                   f"does NOT fit: {self.total_bytes / size:.2f} {unit} needed, {self.usable_bytes / size:.2f} usable")
        lines.append(f"verdict: {verdict}")
        if self.compiled is not None:
            k = self.compiled
            how = (f"compiled with {k.layers[0]} and {k.layers[1]} layers, extrapolated to {k.n_layers}"
                   if len(k.layers) == 2 else f"compiled with all {k.n_layers} layers")
            lines += [
                "",
                f"compiled: {k.program}, XLA {k.backend} on {k.devices} devices ({how}); {unit} per device:",
                f"  arguments {k.argument_bytes / size:.2f}  outputs {k.output_bytes / size:.2f}  "
                f"aliased {k.alias_bytes / size:.2f}  temp {k.temp_bytes / size:.2f}  "
                f"peak {k.peak_bytes / size:.2f}",
            ]
            if k.backend == "cpu":
                lines.append("  (CPU temporaries run several times a GPU's or TPU's: bfloat16 computed in "
                             "float32, less fusion; compile='local' on the target gives its own)")
        return "\n".join(lines)

    def _shape_text(self) -> str:
        c = self.config
        if c.stage == "sft":
            return f"batch {c.batch_size} × {c.seq_len} tokens"
        if c.stage == "rm":
            return f"batch {c.batch_size} prompts × {c.k_responses} responses × {c.seq_len} tokens"
        ptx = f", ptx {c.ptx_batch_size} × {c.seq_len}" if c.ptx_batch_size else ""
        return (f"rollout {c.batch_size} × ({c.prompt_len} + {c.max_new_tokens}) tokens in "
                f"{c.ppo_minibatches} minibatches{ptx}, frozen {c.frozen_dtype}")


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


def _abstract_params(config: ModelConfig) -> Any:
    return jax.eval_shape(init_params, Transformer(config), jax.random.PRNGKey(0))


def _optimizer_config(cfg: PlanConfig) -> OptimizerConfig:
    return OptimizerConfig(grad_accum_steps=cfg.grad_accum_steps)


def _count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------- analytic parts


def _split(n: int, t: int) -> int:
    """The tensor-parallel factor a dimension of size ``n`` is split by (1 when ``t`` does not divide it)."""
    return t if n % t == 0 else 1


def activation_bytes(config: ModelConfig, batch: int, seq: int, tensor: int = 1) -> int:
    """Activations saved for the backward pass of ``config`` on one device's ``[batch, seq]``
    (excluding the logits: ``logits_bytes``).  Korthikanti et al. 2022 §4.1, adapted (module
    docstring); with ``config.remat`` only each layer's input plus one recomputed layer."""
    c, b, s = config, batch, seq
    act = jnp.dtype(c.compute_dtype).itemsize
    h, hd = c.d_model, c.head_dim
    t_heads = _split(c.kv_heads, tensor)
    t_ff = _split(c.ff_dim, tensor)
    mlp_tensors = 4 if c.arch == "llama" else 2
    layer = (
        act * b * s * 4 * h  # both norms' inputs and outputs (replicated over tensor)
        + act * b * s * (2 * h + 2 * c.kv_heads * hd) // t_heads  # q, k, v, attention output
        + act * b * s * mlp_tensors * c.ff_dim // t_ff  # gate, up, silu(gate), product | fc, gelu
        + b * s * s * (c.n_heads * (4 + act) // t_heads + 1)  # float32 softmax, its cast, the mask
    )
    outside = 2 * act * b * s * h  # the final norm's input and output
    if c.remat:
        return c.n_layers * act * b * s * h + layer + outside
    return c.n_layers * layer + outside


def logits_bytes(config: ModelConfig, batch: int, seq: int, tensor: int = 1, per_entry: int = 12) -> int:
    """``[batch, seq, V / tensor]`` entries × ``per_entry`` bytes (12: float32 logits, their
    log-softmax and their gradient)."""
    return batch * seq * config.vocab_size // _split(config.vocab_size, tensor) * per_entry


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

    tx = make_optimizer(_optimizer_config(cfg))

    def trainable(tree: Any) -> tuple[int, int]:
        return _local_bytes(tree, mesh), _local_bytes(jax.eval_shape(tx.init, tree), mesh)

    lm = _abstract_params(model_cfg)
    rows: list[Row] = []
    if cfg.stage in ("sft", "rm"):
        trained = lm if cfg.stage == "sft" else _abstract_params(model_cfg.replace(head="scalar"))
        p_bytes, o_bytes = trainable(trained)
        rows += [Row("params", "state", p_bytes, "exact", cfg.param_dtype),
                 Row("optimizer", "state", o_bytes, "exact", _opt_detail(cfg)),
                 Row("gradients", "update", p_bytes, "exact", "float32")]
        seqs = cfg.batch_size * (cfg.k_responses if cfg.stage == "rm" else 1) // shards
        rows.append(Row("activations", "update", activation_bytes(model_cfg, seqs, cfg.seq_len, tensor),
                        "analytic", f"{seqs} seq/device"))
        if cfg.stage == "sft":
            rows.append(Row("logits", "update", logits_bytes(model_cfg, seqs, cfg.seq_len, tensor),
                            "analytic", "f32 + log-softmax + grad"))
        fallbacks = _fallbacks(trained, mesh)
    else:
        value = _abstract_params(model_cfg.replace(head="scalar"))
        lm_bytes, lm_opt = trainable(lm)
        v_bytes, v_opt = trainable(value)
        frozen_size = _DTYPE_BYTES[cfg.frozen_dtype]
        frozen = _local_bytes(lm, mesh, frozen_size) + _local_bytes(value, mesh, frozen_size)
        length = cfg.prompt_len + cfg.max_new_tokens
        mb = cfg.batch_size // cfg.ppo_minibatches // shards
        ptx = cfg.ptx_batch_size // shards
        policy_act = activation_bytes(model_cfg, mb, length, tensor)
        policy_logits = logits_bytes(model_cfg, mb, length, tensor)
        if ptx:
            policy_act += activation_bytes(model_cfg, ptx, cfg.seq_len, tensor)
            policy_logits += logits_bytes(model_cfg, ptx, cfg.seq_len, tensor)
        value_act = activation_bytes(model_cfg.replace(head="scalar"), mb, length, tensor)
        rollouts = cfg.batch_size // shards
        rows += [
            Row("params", "state", lm_bytes + v_bytes, "exact", f"policy + value, {cfg.param_dtype}"),
            Row("optimizer", "state", lm_opt + v_opt, "exact", _opt_detail(cfg)),
            Row("frozen models", "state", frozen, "exact", f"ref + reward, {cfg.frozen_dtype}"),
            Row("gradients", "update", lm_bytes + v_bytes, "exact", "float32"),
            Row("activations", "update", policy_act + value_act, "analytic",
                f"policy + value, {mb}{f' + {ptx} ptx' if ptx else ''} seq/device"),
            Row("logits", "update", policy_logits, "analytic", "f32 + log-softmax + grad"),
            Row("KV cache", "rollout", kv_cache_bytes(model_cfg, rollouts, length, tensor), "analytic",
                f"{rollouts} seq/device × {length}"),
            Row("logits (scoring)", "experience",
                logits_bytes(model_cfg, rollouts, length, tensor, per_entry=4)
                + logits_bytes(model_cfg, rollouts, cfg.max_new_tokens, tensor, per_entry=8),
                "analytic", f"{rollouts} seq/device"),
        ]
        fallbacks = _fallbacks(lm, mesh)
    if fsdp > 1:
        layer = _local_bytes(lm["layer_0"], _abstract_mesh((1, 1, tensor)))
        rows.append(Row("gathered weights", "update", 2 * layer, "analytic", "fsdp: 1 layer + grad"))
    rows.sort(key=lambda r: PHASES.index(r.phase))
    result = Plan(cfg, model_cfg, shape, _count(lm), tuple(rows), fallbacks)
    if cfg.compile != "none":
        result = dataclasses.replace(result, compiled=compiled_memory(cfg))
    return result


def _opt_detail(cfg: PlanConfig) -> str:
    return "AdamW mu, nu f32" + (" + accumulator" if cfg.grad_accum_steps > 1 else "")


def check_fits(result: Plan) -> None:
    """Raise ``PlanError`` if ``result`` needs more than the usable device memory; the message
    gives the shortfall and the ``--set`` overrides that would fit (each re-planned analytically)."""
    if result.fits:
        return
    cfg = result.config
    usable = result.usable_bytes / GiB
    need = (f"{cfg.stage} needs {result.total_bytes / GiB:.1f} GiB per device of {usable:.1f} GiB "
            f"usable ({cfg.headroom:g} × {cfg.device_memory_gib:g} GiB)")

    def text(option: tuple[tuple[str, ...], float]) -> str:
        return f"set {', '.join(option[0])} (→ {option[1]:.1f} GiB)"

    fitting = [o for o in _fixes(cfg) if o[1] <= usable]
    if fitting:
        raise PlanError(f"{need}: {'; or '.join(map(text, fitting))}", fitting)
    combined = _combined_fix(cfg)
    if combined is not None and combined[1] <= usable:
        raise PlanError(f"{need}: no single change fits; together: {text(combined)}", [combined])
    tried = f" (with {', '.join(combined[0])} it still needs {combined[1]:.1f} GiB)" if combined else ""
    raise PlanError(f"{need}{tried}: use more devices, devices with more memory, or a smaller model")


def _replan(cfg: PlanConfig, **changes: Any) -> float | None:
    try:
        new = dataclasses.replace(cfg, compile="none", **changes)
    except ConfigError:
        return None
    return plan(new).total_bytes / GiB


def _fixes(cfg: PlanConfig) -> list[tuple[tuple[str, ...], float]]:
    """Single changes that shrink the plan, each with the GiB per device it would need."""
    out: list[tuple[tuple[str, ...], float | None]] = []
    data, fsdp, tensor = cfg.mesh.shape(cfg.devices)
    if data > 1:
        sets = ("mesh.data=1", f"mesh.fsdp={data * fsdp}", f"mesh.tensor={tensor}")
        out.append((sets, _replan(cfg, mesh=MeshConfig(data=1, fsdp=data * fsdp, tensor=tensor))))
    if not cfg.remat:
        out.append((("remat=true",), _replan(cfg, remat=True)))
    if cfg.stage == "ppo" and cfg.frozen_dtype == "float32":
        out.append((("frozen_dtype=bfloat16",), _replan(cfg, frozen_dtype="bfloat16")))
    out.append(_smaller_batch(cfg))
    return [(o, gib) for o, gib in out if gib is not None]


def _smaller_batch(cfg: PlanConfig, **changes: Any) -> tuple[tuple[str, ...], float | None]:
    """The largest halved ``batch_size`` that fits, else the smallest valid one (SFT and RM keep
    the effective batch by raising ``grad_accum_steps``); ``((), None)`` if none is valid."""
    usable = cfg.device_memory_gib * cfg.headroom
    best: tuple[tuple[str, ...], float | None] = ((), None)
    factor = 2
    while cfg.batch_size % factor == 0:
        batch = {"batch_size": cfg.batch_size // factor}
        if cfg.stage != "ppo":
            batch["grad_accum_steps"] = cfg.grad_accum_steps * factor
        gib = _replan(cfg, **batch, **changes)
        if gib is None:
            break
        best = tuple(f"{k}={v}" for k, v in batch.items()), gib
        if gib <= usable:
            break
        factor *= 2
    return best


def _combined_fix(cfg: PlanConfig) -> tuple[tuple[str, ...], float] | None:
    """remat, FSDP over the data axis, bfloat16 frozen models, then the largest batch that fits."""
    data, fsdp, tensor = cfg.mesh.shape(cfg.devices)
    changes: dict[str, Any] = {"remat": True}
    sets = ["remat=true"]
    if data > 1:
        changes["mesh"] = MeshConfig(data=1, fsdp=data * fsdp, tensor=tensor)
        sets += ["mesh.data=1", f"mesh.fsdp={data * fsdp}", f"mesh.tensor={tensor}"]
    if cfg.stage == "ppo":
        changes["frozen_dtype"] = "bfloat16"
        sets.append("frozen_dtype=bfloat16")
    gib = _replan(cfg, **changes)
    if gib is None:
        return None
    if gib > cfg.device_memory_gib * cfg.headroom:
        batch, smaller = _smaller_batch(cfg, **changes)
        if smaller is not None:
            return tuple(sets) + batch, smaller
    return tuple(sets), gib


# ----------------------------------------------------------------------------- compiled part


def _program(cfg: PlanConfig, config: ModelConfig) -> tuple[str, Any, Transformer, dict[str, jax.ShapeDtypeStruct]]:
    """(description, step function, model, abstract batch) of the train step the compiler sees."""
    from rlhf_jax.stages.reward import rm_step_fn  # the stages import data/tokenizer: only here
    from rlhf_jax.stages.sft import sft_step_fn

    opt = _optimizer_config(cfg)
    i32 = jnp.int32
    if cfg.stage == "rm":
        model = Transformer(config.replace(head="scalar"))
        b, k, s = cfg.batch_size, cfg.k_responses, cfg.seq_len
        batch = {"tokens": jax.ShapeDtypeStruct((b, k, s), i32), "mask": jax.ShapeDtypeStruct((b, k, s), i32),
                 "valid": jax.ShapeDtypeStruct((b, k), i32)}
        return "reward-model train step", rm_step_fn(model, opt), model, batch
    model = Transformer(config)
    if cfg.stage == "sft":
        b, s, what = cfg.batch_size, cfg.seq_len, "SFT train step"
    else:
        b, s = cfg.batch_size // cfg.ppo_minibatches, cfg.prompt_len + cfg.max_new_tokens
        what = "PPO policy update proxy (sft_loss on one minibatch)"
    batch = {name: jax.ShapeDtypeStruct((b, s), i32) for name in ("tokens", "mask", "loss_mask")}
    return what, sft_step_fn(model, opt), model, batch


def _compile_stats(cfg: PlanConfig, config: ModelConfig, devices: Sequence[Any]) -> tuple[str, dict[str, int]]:
    """Compile the train step of ``config`` on ``devices`` and return its memory analysis."""
    what, step, model, batch = _program(cfg, config)
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(_optimizer_config(cfg))
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(lambda k: TrainState.create(init_params(model, k), tx, k), key)
    state_sh = state_shardings(state, mesh)
    batch_sh = {name: NamedSharding(mesh, P(BATCH_AXES)) for name in batch}
    jitted = jax.jit(step, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
    stats = jitted.lower(state, batch).compile().memory_analysis()
    return what, {name: int(getattr(stats, name)) for name in _STATS}


def _layer_counts(cfg: PlanConfig, n_layers: int) -> tuple[int, ...]:
    k = cfg.compile_layers
    return (k - 1, k) if 0 < k < n_layers else (n_layers,)


def _compile_jobs(cfg: PlanConfig, config: ModelConfig, layers: Sequence[int],
                  devices: Sequence[Any]) -> tuple[str, list[dict[str, int]]]:
    results = [_compile_stats(cfg, config.replace(n_layers=n), devices) for n in layers]
    return results[0][0], [stats for _, stats in results]


def compiled_memory(cfg: PlanConfig) -> CompiledMemory:
    """The compiler's per-device memory analysis of the stage's train step (module docstring):
    in a child process on ``cfg.devices`` simulated CPU devices (``compile="cpu"``), or on this
    process's devices (``compile="local"``, which must number ``cfg.devices``)."""
    config = cfg.model_config()
    layers = _layer_counts(cfg, config.n_layers)
    if cfg.compile == "local":
        if jax.device_count() != cfg.devices:
            raise ConfigError(f"PlanConfig.compile='local' needs {cfg.devices} devices (PlanConfig.devices); "
                              f"this process sees {jax.device_count()}")
        what, stats = _compile_jobs(cfg, config, layers, jax.devices())
        backend = jax.default_backend()
    else:
        what, stats = _compile_in_child(cfg, config, layers)
        backend = "cpu"
    if len(layers) == 2:  # linear in the (unrolled) layers: f(L) = f(k) + (L − k)·(f(k) − f(k − 1))
        extra = config.n_layers - layers[1]
        values = [stats[1][k] + extra * (stats[1][k] - stats[0][k]) for k in _STATS]
    else:
        values = [stats[0][k] for k in _STATS]
    return CompiledMemory(what, backend, cfg.devices, layers, config.n_layers, *values)


def _compile_in_child(cfg: PlanConfig, config: ModelConfig, layers: Sequence[int]) -> tuple[str, list[dict[str, int]]]:
    env = dict(os.environ)
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    # LLVM optimisation off: compiles ~2x faster, same HLO passes and buffer assignment.  The
    # concurrency-optimised scheduler (CPU default) trades memory for parallelism: off, the CPU
    # schedule is memory-minimising like the GPU/TPU ones (1.1B SFT step: temp 156 -> 27 GiB).
    env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={cfg.devices} "
                        "--xla_backend_optimization_level=0 "
                        "--xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), env.get("PYTHONPATH")) if p)
    job = json.dumps({"plan": to_dict(dataclasses.replace(cfg, model=config, hf_config=None)),
                      "layers": list(layers)})
    proc = subprocess.run([sys.executable, "-c", "from rlhf_jax.plan import _child; _child()"],
                          input=job, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"plan: compiling on {cfg.devices} simulated CPU devices failed "
                           f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["program"], out["stats"]


def _child() -> None:
    """Entry point of the compile child process: a job on stdin, the stats as JSON on stdout."""
    from rlhf_jax.configs import from_dict

    job = json.loads(sys.stdin.read())
    cfg = from_dict(PlanConfig, job["plan"], where="plan")
    what, stats = _compile_jobs(cfg, cfg.model_config(), job["layers"], jax.devices())
    print(json.dumps({"program": what, "stats": stats}))


# ------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``rlhf-jax plan --config FILE [--set KEY=VALUE ...] [--no-compile]``: print the plan.

    Exit codes: 0 it fits; 1 it does not (the table, then the shortfall and the settings that
    would fit, on stderr); 2 a bad config, override or command line.
    """
    parser = argparse.ArgumentParser(prog="rlhf-jax plan",
                                     description="Per-device memory plan of a stage on a target mesh.")
    parser.add_argument("--config", metavar="FILE", help="a .json or .toml PlanConfig")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. mesh.fsdp=8 (repeatable)")
    parser.add_argument("--no-compile", action="store_true", help="analytic only (same as --set compile=none)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    overrides = list(args.overrides) + (["compile=none"] if args.no_compile else [])
    try:
        result = plan(load_config(PlanConfig, args.config, overrides))
    except ConfigError as e:
        print(f"rlhf-jax plan: error: {e}", file=sys.stderr)
        return 2
    print(result.table())
    try:
        check_fits(result)
    except PlanError as e:
        print(f"rlhf-jax plan: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
