"""Direct preference optimisation: losses on sequence log-probabilities (DPO, IPO, hinge,
robust), K-way rankings as pairs, and the loss of a batch of ranked comparisons under a model.

Every variant is a function of the implicit reward margin

    h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]

of a preferred response ``y_w`` ("chosen") over a dispreferred ``y_l`` ("rejected"). The
formulas follow TRL 1.16.0's ``DPOTrainer._compute_loss`` (``f_divergence_type="reverse_kl"``),
checked by ``tests/test_dpo.py`` against golden numbers made by running that code.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import token_logprobs
from rlhf_jax.masked import masked_mean
from rlhf_jax.model import Params, Transformer, forward

DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference loss of a batch of pairs, the mean over (unmasked) pairs of one of (``loss_type``, static):

    * ``"sigmoid"``: ``−log σ(β·h)`` (DPO, Rafailov et al. 2023, eq. 7). With
      ``label_smoothing = ε > 0`` it is conservative DPO, ``−(1 − ε)·log σ(β·h) − ε·log σ(−β·h)``
      (Mitchell 2023, "A note on DPO with noisy preferences"; the DPO authors' reference code and
      TRL before 1.0). **TRL 1.16.0's "sigmoid" ignores ``label_smoothing``**; there it only enters
      ``"robust"`` (and losses not provided here).
    * ``"ipo"``: ``(h̄ − 1/(2β))²`` (IPO, Azar et al. 2023, eq. 17, with β as τ). TRL 1.16.0 (and the
      IPO authors' runs) use the *per-token average* log-ratios ``h̄ = Δ_w/|y_w| − Δ_l/|y_l|``: pass
      ``chosen_lengths``/``rejected_lengths`` (response token counts, floored at 1) for that, or
      leave them ``None`` for the paper's sequence sums.
    * ``"hinge"``: ``max(0, 1 − β·h)`` (SLiC-HF, Zhao et al. 2023, eq. 2, divided by its margin δ = 1/β).
    * ``"robust"``: ``[−(1 − ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)``, an unbiased loss under
      preference labels flipped with probability ε (rDPO, Chowdhury et al. 2024, eq. 8; TRL 1.16.0
      "robust"). Needs ``0 ≤ ε < 0.5``.

    Args:
      chosen_logps, rejected_logps: ``[B]`` log π_θ(y|x) of each response, summed over its tokens
        (``sequence_logprobs`` summed under the response mask).
      ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference.
      beta: β, the KL-regularisation strength (DPO: 0.1; TRL's default 0.1).
      loss_type: see above.
      label_smoothing: ε, the assumed label-noise rate (``"sigmoid"`` and ``"robust"`` only).
      chosen_lengths, rejected_lengths: ``[B]`` response token counts (``"ipo"`` only), or ``None``.
      mask: optional ``[B]``; 0 drops a pair (padding, e.g. from ``ranked_pairs``) from the loss and
        the stats, even if its log-probs are not finite. With no pair left the loss is 0.

    Returns:
      ``(loss, stats)``; stats (no gradient, TRL's metric names): ``rewards_chosen`` and
      ``rewards_rejected`` (mean implicit rewards ``β·(log π_θ − log π_ref)``), ``margin`` (their
      mean difference) and ``accuracy`` (fraction of pairs with a strictly larger chosen reward).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if label_smoothing and loss_type not in ("sigmoid", "robust"):
        raise ValueError(f"dpo_loss: label_smoothing applies to 'sigmoid' and 'robust' only, got "
                         f"label_smoothing={label_smoothing!r} with loss_type={loss_type!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if (chosen_lengths is None) != (rejected_lengths is None) or (chosen_lengths is not None and loss_type != "ipo"):
        raise ValueError("dpo_loss: chosen_lengths and rejected_lengths go together, and only with loss_type='ipo'")
    logps = [chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps]
    chex.assert_rank(chosen_logps, 1, custom_message="dpo_loss: `chosen_logps` must be [B]")
    chex.assert_equal_shape(logps, custom_message="dpo_loss: the four log-prob arrays must share one shape [B]")
    dtype = jnp.promote_types(jnp.result_type(*logps), jnp.float32)
    if mask is None:
        keep = jnp.ones(chosen_logps.shape, dtype)
    else:
        chex.assert_equal_shape([chosen_logps, mask], custom_message="dpo_loss: `mask` must be [B] like the log-probs")
        keep = (jnp.asarray(mask) != 0).astype(dtype)
    # log π_θ − log π_ref of each response, 0 for a dropped pair (so no NaN reaches a gradient)
    chosen = jnp.where(keep != 0, chosen_logps - ref_chosen_logps, 0).astype(dtype)
    rejected = jnp.where(keep != 0, rejected_logps - ref_rejected_logps, 0).astype(dtype)
    eps = label_smoothing

    if loss_type == "ipo":
        if chosen_lengths is None:
            h = chosen - rejected
        else:
            chex.assert_equal_shape([chosen_logps, chosen_lengths, rejected_lengths],
                                    custom_message="dpo_loss: the lengths must be [B] like the log-probs")
            h = chosen / jnp.maximum(chosen_lengths, 1) - rejected / jnp.maximum(rejected_lengths, 1)
        per_pair = jnp.square(h - 1 / (2 * beta))
    else:
        logits = beta * (chosen - rejected)
        if loss_type == "hinge":
            per_pair = jax.nn.relu(1 - logits)
        elif loss_type == "sigmoid":
            per_pair = -(1 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
        else:
            per_pair = (-(1 - eps) * jax.nn.log_sigmoid(logits) + eps * jax.nn.log_sigmoid(-logits)) / (1 - 2 * eps)

    rewards_chosen = beta * chosen
    rewards_rejected = beta * rejected
    stats = {
        "rewards_chosen": masked_mean(rewards_chosen, keep),
        "rewards_rejected": masked_mean(rewards_rejected, keep),
        "margin": masked_mean(rewards_chosen - rewards_rejected, keep),
        "accuracy": masked_mean((rewards_chosen > rewards_rejected).astype(dtype), keep),
    }
    return masked_mean(per_pair, keep), jax.lax.stop_gradient(stats)


def ranked_pairs(
    x: jax.Array,
    mask: jax.Array,
    *,
    best_vs_rest: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The preference pairs of K-way rankings, for ``dpo_loss``.

    Responses are best-first (as the comparison readers give them), so response ``i`` is preferred
    to ``j`` when ``i < j``. All C(K, 2) pairs of each prompt are taken (InstructGPT §3.5 trains
    its reward model on all of them), or with ``best_vs_rest=True`` only the K − 1 pairs of the
    best response against each other one. Each pair then weighs the same in ``dpo_loss`` (not each
    prompt, as in ``ranking_loss``).

    Args:
      x: ``[b, K]`` per-response values, e.g. sequence log-probs (call once for the policy's and
        once for the reference's).
      mask: ``[b, K]`` 1 for a real response, 0 for padding.
      best_vs_rest: static.

    Returns:
      ``(chosen, rejected, pair_mask)``, each ``[b · P]`` with ``P`` = C(K, 2) or K − 1, pairs of
      one prompt consecutive; ``pair_mask`` is 1 where both responses are real.
    """
    chex.assert_rank(x, 2, custom_message="ranked_pairs: `x` must be [b, K]")
    chex.assert_equal_shape([x, mask], custom_message="ranked_pairs: `mask` must be [b, K] like `x`")
    k = x.shape[1]
    if best_vs_rest:
        i, j = np.zeros(k - 1, int), np.arange(1, k)
    else:
        i, j = np.triu_indices(k, 1)
    keep = (jnp.asarray(mask) != 0)
    return x[:, i].reshape(-1), x[:, j].reshape(-1), (keep[:, i] & keep[:, j]).reshape(-1)


