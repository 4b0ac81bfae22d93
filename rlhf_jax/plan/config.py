"""What to plan (``PlanConfig``) and the planner's constants."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from rlhf_jax.errors import ConfigError, check
from rlhf_jax.hf_config import CONFIG_FILE, config_from_hf
from rlhf_jax.model import ModelConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train.optim import OptimizerConfig

GiB = 2**30
STAGES = ("sft", "rm", "ppo", "grpo", "dpo")
RL_STAGES = ("ppo", "grpo")  # sample rollouts (KV cache, scoring), update on minibatches, frozen models
PHASES = ("state", "update", "rollout", "experience")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """What to plan: a model, a stage and its batch shapes, a mesh, and the target's devices.

    ``model`` (a ``ModelConfig``) or ``hf_config`` (a Hugging Face ``config.json``, or the
    directory holding one, read with ``hf_config.config_from_hf``): exactly one.  ``compute_dtype`` and
    ``remat`` replace the model's ``dtype`` and ``remat``.

    ``devices``: JAX devices of the target (``jax.device_count()``): 8 on an 8×H100 host; 16 on
    a TPU v4-32 (the name counts TensorCores: 16 chips × 2 cores, and each chip's two cores are
    one JAX device, "megacore").  ``device_memory_gib``: memory per device (H100 80, H200 141,
    TPU v4 32, v5e 16, v5p 95); ``headroom``: the usable fraction (runtime, fragmentation; JAX on
    GPU preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.75 of it unless told otherwise).
    ``backend``: the target's JAX backend (``"gpu"``, ``"tpu"``, ``"cpu"``; None: this process's),
    which decides whether ``attention_impl="auto"`` runs cuDNN flash attention
    (``model.flash_attention``) and so whether the attention's ``[s, s]`` terms are saved.

    Batch shapes (global, over all devices): ``sft``: ``batch_size`` sequences of ``seq_len``;
    ``rm``: ``batch_size`` prompts × ``k_responses`` sequences of ``seq_len``; ``ppo``:
    ``batch_size`` rollout episodes of ``prompt_len + max_new_tokens`` tokens, updated in
    ``ppo_minibatches`` minibatches (InstructGPT App. C.4: 512 episodes, minibatch 64), each with
    ``ptx_batch_size`` pretraining sequences of ``seq_len``; ``grpo`` (GRPO and RLOO): as ``ppo``
    with each of the ``batch_size`` prompts sampled ``group_size`` times (``batch_size ×
    group_size`` rollouts, ``ppo_minibatches`` = ``GRPOConfig.num_minibatches``); ``dpo``:
    ``batch_size`` prompts × ``k_responses`` sequences of ``seq_len``, as ``rm``.  ``batch_size``
    is one step's (micro-)batch; ``grad_accum_steps`` > 1 adds ``optax.MultiSteps``'s accumulator.

    PPO holds four models of the same architecture: policy (LM) and value (scalar head) trained
    with AdamW, reference (LM) and reward (scalar head) frozen, stored in ``frozen_dtype`` (the
    PPO stage's ``PPOStageConfig.frozen_dtype``: set both the same).  GRPO has no value model;
    DPO trains the policy beside its frozen reference (LM, ``frozen_dtype``; the DPO stage keeps
    it in float32) and no reward model.  ``reward_model``: false when the reward is not a model
    (``reward="gold"``, PPO and GRPO); ``ema``: the policy's float32 EMA is kept (PPO's and
    GRPO's ``ema_decay``).
    """

    model: ModelConfig | None = None
    hf_config: str | None = None
    mesh: MeshConfig = MeshConfig()
    devices: int = 8
    device_memory_gib: float = 80.0
    headroom: float = 0.9
    backend: Literal["gpu", "tpu", "cpu"] | None = None  # the target's; None: this process's
    stage: Literal["sft", "rm", "ppo", "grpo", "dpo"] = "sft"
    batch_size: int = 32  # IG App. C.1: SFT batch 32
    seq_len: int = 2048
    k_responses: int = 4  # IG §3.5: K = 4..9
    group_size: int = 8  # GRPO's G (TRL num_generations 8)
    prompt_len: int = 256
    max_new_tokens: int = 256
    ppo_minibatches: int = 8  # IG App. C.4: 512 episodes / minibatch 64
    ptx_batch_size: int = 0
    grad_accum_steps: int = 1
    param_dtype: Literal["float32"] = "float32"  # design.md: float32 master weights
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    remat: bool = False
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    reward_model: bool = True
    ema: bool = False
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
                   "compute_dtype": tuple(DTYPE_BYTES), "frozen_dtype": ("float32", "bfloat16"),
                   "compile": ("cpu", "local", "none"), "backend": (None, "gpu", "tpu", "cpu")}
        for field, allowed in choices.items():
            check(getattr(self, field) in allowed, self, field, f"one of {allowed}")
        for field in ("devices", "batch_size", "seq_len", "k_responses", "prompt_len", "max_new_tokens",
                      "ppo_minibatches", "grad_accum_steps", "group_size"):
            check(is_int(getattr(self, field)) and getattr(self, field) >= 1, self, field, "an int >= 1")
        check(self.stage not in ("rm", "dpo") or self.k_responses >= 2, self, "k_responses",
              "an int >= 2 (IG §3.5: K = 4..9)")
        check(is_int(self.ptx_batch_size) and self.ptx_batch_size >= 0, self, "ptx_batch_size", "an int >= 0")
        check(is_int(self.compile_layers) and self.compile_layers != 1 and self.compile_layers >= 0,
              self, "compile_layers", "0 (compile the whole model) or an int >= 2")
        check(isinstance(self.device_memory_gib, (int, float)) and self.device_memory_gib > 0,
              self, "device_memory_gib", "> 0")
        check(isinstance(self.headroom, (int, float)) and 0 < self.headroom <= 1, self, "headroom", "in (0, 1]")
        for field in ("remat", "reward_model", "ema"):
            check(isinstance(getattr(self, field), bool), self, field, "true or false")
        try:
            data, fsdp, _ = self.mesh.shape(self.devices)
        except ValueError as e:
            raise ConfigError(f"PlanConfig.mesh: {e}") from e
        shards = data * fsdp
        check(self.stage != "ppo" or self.batch_size % self.ppo_minibatches == 0,
              self, "batch_size", f"divisible by ppo_minibatches={self.ppo_minibatches}")
        check(self.stage != "grpo" or self.batch_size * self.group_size % self.ppo_minibatches == 0,
              self, "batch_size", f"such that batch_size × group_size divides into ppo_minibatches="
              f"{self.ppo_minibatches}")
        sharded_rows = {  # what is split over the batch shards: PPO's minibatch; GRPO's prompts, then a minibatch
            "ppo": [("batch_size / ppo_minibatches", self.batch_size // self.ppo_minibatches)],
            "grpo": [("batch_size", self.batch_size), ("batch_size × group_size / ppo_minibatches",
                                                       self.batch_size * self.group_size // self.ppo_minibatches)],
        }
        for name, rows in sharded_rows.get(self.stage, [("batch_size", self.batch_size)]):
            if rows % shards:
                raise ConfigError(f"PlanConfig.{name} = {rows} does not divide over the mesh's {shards} "
                                  f"batch shards (data×fsdp = {data}×{fsdp}); use a multiple of {shards}")
        check(not (self.stage in RL_STAGES and self.ptx_batch_size % shards),
              self, "ptx_batch_size", f"a multiple of the {shards} batch shards (data×fsdp)")

    def model_config(self) -> ModelConfig:
        """The planned ``ModelConfig`` (LM head), with ``compute_dtype`` and ``remat`` applied;
        reads ``hf_config`` if that is the source."""
        if self.model is not None:
            config = self.model
        else:
            path = Path(self.hf_config)
            if path.is_dir():
                path = path / CONFIG_FILE
            try:
                data = json.loads(path.read_text())
            except OSError as e:
                raise ConfigError(f"PlanConfig.hf_config: cannot read {path}: {e.strerror or e}") from e
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from e
            try:
                config = config_from_hf(data, source=path)
            except ValueError as e:
                raise ConfigError(f"PlanConfig.hf_config: {e}") from e
        config = config.replace(dtype=self.compute_dtype, remat=self.remat, head="lm")
        longest = (max(self.prompt_len + self.max_new_tokens, self.seq_len if self.ptx_batch_size else 0)
                   if self.stage in RL_STAGES else self.seq_len)
        if config.arch == "gpt2" and longest > config.max_len:
            raise ConfigError(f"PlanConfig: sequences of {longest} tokens exceed the model's learned "
                              f"positions (max_len={config.max_len}); shorten seq_len/prompt_len/max_new_tokens")
        return config


def optimizer_config(cfg: PlanConfig) -> OptimizerConfig:
    """The AdamW config the planned stage trains with (its state is what the plan counts)."""
    return OptimizerConfig(grad_accum_steps=cfg.grad_accum_steps)
