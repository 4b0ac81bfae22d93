"""Memory planning: exact parameter/optimizer bytes against hand counts, sharded sizes against
hand-divided shapes, the fit check's advice, the compiler path on 8 simulated devices, the CLI."""

from __future__ import annotations

import dataclasses
import json

import jax
import pytest

from _multidevice import run_on_devices
from rlhf_jax.configs import ConfigError, load_config, to_dict
from rlhf_jax.model import ModelConfig, init_cache
from rlhf_jax.cli import main as cli_main
from rlhf_jax.plan import GiB, PlanConfig, PlanError, activation_bytes, check_fits, kv_cache_bytes, logits_bytes, plan
from rlhf_jax.sharding import MeshConfig

# d 64, 4 heads of 16, 2 KV heads, SwiGLU 96, untied head: every Llama weight kind.
LLAMA = ModelConfig(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    d_ff=96, max_len=128, tie_embeddings=False)
GPT2 = ModelConfig(arch="gpt2", vocab_size=300, d_model=64, n_layers=3, n_heads=4, max_len=96)


def llama_count(c: ModelConfig) -> int:
    d, hd, f, v = c.d_model, c.head_dim, c.d_ff, c.vocab_size
    layer = 2 * d + d * c.n_heads * hd + 2 * d * c.kv_heads * hd + c.n_heads * hd * d + 3 * d * f
    return v * d + c.n_layers * layer + d + d * v  # embed, layers, final norm, lm_head


def gpt2_count(c: ModelConfig) -> int:
    d, f = c.d_model, 4 * c.d_model
    layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    return c.vocab_size * d + c.max_len * d + c.n_layers * layer + 2 * d  # tied: no head


def cfg(**kw) -> PlanConfig:
    base = dict(model=LLAMA, devices=1, mesh=MeshConfig(), batch_size=8, seq_len=64, compile="none")
    return PlanConfig(**{**base, **kw})


# ------------------------------------------------------------------------ exact bytes


@pytest.mark.parametrize("model, count", [(LLAMA, llama_count(LLAMA)), (GPT2, gpt2_count(GPT2))])
def test_parameter_bytes_equal_hand_count(model, count):
    p = plan(cfg(model=model))
    assert p.n_params == count
    assert p.row_bytes("params") == 4 * count
    assert p.row_bytes("gradients") == 4 * count


def test_optimizer_is_two_float32_moments_plus_counts():
    n = llama_count(LLAMA)
    opt = plan(cfg()).row_bytes("optimizer")
    assert 8 * n <= opt <= 8 * n + 64  # mu, nu + int32 step counts
    accum = plan(cfg(grad_accum_steps=2)).row_bytes("optimizer")
    assert 12 * n <= accum <= 12 * n + 64  # + MultiSteps' float32 accumulator


def test_per_device_params_fsdp8():
    # (1, 8, 1): every kernel and the embedding split 8 ways on d_model; norms whole.
    p = plan(cfg(devices=8, mesh=MeshConfig(fsdp=8)))
    layer = (8 * 64) + 2 * (8 * 32) + (64 * 8) + 2 * (8 * 96) + (96 * 8) + 2 * 64
    assert p.row_bytes("params") == 4 * (256 * 8 + 2 * layer + 64 + 8 * 256)
    assert p.fallbacks == ()


def test_per_device_params_fsdp4_tensor2_with_non_divisible_vocab():
    # (1, 4, 2), vocab 255 (odd): tensor cannot split the vocabulary, so embedding and head keep it whole.
    model = dataclasses.replace(LLAMA, vocab_size=255)
    p = plan(cfg(model=model, devices=8, mesh=MeshConfig(fsdp=4, tensor=2)))
    layer = (16 * 32) + 2 * (16 * 16) + (32 * 16) + 2 * (16 * 48) + (48 * 16) + 2 * 64
    assert p.row_bytes("params") == 4 * (255 * 16 + 2 * layer + 64 + 16 * 255)
    assert set(p.fallbacks) == {"embed/embedding", "lm_head/kernel"}


