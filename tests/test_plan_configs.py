"""The real-size plan configs (`experiments/configs/plan_*_sft_*.json`, issue 16 item 6) load,
read their Hugging Face `config.json`, and plan with the verdicts `docs/plans.md` shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_jax.configs import load_config

ROOT = Path(__file__).resolve().parents[1]
# config -> (layers, vocabulary, fits the target)
PLANS = {
    "plan_llama_3_2_1b_sft_8xh100.json": (16, 128256, True),
    "plan_llama_3_2_1b_sft_v5e8.json": (16, 128256, True),
    "plan_gemma_3_4b_sft_8xh100.json": (34, 262208, True),
    "plan_gemma_3_4b_sft_v5e8.json": (34, 262208, True),
    "plan_qwen3_8b_sft_8xh100.json": (36, 151936, True),
    "plan_qwen3_8b_sft_v5e8.json": (36, 151936, False),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_real_size_plan_configs(name, monkeypatch):
    from rlhf_jax.plan import PlanConfig, plan

    monkeypatch.chdir(ROOT)  # hf_config paths are relative to the repository
    cfg = load_config(PlanConfig, ROOT / "experiments" / "configs" / name, ["compile=none"])
    result = plan(cfg)
    n_layers, vocab, fits = PLANS[name]
    model = cfg.model_config()
    assert (model.n_layers, model.vocab_size, cfg.devices) == (n_layers, vocab, 8)
    assert cfg.device_memory_gib == (16 if name.endswith("v5e8.json") else 80)
    assert result.fits == fits
