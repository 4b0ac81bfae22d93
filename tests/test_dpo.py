"""DPO-family losses: parity with TRL 1.16.0 (golden numbers made by running TRL's own
``DPOTrainer._compute_loss``, ``tests/golden/make_trl116_golden.py``) and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from golden import trl116

import optax

from rlhf_jax.dpo import dpo_batch_loss, dpo_loss, ranked_pairs
from rlhf_jax.model import ModelConfig, Transformer, forward, init_params

TOL = 1e-6
DPO = trl116()["dpo"]


def _sequence_inputs():
    """Chosen/rejected sequence log-probs (sums over the response) and response lengths."""
    token_logps = np.asarray(DPO["inputs"]["token_logps"])
    lengths = np.asarray(DPO["inputs"]["completion_mask"]).sum(axis=1)
    n = token_logps.shape[0] // 2
    seq = token_logps.sum(axis=1)
    ref_c, ref_r = (jnp.asarray(DPO["inputs"][k]) for k in ("ref_chosen_logps", "ref_rejected_logps"))
    return jnp.asarray(seq[:n]), jnp.asarray(seq[n:]), ref_c, ref_r, jnp.asarray(lengths[:n]), jnp.asarray(lengths[n:])


@pytest.mark.parametrize("case", DPO["cases"],
                         ids=lambda c: f"{c['loss_type']}-beta{c['beta']}-ls{c['label_smoothing']}")
def test_dpo_loss_matches_trl(x64, case):
    chosen, rejected, ref_c, ref_r, len_c, len_r = _sequence_inputs()
    lengths = dict(chosen_lengths=len_c, rejected_lengths=len_r) if case["loss_type"] == "ipo" else {}

    def loss_fn(c, r):
        return dpo_loss(c, r, ref_c, ref_r, beta=case["beta"], loss_type=case["loss_type"],
                        label_smoothing=case["label_smoothing"], **lengths)

    (loss, stats), (g_c, g_r) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(chosen, rejected)
    assert loss.dtype == jnp.float64
    for got, key in ((loss, "loss"), (g_c, "grad_chosen"), (g_r, "grad_rejected"),
                     (stats["rewards_chosen"], "rewards_chosen"), (stats["rewards_rejected"], "rewards_rejected"),
                     (stats["margin"], "margin"), (stats["accuracy"], "accuracy")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(case[key]), rtol=0, atol=TOL, err_msg=key)


def test_closed_forms():
    """Each variant against its formula on hand-picked margins; cDPO label smoothing included."""
    c, r = jnp.array([-3.0, -1.0]), jnp.array([-2.0, -4.0])
    rc, rr = jnp.array([-2.5, -2.0]), jnp.array([-2.5, -2.0])
    h = np.array([(-3.0 + 2.5) - (-2.0 + 2.5), (-1.0 + 2.0) - (-4.0 + 2.0)])  # [-1, 3]
    beta, eps = 0.5, 0.2
    log_sig = lambda z: -np.log1p(np.exp(-z))  # noqa: E731
    want = {
        "sigmoid": np.mean(-(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)),
        "robust": np.mean((-(1 - eps) * log_sig(beta * h) + eps * log_sig(-beta * h)) / (1 - 2 * eps)),
    }
    for loss_type, value in want.items():
        fn = jax.jit(lambda *a, lt=loss_type: dpo_loss(*a, beta=beta, loss_type=lt, label_smoothing=eps))
        loss, _ = fn(c, r, rc, rr)
        np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=loss_type)
    np.testing.assert_allclose(dpo_loss(c, r, rc, rr, beta=beta, loss_type="hinge")[0],
                               np.mean(np.maximum(0, 1 - beta * h)), rtol=1e-6)
    np.testing.assert_allclose(dpo_loss(c, r, rc, rr, beta=beta, loss_type="ipo")[0],
                               np.mean((h - 1 / (2 * beta)) ** 2), rtol=1e-6)
    _, stats = dpo_loss(c, r, rc, rr, beta=beta)
    np.testing.assert_allclose(stats["accuracy"], 0.5)
    np.testing.assert_allclose(stats["margin"], beta * h.mean(), rtol=1e-6)


def test_ranked_pairs_and_masked_loss():
    """K-way rankings (best-first, padded) become all their pairs, or best vs. rest; padded pairs
    change neither the loss nor its gradient, even when their log-probs are NaN."""
    logps = jnp.array([[-1.0, -2.0, -3.0, jnp.nan], [-4.0, -1.5, -6.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0, -2.0, jnp.nan], [-3.0, -2.0, -5.0, -2.5]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    want_all = [(b, i, j) for b in range(2) for i in range(4) for j in range(i + 1, 4) if mask[b, j]]
    want_best = [(b, 0, j) for b in range(2) for j in range(1, 4) if mask[b, j]]
    for best_vs_rest, want in ((False, want_all), (True, want_best)):
        c, r, pm = ranked_pairs(logps, mask, best_vs_rest=best_vs_rest)
        rc, rr, _ = ranked_pairs(ref, mask, best_vs_rest=best_vs_rest)
        assert c.shape == ((2 * 6,) if not best_vs_rest else (2 * 3,)) and int(pm.sum()) == len(want)
        got = {(float(c[n]), float(r[n])) for n in np.flatnonzero(pm)}
        assert got == {(float(logps[b, i]), float(logps[b, j])) for b, i, j in want}

        def loss_fn(c, r, pm=pm, rc=rc, rr=rr):
            return dpo_loss(c, r, rc, rr, beta=0.5, mask=pm)[0]

        loss, grad = jax.value_and_grad(loss_fn)(c, r)
        keep = np.flatnonzero(pm)
        want_loss = dpo_loss(c[keep], r[keep], rc[keep], rr[keep], beta=0.5)[0]
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~np.asarray(pm)] == 0)


def test_bad_arguments_are_named():
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(x, x, x, x, beta=0.1, chosen_lengths=x, rejected_lengths=x)


TINY = ModelConfig(arch="gpt2", vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_len=16)


def _comparisons():
    """2 prompts x K = 3 responses (the second prompt has 2), prompt length 3, right padded."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 16, size=(2, 3, 8)).astype(np.int32)
    resp_len = np.array([[4, 2, 5], [3, 5, 0]])
    t = np.arange(8)
    mask = (t < 3 + resp_len[..., None]).astype(np.int32)
    loss_mask = (mask == 1) & (t >= 3)
    tokens = np.where(mask == 1, tokens, 0)
    valid = (resp_len > 0).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask.astype(np.int32), "valid": valid}