def test_ppo_frozen_models_in_bfloat16():
    lm = llama_count(LLAMA)
    value = lm - LLAMA.d_model * LLAMA.vocab_size + LLAMA.d_model + 1  # scalar head replaces lm_head
    p = plan(cfg(stage="ppo", batch_size=8, ppo_minibatches=2, prompt_len=16, max_new_tokens=16,
                 frozen_dtype="bfloat16"))
    assert p.row_bytes("frozen models") == 2 * (lm + value)
    assert p.row_bytes("params") == 4 * (lm + value)
    # PPOStageConfig.frozen_dtype="bfloat16" halves the frozen models exactly, sharded too; nothing else moves.
    for mesh in (MeshConfig(), MeshConfig(fsdp=4, tensor=2)):
        f32, bf16 = (plan(cfg(stage="ppo", batch_size=8, ppo_minibatches=2, prompt_len=16, max_new_tokens=16,
                              devices=8 if mesh.tensor > 1 else 1, mesh=mesh, frozen_dtype=d))
                     for d in ("float32", "bfloat16"))
        assert f32.row_bytes("frozen models") == 2 * bf16.row_bytes("frozen models") > 0
        assert f32.total_bytes - bf16.total_bytes == bf16.row_bytes("frozen models")


def test_reward_model_plan_counts_the_scalar_head_and_k_responses():
    value = llama_count(LLAMA) - LLAMA.d_model * LLAMA.vocab_size + LLAMA.d_model + 1
    p = plan(cfg(stage="rm", batch_size=2, k_responses=4))
    assert p.row_bytes("params") == 4 * value
    assert p.row_bytes("activations") == activation_bytes(LLAMA.replace(dtype="bfloat16"), 8, 64)
    assert p.row_bytes("logits") == 0


# ----------------------------------------------------------------------- analytic rows


def test_kv_cache_matches_the_generation_cache():
    model = LLAMA.replace(dtype="bfloat16")
    cache = jax.eval_shape(lambda: init_cache(model, 6, 40))
    kv = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache["k"], cache["v"])))  # per layer or stacked
    assert kv_cache_bytes(model, 6, 40) == kv
    assert kv_cache_bytes(model, 6, 40, tensor=2) == kv // 2


def test_activations_follow_korthikanti_accounting():
    # Korthikanti et al. 2022 §4.1, 16-bit GPT layer: s·b·h·34 + 5·a·s²·b bytes. This model has no
    # dropout (−2·sbh residual masks, −a·s²·b attention mask, −2·a·s²·b dropout output) and keeps a
    # float32 softmax (+4·a·s²·b) and a boolean attention mask (+b·s²).
    c = GPT2.replace(dtype="bfloat16")
    b, s, h, a = 3, 32, c.d_model, c.n_heads
    paper = s * b * h * 34 + 5 * a * s * s * b
    layer = paper - 2 * s * b * h - 3 * a * s * s * b + 4 * a * s * s * b + b * s * s
    outside = 2 * 2 * b * s * h  # final norm input and output
    assert activation_bytes(c, b, s) == c.n_layers * layer + outside
    # Full recomputation (§4.3): 2·sbh per layer plus one layer rebuilt at a time.
    assert activation_bytes(c.replace(remat=True), b, s) == c.n_layers * 2 * s * b * h + layer + outside
    # The dots policy keeps the block's input and its projections' outputs (GPT-2: qkv 3h, o h, fc 4h,
    # proj h), 2 bytes each, and rebuilds one layer at a time.
    kept = 2 * s * b * (h + 3 * h + h + 4 * h + h)
    assert activation_bytes(c.replace(remat_policy="dots"), b, s) == c.n_layers * kept + layer + outside


