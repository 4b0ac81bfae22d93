"""Parity with Hugging Face TRL 1.9.0's PPO reward / advantage / loss arithmetic.

The reference numbers were produced by executing TRL's own code in float64 (see
``../shared/parity/README.md``). They are rebuilt here from our public functions only; the glue
below expresses TRL's conventions (which are not our defaults) with their options.
"""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.advantages import gae, last_index, per_token_rewards, whiten
from rlhf_jax.losses import ppo_policy_loss, value_loss

PARITY_FILE = Path(__file__).parents[2] / "shared" / "parity" / "trl_ppo_v1.9.0.json"
PAD_ID, EOS_ID = 0, 2
TOL = 1e-6


def load_reference() -> dict:
    if not PARITY_FILE.exists():
        pytest.skip(f"TRL parity numbers not found at {PARITY_FILE} (../shared beside the checkout)")
    return json.loads(PARITY_FILE.read_text())



def trl_ppo_math(inputs: dict, args: dict, loss_inputs: dict, gae_mask: str) -> dict:
    responses = np.asarray(inputs["responses"])
    length = responses.shape[1]
    t = np.arange(length)[None]
    # 1. truncate after the first stop token (EOS); s = index of the last real token
    is_eos = responses == EOS_ID
    after_stop = np.cumsum(is_eos, axis=1) - is_eos > 0
    responses = np.where(after_stop, PAD_ID, responses)
    s = np.asarray(last_index(jnp.asarray(responses != PAD_ID)))
    # 2. policy mask t <= s, value mask t <= s + 1
    policy_mask = jnp.asarray(t <= s[:, None])
    value_mask = jnp.asarray(t <= s[:, None] + 1)
    # 3. log-probs at masked positions are 1.0, values beyond the value mask 0
    old_logprobs = jnp.where(policy_mask, jnp.asarray(inputs["logprobs_old"]), 1.0)
    ref_logprobs = jnp.where(policy_mask, jnp.asarray(inputs["ref_logprobs"]), 1.0)
    old_values = jnp.where(value_mask, jnp.asarray(inputs["values_old"]), 0.0)
    # 5. missing-EOS penalty
    scores = jnp.asarray(inputs["scores"], jnp.float64)
    if args["missing_eos_penalty"] is not None:
        scores = scores - args["missing_eos_penalty"] * ~jnp.asarray(is_eos.any(axis=1))
    # 4. KL penalty on the policy mask, score one token after EOS (or at s when s + 1 = L)
    rewards, _ = per_token_rewards(
        scores, old_logprobs, ref_logprobs, policy_mask,
        kl_coef=args["kl_coef"], kl_estimator=args["kl_estimator"],
        score_index=jnp.minimum(jnp.asarray(s) + 1, length - 1))
    # 6. optional reward whitening: keeps the mean, over the value mask, zero beyond it
    if args["whiten_rewards"]:
        rewards = whiten(rewards, value_mask, shift_mean=False)
    # 7. GAE: TRL loops over the full length; with rewards and values already 0 beyond the value
    # mask, our masked GAE gives the same numbers with either mask
    mask = value_mask if gae_mask == "value" else jnp.ones_like(value_mask)
    advantages, returns = gae(rewards, old_values, mask, gamma=args["gamma"], lam=args["lam"])
    advantages = whiten(advantages, policy_mask)
    # 8. losses
    pg_loss, _ = ppo_policy_loss(jnp.asarray(loss_inputs["new_logprobs"]), old_logprobs, advantages,
                                 policy_mask, clip_eps=args["cliprange"])
    vf_loss, _ = value_loss(jnp.asarray(loss_inputs["vpred"]), old_values, returns, value_mask,
                            clip_eps=args["cliprange_value"])
    return {
        "sequence_lengths": s,
        "scores_after_penalty": scores,
        "rewards": rewards,
        "advantages": advantages,
        "returns": returns,
        "pg_loss": pg_loss,
        "vf_loss": vf_loss,
        "loss": pg_loss + args["vf_coef"] * vf_loss,
    }


@pytest.mark.parametrize("gae_mask", ["value", "ones"])
@pytest.mark.parametrize("case", [0, 1, 2], ids=["k1", "k3-eos-penalty", "whiten-rewards"])
def test_matches_trl_ppo(x64, case, gae_mask):
    ref = load_reference()
    expected = ref["cases"][case]
    got = trl_ppo_math(ref["inputs"], expected["args"], expected["loss_inputs"], gae_mask)
    np.testing.assert_array_equal(got["sequence_lengths"], expected["sequence_lengths"])
    for key in ("scores_after_penalty", "rewards", "advantages", "returns", "pg_loss", "vf_loss", "loss"):
        value = np.asarray(got[key])
        assert value.dtype == np.float64, key
        np.testing.assert_allclose(value, expected[key], rtol=0, atol=TOL, err_msg=key)