def test_dpo_batch_loss_matches_numpy():
    model = Transformer(TINY)
    params, ref_params = init_params(model, jax.random.PRNGKey(0)), init_params(model, jax.random.PRNGKey(1))
    batch = _comparisons()

    def seq_logps(p):  # a plain loop over the response tokens of each row
        logits = np.asarray(forward(model, p, jnp.asarray(batch["tokens"].reshape(6, 8)),
                                    jnp.asarray(batch["mask"].reshape(6, 8))).logits, np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        toks, lm = batch["tokens"].reshape(6, 8), batch["loss_mask"].reshape(6, 8)
        sums = [sum(logp[n, t - 1, toks[n, t]] for t in range(1, 8) if lm[n, t]) for n in range(6)]
        return np.array(sums).reshape(2, 3)

    h = seq_logps(params) - seq_logps(ref_params)
    beta = 0.3
    for best_vs_rest in (False, True):
        pairs = [(b, i, j) for b in range(2) for i in range(3) for j in range(i + 1, 3)
                 if batch["valid"][b, j] and (i == 0 or not best_vs_rest)]
        want = np.mean([np.log1p(np.exp(-beta * (h[b, i] - h[b, j]))) for b, i, j in pairs])
        loss, stats = jax.jit(lambda p, r, bt, bv=best_vs_rest: dpo_batch_loss(
            model, p, r, bt, beta=beta, best_vs_rest=bv))(params, ref_params, batch)
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_dpo_batch_loss_learns_the_preferences():
    model = Transformer(TINY)
    params = init_params(model, jax.random.PRNGKey(0))
    batch = _comparisons()
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, opt):
        (loss, stats), g = jax.value_and_grad(
            lambda q: dpo_batch_loss(model, q, params, batch, beta=0.5), has_aux=True)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss, stats

    p, opt = params, tx.init(params)
    losses = []
    for _ in range(15):
        p, opt, loss, stats = step(p, opt)
        losses.append(float(loss))
    np.testing.assert_allclose(losses[0], np.log(2), rtol=1e-5)  # the policy starts at the reference
    assert losses[-1] < 0.5 * losses[0] and float(stats["accuracy"]) == 1.0, losses


def test_dpo_batch_loss_with_precomputed_reference():
    """``ref_params=None`` with the reference's ``response_logprobs`` in the batch is the same loss."""
    from rlhf_jax.dpo import response_logprobs

    model = Transformer(TINY)
    params, ref_params = init_params(model, jax.random.PRNGKey(0)), init_params(model, jax.random.PRNGKey(1))
    batch = {k: jnp.asarray(v) for k, v in _comparisons().items()}
    flat = [batch[k].reshape(6, 8) for k in ("tokens", "mask", "loss_mask")]
    ref_logps = response_logprobs(model, ref_params, *flat)[0].reshape(2, 3)
    for loss_type in ("sigmoid", "ipo"):
        want = dpo_batch_loss(model, params, ref_params, batch, beta=0.3, loss_type=loss_type)
        got = dpo_batch_loss(model, params, None, {**batch, "ref_logps": ref_logps}, beta=0.3, loss_type=loss_type)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), want, got)
    with pytest.raises(ValueError, match="ref_logps"):
        dpo_batch_loss(model, params, None, batch, beta=0.3)


def test_comparison_loss_mask_marks_each_response_as_sft_does():
    """``tokenize_comparisons(with_loss_mask=True)``: row k of a comparison has the tokens and
    ``loss_mask`` of ``tokenize_demonstrations`` on (prompt, response k); padding rows are empty."""
    from rlhf_jax.data import Comparison, Demonstration, tokenize_comparisons, tokenize_demonstrations
    from rlhf_jax.tokenizer import Tokenizer

    records = [Comparison("list the big red", (" big red", " red big ok", " no")),
               Comparison("say two", (" two", " three"))]
    tok = Tokenizer.train(["list the big red big red ok no", "say two three"] * 20, 280)
    arrays = tokenize_comparisons(records, tok, 3, 16, with_loss_mask=True)
    assert set(arrays) == {"tokens", "mask", "valid", "loss_mask"}
    for i, rec in enumerate(records):
        demos = tokenize_demonstrations([Demonstration(rec.prompt, r) for r in rec.responses], tok, (16,))
        for k in range(len(rec.responses)):
            for key in ("tokens", "mask", "loss_mask"):
                np.testing.assert_array_equal(arrays[key][i, k], demos[key][k], err_msg=f"{i} {k} {key}")
    assert arrays["loss_mask"][1, 2].sum() == 0 and arrays["valid"][1, 2] == 0
    assert "loss_mask" not in tokenize_comparisons(records, tok, 3, 16)