def test_stage_plans_count_the_dots_policy():
    """A stage's check before compiling plans ``remat_policy="dots"`` as that policy, between none
    and full recomputation."""
    from rlhf_jax.train.memory import MemoryCheckConfig, stage_plan

    model = LLAMA.replace(dtype="bfloat16")
    acts = {mode: stage_plan("sft", model.replace(**kw), MeshConfig(), MemoryCheckConfig(), batch_size=8,
                             seq_len=64).row_bytes("activations")
            for mode, kw in (("none", {}), ("dots", {"remat_policy": "dots"}), ("full", {"remat": True}))}
    assert acts == {mode: activation_bytes(model.replace(remat_policy=mode), 8, 64) for mode in acts}
    assert acts["full"] < acts["dots"] < acts["none"]


def test_flash_attention_keeps_the_statistics_not_the_probabilities():
    # FlashAttention (Dao et al. 2022, §3.1) keeps the output and the softmax statistics (float32
    # [b, a, s]) instead of the [b, a, s, s] float32 softmax and its cast; the boolean mask and the
    # [b, 1, s, s] bias jax makes of it (compute dtype) stay.
    c = GPT2.replace(dtype="bfloat16")
    b, s, a = 3, 32, c.n_heads
    xla = b * s * s * (a * (4 + 2) + 1)
    flash = 4 * b * a * s + b * s * s * (1 + 2)
    assert activation_bytes(c, b, s) - activation_bytes(c, b, s, flash=True) == c.n_layers * (xla - flash)
    remat = c.replace(remat=True)  # one rebuilt layer holds the attention's buffers
    assert activation_bytes(remat, b, s) - activation_bytes(remat, b, s, flash=True) == xla - flash


def test_plan_counts_flash_attention_and_logit_chunks_where_they_run():
    """``attention_impl="auto"`` is flash attention on a GPU target in bf16 only; ``logits_chunk``
    bounds the logits of SFT, PPO's update (with ptx) and its scoring, not DPO's."""
    model = LLAMA.replace(attention_impl="auto", logits_chunk=16)
    bf16, v = model.replace(dtype="bfloat16"), LLAMA.vocab_size
    gpu, cpu = plan(cfg(model=model, backend="gpu")), plan(cfg(model=model, backend="cpu"))
    assert gpu.row_bytes("activations") == activation_bytes(bf16, 8, 64, flash=True)
    assert cpu.row_bytes("activations") == activation_bytes(bf16, 8, 64) > gpu.row_bytes("activations")
    assert gpu.row_bytes("logits") == cpu.row_bytes("logits") == 8 * 16 * v * 12  # 16 of the 64 steps at a time
    f32 = plan(cfg(model=model, backend="gpu", compute_dtype="float32"))
    assert f32.row_bytes("activations") == activation_bytes(model.replace(dtype="float32"), 8, 64)
    cudnn = plan(cfg(model=model.replace(attention_impl="cudnn"), backend="cpu"))
    assert cudnn.row_bytes("activations") == gpu.row_bytes("activations")
    whole = plan(cfg(model=model.replace(logits_chunk=128), backend="gpu"))  # a chunk longer than the rows
    assert whole.row_bytes("logits") == logits_bytes(bf16, 8, 64) == plan(cfg(model=LLAMA)).row_bytes("logits")
    dpo = plan(cfg(model=model, stage="dpo", batch_size=2, k_responses=2, backend="gpu"))
    assert dpo.row_bytes("logits") == 4 * 64 * v * (12 + 8)  # built whole, the reference's too
    ppo = plan(cfg(model=model, stage="ppo", batch_size=8, prompt_len=16, max_new_tokens=32, ppo_minibatches=2,
                   ptx_batch_size=2, seq_len=48, backend="gpu"))
    scoring = ppo.row_bytes("logits (scoring)")
    assert scoring == 8 * 16 * v * 12  # the 32 response steps, 16 at a time
    assert ppo.row_bytes("logits") - scoring == (4 + 2) * 16 * v * 12  # a minibatch of 4 and 2 ptx rows
    assert ppo.row_bytes("activations") == (activation_bytes(bf16, 4, 48, flash=True)
                                            + activation_bytes(bf16, 2, 48, flash=True)
                                            + activation_bytes(bf16.replace(head="scalar"), 4, 48, flash=True))
    unchunked = plan(cfg(model=LLAMA, stage="ppo", batch_size=8, prompt_len=16, max_new_tokens=32,
                         ppo_minibatches=2, seq_len=48))
    assert unchunked.row_bytes("logits (scoring)") == 8 * 48 * v * 4 + 8 * 32 * v * 8


