"""Write ``tests/golden/trl116.json``: fixed inputs run through TRL 1.16.0's own trainer code.

Run it with TRL 1.16.0 and PyTorch in a separate environment (not the project's: trl pins its own
transformers), from the repository root:

    python3 -m venv /tmp/trl116 && /tmp/trl116/bin/pip install torch==2.13.0 trl==1.16.0
    /tmp/trl116/bin/python tests/golden/make_trl116_golden.py

Nothing here re-implements TRL's arithmetic. Each trainer method is called unbound on a minimal
stand-in object carrying only the attributes that method reads; model forward passes,
generation and reward functions are replaced by stubs that return the fixed inputs. Everything
runs in float64 on the CPU, in TRL's "eval" mode (no gradient-accumulation scaling). Covered:

* ``GRPOTrainer._generate_and_score_completions``: group advantages for ``scale_rewards`` group,
  batch and none, with an unscorable completion (reward NaN) and a group of equal rewards.
* ``GRPOTrainer._compute_loss``: every ``loss_type`` in grpo, bnpo, dr_grpo, dapo × importance
  level token and sequence (GSPO) × β in {0, 0.04}, asymmetric clipping (0.2, 0.28), with the
  loss, its gradient with respect to the policy log-probs, and the kl / clip-ratio metrics.
* ``RLOOTrainer._generate_and_score_completions``: leave-one-out advantages, β in {0, 0.05} (the
  k1 KL folded into the reward), with and without ``normalize_advantages``.
* ``RLOOTrainer._compute_loss``: the sequence-level clipped loss and its gradient.
* ``DPOTrainer._compute_loss``: sigmoid, ipo, hinge, and robust with label smoothing, with the
  loss, its gradient with respect to the sequence log-probs, and the reward metrics.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer

OUT = Path(__file__).with_name("trl116.json")
PAD = 0
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
GARBAGE = 7.0  # log-prob value at padded positions: must not leak into any result


def _identity(x, **_):
    return x


def _accelerator() -> SimpleNamespace:
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0, gather=_identity,
                           gather_for_metrics=_identity, reduce=_identity)


def _stand_in(**attrs) -> SimpleNamespace:
    """The attributes every trainer method below reads, plus ``attrs``."""
    base = dict(accelerator=_accelerator(), model=SimpleNamespace(training=False, is_gradient_checkpointing=False),
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, aux_loss_enabled=False)
    return SimpleNamespace(**{**base, **attrs})


def _t(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def _lists(x: np.ndarray) -> list:
    return np.asarray(x, dtype=np.float64).tolist()


# ---------------------------------------------------------------- inputs

rng = np.random.default_rng(116)
B, T, G = 8, 7, 4  # 2 prompts x 4 samples, 7 response tokens
lengths = np.array([7, 3, 1, 5, 6, 2, 7, 4])
mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
old = -rng.uniform(0.2, 3.0, (B, T))
row_shift = np.array([0.35, 0.0, -0.4, 0.0, 0.3, 0.0, 0.0, -0.3])[:, None]  # clips some sequence-level ratios
new = old + rng.normal(0, 0.3, (B, T)) + row_shift
ref = old + rng.normal(0, 0.2, (B, T))
old, new, ref = (np.where(mask == 1, x, GARBAGE) for x in (old, new, ref))
advantages = rng.normal(0, 1, B)

# group-advantage inputs: 3 prompts x 4 samples; one unscorable sample (NaN), one group all equal
B_ADV = 12
rewards = rng.normal(0, 1, B_ADV).round(3)
rewards[4:8] = 0.5
rewards[9] = np.nan
adv_lengths = rng.integers(1, T + 1, B_ADV)
adv_lengths[0] = T  # the padded completion width is the longest completion
adv_mask = (np.arange(T)[None] < adv_lengths[:, None]).astype(np.int64)
adv_old = np.where(adv_mask == 1, -rng.uniform(0.2, 3.0, (B_ADV, T)), GARBAGE)
adv_ref = np.where(adv_mask == 1, adv_old + rng.normal(0, 0.3, (B_ADV, T)), GARBAGE)

# DPO inputs: 5 pairs, per-token log-probs over prompt + response, 0 outside the response
N_PAIRS, L = 5, 9
prompt_len = 3
resp_len = rng.integers(1, L - prompt_len + 1, 2 * N_PAIRS)
completion_mask = ((np.arange(L)[None] >= prompt_len) & (np.arange(L)[None] < prompt_len + resp_len[:, None]))
token_logps = np.where(completion_mask[:, 1:], -rng.uniform(0.1, 2.5, (2 * N_PAIRS, L - 1)), 0.0)
ref_seq = token_logps.sum(1) + rng.normal(0, 1.5, 2 * N_PAIRS)


# ---------------------------------------------------------------- GRPO / RLOO

def _completions(n: int, comp_mask: np.ndarray) -> tuple[list, list, list]:
    prompt_ids = [[5, 6, 7]] * n
    completion_ids = [[9] * int(k) for k in comp_mask.sum(1)]
    return prompt_ids, completion_ids, [f"c{i}" for i in range(n)]


def _logps_stub(pick):
    """A ``_get_per_token_logps_and_entropies`` returning the fixed log-probs ``pick(model)``."""

    def stub(model, *args, **kwargs):
        logps = pick(model)
        return logps, torch.zeros_like(logps), None

    return stub


def grpo_advantages(scale: str) -> dict:
    prompt_ids, completion_ids, completions = _completions(B_ADV, adv_mask)
    model = SimpleNamespace(training=False, is_gradient_checkpointing=False)
    s = _stand_in(
        model=model, environment_factories=None, tools=[], environments=None,
        _tokenizer=SimpleNamespace(pad_token_id=PAD), pad_to_multiple_of=None, mask_truncated_completions=False,
        num_iterations=1, beta=0.0, use_vllm=False,
        args=SimpleNamespace(per_device_eval_batch_size=B_ADV, steps_per_generation=1, gradient_accumulation_steps=1,
                             gradient_checkpointing_kwargs=None),
        _generate=lambda prompts: (prompt_ids, completion_ids, None, completions, None, {}, None, None),
        _calculate_rewards=lambda inputs, prompts, completions, ids: _t(rewards[:, None]),
        num_generations_eval=G, multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1, dtype=torch.float64), scale_rewards=scale, reward_func_names=["r"],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False)
    out = GRPOTrainer._generate_and_score_completions(s, [{"prompt": f"p{i}"} for i in range(B_ADV)])
    return {"scale": scale, "group_size": G, "advantages": _lists(out["advantages"])}


def grpo_loss_case(loss_type: str, level: str, beta: float, max_completion_length: int, num_items: float) -> dict:
    logps = _t(new).requires_grad_(True)
    s = _stand_in(
        _get_per_token_logps_and_entropies=_logps_stub(lambda model: logps),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None), max_completion_length=max_completion_length,
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False)
    inputs = {"prompt_ids": torch.full((B, 3), 5), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.full((B, T), 9), "completion_mask": torch.tensor(mask),
              "advantages": _t(advantages), "old_per_token_logps": _t(old),
              "num_items_in_batch": torch.tensor(num_items, dtype=torch.float64)}
    if beta:
        inputs["ref_per_token_logps"] = _t(ref)
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    loss.backward()
    metrics = s._metrics["eval"]
    return {"loss_type": loss_type, "importance_level": level, "beta": beta,
            "max_completion_length": max_completion_length, "num_items_in_batch": num_items,
            "loss": loss.item(), "grad": _lists(logps.grad),
            "kl": metrics["kl"][0] if beta else 0.0,
            "clip_low_frac": metrics["clip_ratio/low_mean"][0], "clip_high_frac": metrics["clip_ratio/high_mean"][0],
            "clip_frac": metrics["clip_ratio/region_mean"][0]}


def rloo_advantages(beta: float, normalize: bool) -> dict:
    prompt_ids, completion_ids, completions = _completions(B_ADV, adv_mask)
    model = SimpleNamespace(training=False, is_gradient_checkpointing=False)
    ref_model = SimpleNamespace()
    s = _stand_in(
        model=model, ref_model=ref_model, _tokenizer=SimpleNamespace(pad_token_id=PAD), pad_to_multiple_of=None,
        mask_truncated_completions=False, beta=beta,
        args=SimpleNamespace(per_device_eval_batch_size=B_ADV, gradient_checkpointing_kwargs=None),
        _generate=lambda prompts: (prompt_ids, completion_ids, completions),
        _get_per_token_logps_and_entropies=_logps_stub(lambda m: _t(adv_old) if m is model else _t(adv_ref)),
        _calculate_rewards=lambda inputs, prompts, completions, ids: _t(rewards[:, None]),
        num_generations_eval=G, reward_weights=torch.ones(1, dtype=torch.float64), reward_clip_range=None,
        normalize_advantages=normalize, reward_func_names=["r"],
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)},
        _pending_extra_logs={}, _pending_metrics={}, log_multimodal=False)
    out = RLOOTrainer._generate_and_score_completions(s, [{"prompt": f"p{i}"} for i in range(B_ADV)])
    return {"beta": beta, "normalize": normalize, "group_size": G, "advantages": _lists(out["advantages"]),
            "old_logps": _lists(out["old_logps"])}


def rloo_loss() -> dict:
    logps = _t(new).requires_grad_(True)
    s = _stand_in(_get_per_token_logps_and_entropies=_logps_stub(lambda model: logps),
                  epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH)
    inputs = {"prompt_ids": torch.full((B, 3), 5), "prompt_mask": torch.ones(B, 3, dtype=torch.long),
              "completion_ids": torch.full((B, T), 9), "completion_mask": torch.tensor(mask),
              "advantages": _t(advantages), "old_logps": (_t(old) * torch.tensor(mask)).sum(1)}
    loss = RLOOTrainer._compute_loss(s, None, inputs)
    loss.backward()
    metrics = s._metrics["eval"]
    return {"loss": loss.item(), "grad": _lists(logps.grad), "clip_low_frac": metrics["clip_ratio/low_mean"][0],
            "clip_high_frac": metrics["clip_ratio/high_mean"][0], "clip_frac": metrics["clip_ratio/region_mean"][0]}


# ---------------------------------------------------------------- DPO

def dpo_case(loss_type: str, beta: float, label_smoothing: float) -> dict:
    logps = _t(token_logps).requires_grad_(True)  # [chosen; rejected] x (L - 1)

    def model(**kwargs):
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    s = _stand_in(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
                  loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
                  _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.full((2 * N_PAIRS, L), 9), "attention_mask": torch.ones(2 * N_PAIRS, L),
              "completion_mask": torch.tensor(completion_mask.astype(np.int64)),
              "ref_chosen_logps": _t(ref_seq[:N_PAIRS]), "ref_rejected_logps": _t(ref_seq[N_PAIRS:])}
    loss = DPOTrainer._compute_loss(s, model, inputs, return_outputs=False)
    loss.backward()
    grad = logps.grad[:, -1]  # the sequence log-prob is a plain sum: every position has this gradient
    metrics = s._metrics["eval"]
    return {"loss_type": loss_type, "beta": beta, "label_smoothing": label_smoothing, "loss": loss.item(),
            "grad_chosen": _lists(grad[:N_PAIRS]), "grad_rejected": _lists(grad[N_PAIRS:]),
            "rewards_chosen": metrics["rewards/chosen"][0], "rewards_rejected": metrics["rewards/rejected"][0],
            "margin": metrics["rewards/margins"][0], "accuracy": metrics["rewards/accuracies"][0]}


def main() -> None:
    grpo_cases = [grpo_loss_case(lt, level, beta, T if lt != "dr_grpo" else T + 3,
                                 float(mask.sum()) if lt != "dapo" else 2.5 * mask.sum())
                  for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for level in ("token", "sequence")
                  for beta in (0.0, 0.04)]
    golden = {
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "made_by": "tests/golden/make_trl116_golden.py",
        "grpo": {
            "inputs": {"logprobs": _lists(new), "old_logprobs": _lists(old), "ref_logprobs": _lists(ref),
                       "advantages": _lists(advantages), "mask": mask.tolist(), "clip_low": CLIP_LOW,
                       "clip_high": CLIP_HIGH},
            "cases": grpo_cases,
            "rloo_loss": rloo_loss(),
        },
        "advantages": {
            "inputs": {"rewards": [None if np.isnan(r) else float(r) for r in rewards], "mask": adv_mask.tolist(),
                       "old_logprobs": _lists(adv_old), "ref_logprobs": _lists(adv_ref)},
            "grpo": [grpo_advantages(scale) for scale in ("group", "batch", "none")],
            "rloo": [rloo_advantages(beta, norm) for beta in (0.0, 0.05) for norm in (False, True)],
        },
        "dpo": {
            "inputs": {"token_logps": _lists(token_logps), "completion_mask": completion_mask.astype(int).tolist(),
                       "ref_chosen_logps": _lists(ref_seq[:N_PAIRS]), "ref_rejected_logps": _lists(ref_seq[N_PAIRS:])},
            "cases": [dpo_case("sigmoid", 0.1, 0.0), dpo_case("sigmoid", 0.5, 0.0), dpo_case("ipo", 0.1, 0.0),
                      dpo_case("ipo", 0.5, 0.0), dpo_case("hinge", 0.1, 0.0), dpo_case("hinge", 0.5, 0.0),
                      dpo_case("robust", 0.1, 0.1), dpo_case("robust", 0.5, 0.3)],
        },
    }
    assert golden["trl_version"] == "1.16.0", golden["trl_version"]
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
