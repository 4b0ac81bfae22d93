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
    (Korthikanti et al. §4.3, "full recomputation"); with ``remat_policy="dots"``
    (``dots_with_no_batch_dims_saveable``) a layer keeps its input and its projections' outputs,
    ``act·b·s·(3·h + (h + 2·kv·hd) / t + m'·d_ff / t)`` with ``m'`` = 2 (gate, up) or 1 (fc), and
    one layer is recomputed at a time.  With cuDNN flash attention
    (``model.flash_attention``: ``attention_impl="cudnn"``, or ``"auto"`` on a GPU target in a
    16-bit dtype; ``PlanConfig.backend`` names the target) the probabilities are not kept: the
    last term becomes ``4·b·s·a / t + b·s²·(1 + act)``, the softmax statistics and the mask with
    the bias jax makes of it (Dao et al. 2022, FlashAttention, §3.1).
  - logits: float32 ``[b, s, V / t]``: the logits, their log-softmax and their gradient (12 bytes
    per entry) while training (DPO adds its frozen reference's logits and log-softmax, 8 bytes,
    on the same sequences); when PPO or GRPO scores a rollout, the logits of the whole sequence and
    the log-softmax and entropy terms of the response (4 + 8 bytes per entry).  With
    ``logits_chunk`` (``losses.chunked_logprobs``) the SFT, ptx and PPO/GRPO losses and the
    scoring hold ``min(logits_chunk, steps)`` steps' logits at a time (12 bytes per entry;
    ``logit_steps``); DPO builds its logits whole.
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
  compiled whole); ``compile_layers=0`` compiles the whole model.  For PPO and GRPO the compiled
  program is the policy's update at the minibatch shape (``sft_loss`` on ``[minibatch, prompt_len +
  max_new_tokens]``), a proxy for the policy half of the update phase; for DPO, ``sft_loss`` on the
  batch's ``batch_size × k_responses`` sequences (the reference's forward pass not included).

The analytic rows are an upper bound: XLA fuses the AdamW update into the gradient and the
log-softmax into the loss, so neither is held whole.  The verdict uses them.

Phases.  Parameters, optimizer state and frozen models live throughout (``state``); the other
rows live only in one phase of a step: ``update`` (gradients, activations, training logits,
gathered weights), ``rollout`` (PPO's and GRPO's KV cache) and ``experience`` (their scoring
logits).  The total is ``state`` plus the largest phase.

Stages.  GRPO (and RLOO) is planned as PPO without the value model on ``batch_size ×
group_size`` rollouts; PPO and GRPO add the policy's float32 EMA when kept (``ema``) and drop
the frozen reward model for a gold reward (``reward_model=False``).  DPO is planned as the
reward model's ``batch_size × k_responses`` sequences on the LM head (with its logits), plus
the frozen reference's weights and logits.
"""

from rlhf_jax.errors import PlanError
from rlhf_jax.plan.compiled import compiled_memory
from rlhf_jax.plan.config import GiB, PHASES, STAGES, PlanConfig
from rlhf_jax.plan.estimate import activation_bytes, kv_cache_bytes, logit_steps, logits_bytes, plan
from rlhf_jax.plan.fixes import check_fits
from rlhf_jax.plan.result import CompiledMemory, Plan, Row

__all__ = ["PlanConfig", "Plan", "Row", "CompiledMemory", "PlanError", "GiB", "PHASES", "STAGES", "plan",
           "check_fits", "compiled_memory", "activation_bytes", "logits_bytes", "logit_steps", "kv_cache_bytes",
           "run_plan"]


def run_plan(cfg: PlanConfig) -> None:
    """``rlhf-jax plan``: print the plan's table, then raise ``PlanError`` (exit 1, with the
    settings that would fit) if it does not fit the device."""
    result = plan(cfg)
    print(result.table())
    check_fits(result)