def test_plan_counts_splash_attention_where_its_tile_divides_the_columns():
    """``attention_impl="splash"`` keeps the flash term on any backend, for sequences of a
    multiple of 128 columns only (``model.splash_attention``): the SFT rows of 128, PPO's 64 + 64
    rollouts, but not its 96-column ptx rows nor 64-column SFT rows."""
    model = LLAMA.replace(attention_impl="splash", max_len=256)
    bf16 = model.replace(dtype="bfloat16")  # the plan's compute dtype
    sft = plan(cfg(model=model, seq_len=128, backend="cpu"))
    assert sft.row_bytes("activations") == activation_bytes(bf16, 8, 128, flash=True) < activation_bytes(bf16, 8, 128)
    assert plan(cfg(model=model, seq_len=64)).row_bytes("activations") == activation_bytes(bf16, 8, 64)
    ppo = plan(cfg(model=model, stage="ppo", batch_size=8, prompt_len=64, max_new_tokens=64, ppo_minibatches=2,
                   ptx_batch_size=2, seq_len=96))
    assert ppo.row_bytes("activations") == (activation_bytes(bf16, 4, 128, flash=True)
                                            + activation_bytes(bf16, 2, 96)
                                            + activation_bytes(bf16.replace(head="scalar"), 4, 128, flash=True))


def test_a_cudnn_config_plans_on_a_cpu():
    """The parameters' shapes and the CPU compile of a ``attention_impl="cudnn"`` model, on a
    machine without cuDNN: the compile runs XLA's attention (the same step otherwise)."""
    xla = plan(cfg(model=LLAMA, batch_size=2, compile="cpu"))
    cudnn = plan(cfg(model=LLAMA.replace(attention_impl="cudnn"), batch_size=2, compile="cpu"))
    assert cudnn.row_bytes("params") == xla.row_bytes("params") > 0
    assert cudnn.compiled.peak_bytes == xla.compiled.peak_bytes > 0


# --------------------------------------------------------------------------- fit check


def test_fit_check_gives_advice_that_fits(tmp_path):
    # 8 GiB devices, pure data parallelism: the replicated Adam state alone does not fit.
    big = ModelConfig(arch="llama", vocab_size=32000, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=4,
                      d_ff=5632, max_len=2048, tie_embeddings=False)
    bad = PlanConfig(model=big, devices=8, mesh=MeshConfig(data=8, fsdp=1), device_memory_gib=8,
                     batch_size=16, seq_len=512, compile="none")
    result = plan(bad)
    with pytest.raises(PlanError, match=r"needs \d+\.\d GiB per device of 7\.2 GiB usable") as info:
        check_fits(result)
    assert "mesh.fsdp=8" in str(info.value)
    overrides, gib = info.value.suggestions[0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(to_dict(bad)))
    fixed = plan(load_config(PlanConfig, path, overrides))
    check_fits(fixed)
    assert abs(fixed.total_bytes / GiB - gib) < 0.05