def response_logprobs(model: Transformer, params: Params, tokens: jax.Array, mask: jax.Array,
                      loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs of the response tokens of each sequence, and their count.

    Args:
      tokens, mask: ``[n, L]`` right-padded ``prompt response`` rows.
      loss_mask: ``[n, L]`` 1 at the response tokens (aligned with ``tokens``, as ``sft_loss``'s:
        ``loss_mask[:, t] = 1`` counts ``log p(tokens[:, t] | tokens[:, :t])``).

    Returns:
      ``(logps, lengths)``, both ``[n]`` float32: ``Σ_t loss_mask_t · log π(tokens_t | ·)`` and
      ``Σ_t loss_mask_t``. The full ``[n, L, V]`` logits are built (no ``logits_chunk`` path).
      The cuDNN attention masks the rows by their lengths (``model.forward``'s ``right_padded``).
    """
    logits = forward(model, params, tokens, mask, right_padded=True).logits
    keep = loss_mask[:, 1:] != 0
    logps = jnp.sum(jnp.where(keep, token_logprobs(logits, tokens), 0), axis=1)
    return logps, jnp.sum(keep, axis=1).astype(logps.dtype)


def dpo_batch_loss(
    model: Transformer,
    params: Params,
    ref_params: Params | None,
    batch: dict[str, jax.Array],
    *,
    beta: float | jax.Array,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    best_vs_rest: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``dpo_loss`` of a batch of K-way comparisons under the policy ``params`` and the frozen
    reference ``ref_params``, over all pairs of each ranking (or best vs. rest, ``ranked_pairs``).

    ``batch``: ``tokens``, ``mask``, ``loss_mask`` ``[b, K, L]`` (each response as a right-padded
    ``prompt response`` row, ``loss_mask`` marking the response tokens) and ``valid`` ``[b, K]``
    (responses best-first, padding 0). ``"ipo"`` averages the log-ratios per response token, as TRL.
    The reference pass carries no gradient.  With ``ref_params=None`` the batch carries the
    reference's summed response log-probs instead, ``ref_logps`` ``[b, K]`` (``response_logprobs``
    computed once before training, as TRL's ``precompute_ref_log_probs``: the reference is frozen).
    """
    b, k, length = batch["tokens"].shape
    flat = [batch[key].reshape(b * k, length) for key in ("tokens", "mask", "loss_mask")]
    logps, lengths = response_logprobs(model, params, *flat)
    if ref_params is None:
        if "ref_logps" not in batch:
            raise ValueError("dpo_batch_loss: ref_params is None, so the batch needs `ref_logps` [b, K]")
        ref_logps = jax.lax.stop_gradient(batch["ref_logps"]).reshape(b * k)
    else:
        ref_logps, _ = jax.lax.stop_gradient(response_logprobs(model, ref_params, *flat))
    pairs = [ranked_pairs(x.reshape(b, k), batch["valid"], best_vs_rest=best_vs_rest)
             for x in (logps, ref_logps, lengths)]
    (chosen, rejected, pair_mask), (ref_chosen, ref_rejected, _), (len_chosen, len_rejected, _) = pairs
    lengths_kw = {"chosen_lengths": len_chosen, "rejected_lengths": len_rejected} if loss_type == "ipo" else {}
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, mask=pair_mask, **lengths_kw)