def test_fit_check_offers_the_dots_policy(tmp_path):
    """Between no remat and full recomputation: where keeping the matmuls' outputs fits, the advice
    says so, and the override, loaded as ``--set`` would load it, plans at the GiB it gave."""
    none, dots = (plan(cfg(model=LLAMA.replace(remat_policy=p), batch_size=8, seq_len=128)).total_bytes / GiB
                  for p in ("none", "dots"))
    between = cfg(batch_size=8, seq_len=128, device_memory_gib=(none + dots) / 2 / 0.9)
    with pytest.raises(PlanError) as info:
        check_fits(plan(between))
    advice = dict(info.value.suggestions)
    assert advice[("model.remat_policy=dots",)] == pytest.approx(dots)
    path = tmp_path / "between.json"
    path.write_text(json.dumps(to_dict(between)))
    fixed = plan(load_config(PlanConfig, path, ["model.remat_policy=dots"]))
    check_fits(fixed)
    assert fixed.total_bytes / GiB == pytest.approx(dots)
    assert "remat dots" in fixed.table().splitlines()[1]


def test_fit_check_offers_splash_attention_on_a_tpu(tmp_path):
    """Planned for a TPU, a model on the einsum attention that fits only without its ``[s, s]``
    probabilities is told to set ``model.attention_impl=splash``, and the override, loaded as
    ``--set`` would load it, plans at the GiB it gave; planned for a GPU the advice is not given."""
    xla, splash = (plan(cfg(model=LLAMA.replace(attention_impl=impl), seq_len=128, backend="tpu")).total_bytes / GiB
                   for impl in ("xla", "splash"))
    assert splash < xla
    between = cfg(seq_len=128, backend="tpu", device_memory_gib=(xla + splash) / 2 / 0.9)
    with pytest.raises(PlanError) as info:
        check_fits(plan(between))
    assert dict(info.value.suggestions)[("model.attention_impl=splash",)] == pytest.approx(splash)
    path = tmp_path / "tpu.json"
    path.write_text(json.dumps(to_dict(between)))
    fixed = plan(load_config(PlanConfig, path, ["model.attention_impl=splash"]))
    check_fits(fixed)
    assert fixed.total_bytes / GiB == pytest.approx(splash)
    with pytest.raises(PlanError) as info:
        check_fits(plan(dataclasses.replace(between, backend="gpu")))
    assert ("model.attention_impl=splash",) not in dict(info.value.suggestions)


def test_fit_check_says_when_nothing_fits():
    tiny_device = cfg(device_memory_gib=1e-4)  # 0.1 MiB: not even the parameters
    with pytest.raises(PlanError, match=r"with remat=true, batch_size=1, grad_accum_steps=8 it still needs "
                                        r".*: use more devices"):
        check_fits(plan(tiny_device))


def test_fit_check_passes_when_it_fits():
    check_fits(plan(cfg(devices=8, mesh=MeshConfig(fsdp=8), remat=True)))


# ---------------------------------------------------------------------------- compiler


def test_compiled_in_child_on_8_simulated_devices():
    one_layer = LLAMA.replace(n_layers=1)
    p = plan(cfg(model=one_layer, devices=8, mesh=MeshConfig(fsdp=8), compile="cpu", compile_layers=0))
    k = p.compiled
    assert (k.backend, k.devices, k.layers) == ("cpu", 8, (1,))
    state = p.phase_bytes("state")  # params + Adam moments, sharded (checked by hand above)
    scalars = 4 + 8  # step (int32) and rng key (uint32[2]), replicated
    batch = 3 * 8 * 64 * 4  # tokens, mask, loss_mask: int32 [8, 64]
    assert k.argument_bytes == state + scalars + batch // 8
    assert k.alias_bytes == state + scalars  # the donated train state
    unsharded = 3 * 4 * llama_count(one_layer) + scalars + batch
    assert k.argument_bytes < unsharded / 4
    assert k.temp_bytes > 0 and k.peak_bytes > k.argument_bytes


@pytest.mark.slow
def test_compiled_sharded_vs_replicated_and_extrapolation():
    out = run_on_devices("""
        import json
        from rlhf_jax.model import ModelConfig
        from rlhf_jax.plan import PlanConfig, compiled_memory
        from rlhf_jax.sharding import MeshConfig
        m = ModelConfig(arch="llama", vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                        d_ff=96, tie_embeddings=False)
        def run(**kw):
            c = PlanConfig(model=m, devices=8, batch_size=8, seq_len=64, compile="local", **kw)
            return compiled_memory(c).__dict__
        print(json.dumps({"fsdp": run(mesh=MeshConfig(fsdp=8), compile_layers=0),
                          "fsdp_extrapolated": run(mesh=MeshConfig(fsdp=8), compile_layers=2),
                          "data": run(mesh=MeshConfig(data=8, fsdp=1), compile_layers=0)}))
    """, timeout=240)
    r = json.loads(out.strip().splitlines()[-1])
    assert 0 < r["fsdp"]["argument_bytes"] < r["data"]["argument_bytes"] / 4
    assert r["fsdp_extrapolated"]["layers"] == [1, 2]
    for key in ("argument_bytes", "output_bytes", "alias_bytes"):
        assert r["fsdp_extrapolated"][key] == r["fsdp"][key]
    assert r["fsdp_extrapolated"]["temp_bytes"] == pytest.approx(r["fsdp"]["temp_bytes"], rel=0.02)


# ------------------------------------------------------------------------ config errors


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of 'model'"):
        PlanConfig(model=LLAMA, hf_config="x.json")
    with pytest.raises(ConfigError, match=r"batch_size = 12 .* 8 batch shards"):
        cfg(devices=8, mesh=MeshConfig(fsdp=8), batch_size=12)
    with pytest.raises(ConfigError, match=r"PlanConfig.compile_layers"):
        cfg(compile_layers=1)
    with pytest.raises(ConfigError, match=r"PlanConfig.mesh: .*does not match the 8 devices"):
        cfg(devices=8, mesh=MeshConfig(fsdp=4))
    with pytest.raises(ConfigError, match=r"max_len=96"):
        plan(cfg(model=GPT2, seq_len=128))
    with pytest.raises(ConfigError, match=r"cannot read .*missing.json"):
        plan(PlanConfig(hf_config=str(tmp_path / "missing.json"), devices=1, compile="none"))


def test_hf_config_is_read(tmp_path):
    hf = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    p = plan(PlanConfig(hf_config=str(tmp_path), devices=1, batch_size=8, seq_len=64, compile="none"))
    assert p.n_params == llama_count(LLAMA)


# -------------------------------------------------------------------------------- CLI


def test_main_exit_codes(tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"model": to_dict(LLAMA), "devices": 1, "mesh": {"data": 1, "fsdp": 1},
                                "batch_size": 8, "seq_len": 64}))
    assert cli_main(["plan", "--config", str(path), "--no-compile"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
    assert cli_main(["plan", "--config", str(path), "--no-compile", "--set", "device_memory_gib=0.001"]) == 1
    assert "needs" in capsys.readouterr().err
    assert cli_main(["plan", "--config", str(path), "--set", "mesh.fsdpp=2"]) == 2
    assert "mesh.fsdpp" in capsys.readouterr().err


# ------------------------------------------------------------------ GRPO / RLOO and DPO


def test_grpo_plan_is_ppo_without_the_value_model_on_the_groups_rollouts():
    """GRPO on b prompts × G samples == PPO on b·G episodes minus the value model (its weights,
    optimizer, gradients, activations); no reward model drops its frozen copy; the EMA adds one
    float32 policy."""
    lm = llama_count(LLAMA)
    value = lm - LLAMA.d_model * LLAMA.vocab_size + LLAMA.d_model + 1
    shape = dict(ppo_minibatches=2, prompt_len=16, max_new_tokens=16, ptx_batch_size=2, seq_len=32)
    grpo = plan(cfg(stage="grpo", batch_size=4, group_size=4, **shape))
    ppo = plan(cfg(stage="ppo", batch_size=16, **shape))
    assert grpo.row_bytes("params") == grpo.row_bytes("gradients") == 4 * lm
    assert ppo.row_bytes("params") - grpo.row_bytes("params") == 4 * value
    assert grpo.row_bytes("frozen models") == ppo.row_bytes("frozen models") == 4 * (lm + value)
    for row in ("KV cache", "logits (scoring)", "logits"):
        assert grpo.row_bytes(row) == ppo.row_bytes(row) > 0, row
    model = LLAMA.replace(dtype="bfloat16")
    assert grpo.row_bytes("KV cache") == kv_cache_bytes(model, 16, 32)
    assert grpo.row_bytes("activations") == activation_bytes(model, 8, 32) + activation_bytes(model, 2, 32)
    gold = plan(cfg(stage="grpo", batch_size=4, group_size=4, reward_model=False, **shape))
    assert gold.row_bytes("frozen models") == 4 * lm
    ema = plan(cfg(stage="grpo", batch_size=4, group_size=4, ema=True, **shape))
    assert ema.row_bytes("EMA weights") == 4 * lm and ema.total_bytes - grpo.total_bytes == 4 * lm
    ppo_gold_ema = plan(cfg(stage="ppo", batch_size=16, reward_model=False, ema=True, **shape))  # PPO's options too
    assert ppo_gold_ema.total_bytes - ppo.total_bytes == 4 * lm - 4 * value
    assert "rollout 4 × 4 samples × (16 + 16) tokens" in grpo.table()
    with pytest.raises(ConfigError, match="PlanConfig.batch_size"):
        cfg(stage="grpo", batch_size=3, group_size=3, ppo_minibatches=2)
    # On 8 batch shards: the 8 prompts divide, but not a minibatch of their samples (8 × 2 / 4 = 4 rows);
    # and 4 × 8 / 2 = 16 rows would divide, but not the 4 prompts.
    eight = dict(devices=8, mesh=MeshConfig(fsdp=8), **{**shape, "ptx_batch_size": 8})
    del eight["ppo_minibatches"]
    with pytest.raises(ConfigError, match=r"PlanConfig.batch_size × group_size / ppo_minibatches = 4 does not divide "
                                          r"over the mesh's 8 batch shards"):
        cfg(stage="grpo", batch_size=8, group_size=2, ppo_minibatches=4, **eight)
    with pytest.raises(ConfigError, match=r"PlanConfig.batch_size = 4 does not divide over the mesh's 8"):
        cfg(stage="grpo", batch_size=4, group_size=8, ppo_minibatches=2, **eight)
    assert plan(cfg(stage="grpo", batch_size=8, group_size=4, ppo_minibatches=4, **eight)).total_bytes > 0


def test_dpo_plan_is_sft_on_the_b_k_sequences_plus_the_frozen_reference():
    """DPO on b prompts × K responses of L tokens == SFT on b·K sequences, plus the reference's
    weights (float32: 4 bytes a parameter) and its logits with their log-softmax (8 bytes an entry)."""
    lm = llama_count(LLAMA)
    b, k, length, vocab = 2, 3, 64, LLAMA.vocab_size
    dpo = plan(cfg(stage="dpo", batch_size=b, k_responses=k, seq_len=length))
    sft = plan(cfg(stage="sft", batch_size=b * k, seq_len=length))
    for row in ("params", "optimizer", "gradients", "activations"):
        assert dpo.row_bytes(row) == sft.row_bytes(row), row
    assert dpo.row_bytes("frozen models") == 4 * lm
    assert dpo.row_bytes("logits (reference)") == 8 * b * k * length * vocab
    assert dpo.total_bytes == sft.total_bytes + 4 * lm + 8 * b * k * length * vocab
    assert "batch 2 prompts × 3 responses × 64 tokens" in dpo.table()
    with pytest.raises(ConfigError, match="k_responses"):
        cfg(stage="dpo", k_responses=1)
