"""Tests of the synthetic world (rlhf_jax.tasks): answers, gold score, labelers, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_jax.tasks import (
    DEFAULT_LABELER_NOISE,
    FAMILIES,
    LEXICON,
    WORDS,
    WORLD_FILES,
    WorldConfig,
    calibrate_noise,
    correct_answer,
    corrupt_answer,
    default_calibration_sets,
    demonstrations,
    expected_agreement,
    gold_score,
    gold_scores,
    labeler_agreement,
    make_comparisons,
    make_world_files,
    parse_prompt,
    pretraining_texts,
    rank_responses,
    sample_prompts,
    sft_like_responses,
)

REV = "reverse: cat dog red pig fig\nanswer:"  # answer: fig pig red dog cat


# --- answers -------------------------------------------------------------------------------


HAND_ANSWERS = [
    ("copy: cat dog red\nanswer:", " cat dog red"),
    ("reverse: cat dog red\nanswer:", " red dog cat"),
    ("sort: pear apple red cat\nanswer:", " apple cat pear red"),
    ("count: cat dog red\nanswer:", " three"),
    ("count: plum\nanswer:", " one"),
    ("first: owl kiwi gray\nanswer:", " owl"),
    ("last: owl kiwi gray\nanswer:", " gray"),
    ("plural: cat plum\nanswer:", " cats plums"),
]


@pytest.mark.parametrize("prompt, answer", HAND_ANSWERS)
def test_correct_answer_hand_examples(prompt, answer):
    assert correct_answer(prompt) == answer


def test_every_family_has_a_hand_example():
    assert {parse_prompt(p)[0] for p, _ in HAND_ANSWERS} == set(FAMILIES)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ("reverse cat dog\nanswer:", "is not of the form"),
        ("reverse: cat dog", "is not of the form"),
        ("shout: cat dog\nanswer:", "unknown family 'shout'"),
        ("copy: cat unicorn\nanswer:", r"\['unicorn'\]"),
        ("copy: " + " ".join(WORDS[:9]) + "\nanswer:", "at most 8"),
    ],
)
def test_parse_prompt_rejects_malformed(prompt, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(prompt)


# --- gold score ----------------------------------------------------------------------------


def test_gold_score_exact_answer_is_one():
    rng = np.random.default_rng(0)
    for p in sample_prompts(rng, 200, WorldConfig(families=FAMILIES)):
        assert gold_score(p, correct_answer(p), ended=True) == 1.0


@pytest.mark.parametrize(
    "response, ended, expected",
    [
        # By hand from the docstring formula; target T = fig pig red dog cat (|T| = 5).
        (" fig pig red dog cat", True, 1.0),
        (" fig pig red dog cat", False, 0.5),  # not ended: -0.5
        (" fig pig dog red cat", True, 0.4),  # swap: position 3/5, LCS 4/5 -> q 0.7
        (" pig red dog cat", True, -0.2),  # drop first: position 0, LCS 4/5 -> q 0.4
        (" fig pig red dog", True, 0.6),  # drop last: 4/5, 4/5
        (" fig pig red dog cat cat", True, 0.75),  # one extra word: -0.25
        (" fig pig red dog cat the", True, 0.5),  # extra junk word: -0.25 - 0.25
        (" fig pig red dog the", True, 0.35),  # junk in place: q 0.8 -> 0.6, -0.25
        (" cat dog red pig fig", True, -0.6),  # wrong rule (copy): position 1/5, LCS 1/5
        ("", True, -1.0),
        (" qqq qqq", False, -2.0),  # q 0, two junk (-0.5), not ended (-0.5)
    ],
)
def test_gold_score_hand_values(response, ended, expected):
    assert gold_score(REV, response, ended) == pytest.approx(expected)


def test_gold_score_count_partial_credit():
    p = "count: cat dog red\nanswer:"  # three
    # position credit 1 - d/2, LCS 0 unless exact: q = (1 - d/2)/2
    assert gold_score(p, " three", True) == 1.0
    assert gold_score(p, " four", True) == pytest.approx(-0.5)
    assert gold_score(p, " two", True) == pytest.approx(-0.5)
    assert gold_score(p, " five", True) == pytest.approx(-1.0)
    assert gold_score(p, " cat", True) == pytest.approx(-1.0)


def test_gold_score_monotone_in_number_of_errors():
    target = "fig pig red dog cat".split()
    others = ["apple", "blue", "cow", "plum"]
    subs = []
    for k in range(5):
        resp = target[:]
        resp[:k] = others[:k]
        subs.append(gold_score(REV, " " + " ".join(resp), True))
    assert all(a > b for a, b in zip(subs, subs[1:])), subs
    extras = [gold_score(REV, " " + " ".join(target + ["cat"] * k), True) for k in range(4)]
    assert all(a > b for a, b in zip(extras, extras[1:])), extras
    junk = [gold_score(REV, " " + " ".join(target[: 5 - k] + ["zzz"] * k), True) for k in range(4)]
    assert all(a > b for a, b in zip(junk, junk[1:])), junk
    assert gold_score(REV, " fig pig dog red cat", True) > gold_score(REV, " pig fig dog red cat", True)


def test_gold_score_every_mistake_kind_scores_below_one():
    rng = np.random.default_rng(1)
    cfg = WorldConfig(families=FAMILIES)
    for p in sample_prompts(rng, 300, cfg):
        wrong = corrupt_answer(rng, p, 1, cfg)
        assert wrong != correct_answer(p)
        assert gold_score(p, wrong, True) < 1.0
        assert set(wrong.split()) <= LEXICON  # plausible: no junk
        assert gold_score(p, correct_answer(p), False) < 1.0


def test_gold_scores_batch_and_length_check():
    got = gold_scores([REV, REV], [" fig pig red dog cat", ""], [True, True])
    np.testing.assert_allclose(got, [1.0, -1.0])
    with pytest.raises(ValueError, match="one length"):
        gold_scores([REV], [" a", " b"], [True])


# --- prompts, corpus, demonstrations -------------------------------------------------------


def test_sample_prompts_follow_the_config():
    cfg = WorldConfig(families=("sort", "count"), n_words=9, min_len=3, max_len=4)
    for p in sample_prompts(np.random.default_rng(2), 300, cfg):
        family, words = parse_prompt(p)
        assert family in ("sort", "count")
        assert 3 <= len(words) <= 4 and len(set(words)) == len(words)
        assert set(words) <= set(WORDS[:9])
    only = sample_prompts(np.random.default_rng(2), 50, cfg, families=("last",))
    assert {parse_prompt(p)[0] for p in only} == {"last"}


def test_sample_prompts_exclude_and_impossible_exclude():
    cfg = WorldConfig(families=("copy",), n_words=3, min_len=1, max_len=1)
    everything = {f"copy: {w}\nanswer:" for w in WORDS[:3]}
    got = sample_prompts(np.random.default_rng(0), 20, cfg, exclude={"copy: red\nanswer:"})
    assert "copy: red\nanswer:" not in got and len(got) == 20
    with pytest.raises(ValueError, match="outside `exclude`"):
        sample_prompts(np.random.default_rng(0), 5, cfg, exclude=everything)


def test_pretraining_texts_use_only_world_words_and_are_not_answers():
    template = {"the", "eats", "and", "like", "in", "order", ":", ".", ",", "counting", "again", "backwards",
                "words", "first", "last"}
    texts = pretraining_texts(np.random.default_rng(3), 600)
    assert len(set(texts)) > 300
    for t in texts:
        assert set(t.split()) <= LEXICON | template, t
        assert "answer" not in t


def test_demonstration_error_rate_matches_config():
    for rate in (0.3, 0.1):
        demos = demonstrations(np.random.default_rng(4), 3000, error_rate=rate)
        wrong = np.mean([d["response"] != correct_answer(d["prompt"]) for d in demos])
        assert abs(wrong - rate) < 0.03, (rate, wrong)
    cfg = WorldConfig(error_rate=0.0)
    demos = demonstrations(np.random.default_rng(4), 200, config=cfg)
    assert all(d["response"] == correct_answer(d["prompt"]) for d in demos)
    with pytest.raises(ValueError, match="error_rate"):
        demonstrations(np.random.default_rng(4), 2, error_rate=1.5)


def test_demonstrations_are_short_and_well_formed():
    for d in demonstrations(np.random.default_rng(5), 300):
        assert set(d) == {"prompt", "response"}
        assert d["response"].startswith(" ") and len(d["response"].split()) <= 6
        assert len(d["prompt"].split()) <= 7


# --- labelers ------------------------------------------------------------------------------


def test_rank_is_a_permutation_and_noise_free_ranking_follows_gold():
    rng = np.random.default_rng(6)
    for p in sample_prompts(rng, 100):
        rs, es = sft_like_responses(rng, p, 6)
        noisy = rank_responses(rng, p, rs, es)
        assert sorted(noisy) == list(range(6))
        exact = rank_responses(rng, p, rs, es, noise=0.0)
        g = [gold_score(p, rs[i], es[i]) for i in exact]
        assert all(a >= b for a, b in zip(g, g[1:])), g


def test_rank_pairs_follow_bradley_terry():
    # gold 1.0 vs 0.4 (hand values above): P(first wins) = sigmoid(0.6 / noise)
    rs, es, noise, n = [" fig pig red dog cat", " fig pig dog red cat"], [True, True], 0.5, 4000
    rng = np.random.default_rng(7)
    wins = sum(rank_responses(rng, REV, rs, es, noise)[0] == 0 for _ in range(n))
    p = 1 / (1 + math.exp(-0.6 / noise))
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_rank_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        rank_responses(np.random.default_rng(0), REV, [" a", " b"], [True])
    with pytest.raises(ValueError, match="noise"):
        rank_responses(np.random.default_rng(0), REV, [" a"], [True], noise=-1.0)


def test_default_noise_gives_instructgpt_agreement():
    # fresh sets (not the calibration seed), >= 2000 distinct pairs
    prompts, sets, ended = default_calibration_sets(seed=11, n_prompts=1000)
    agree, pairs = labeler_agreement(np.random.default_rng(8), prompts, sets, None, ended)
    assert pairs >= 2000
    assert abs(agree - 0.73) < 0.04, agree


def test_measured_agreement_matches_closed_form():
    prompts, sets, ended = default_calibration_sets(seed=12, n_prompts=1000)
    for noise in (0.0, 0.2, 1.5):
        agree, pairs = labeler_agreement(np.random.default_rng(9), prompts, sets, noise, ended)
        # independent closed form: mean over distinct pairs of p^2 + (1-p)^2, p = sigmoid(d/noise)
        ps = []
        for p, rs, es in zip(prompts, sets, ended):
            g = [gold_score(p, r, e) for r, e in zip(rs, es)]
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    if (rs[i].split(), es[i]) == (rs[j].split(), es[j]):
                        continue
                    d = g[i] - g[j]
                    if noise == 0:
                        ps.append(0.5 if d == 0 else float(d > 0))
                    else:
                        ps.append(1 / (1 + math.exp(-d / noise)))
        ps = np.array(ps)
        ref = float(np.mean(ps**2 + (1 - ps) ** 2))
        assert len(ps) == pairs
        assert abs(agree - ref) < 0.025, (noise, agree, ref)
        assert expected_agreement(prompts, sets, noise, ended) == pytest.approx(ref)


def test_calibrate_noise_reproduces_the_default_constant():
    prompts, sets, ended = default_calibration_sets()
    noise = calibrate_noise(prompts, sets, ended)
    assert abs(noise - DEFAULT_LABELER_NOISE) < 0.01
    assert expected_agreement(prompts, sets, noise, ended) == pytest.approx(0.73, abs=1e-6)
    with pytest.raises(ValueError, match="target"):
        calibrate_noise(prompts, sets, ended, target=0.999)


def test_make_comparisons_records():
    rng = np.random.default_rng(10)
    prompts = sample_prompts(rng, 20)
    samples, ended = zip(*[sft_like_responses(rng, p, 6) for p in prompts])
    recs = make_comparisons(rng, prompts, samples, ended, k=4)
    assert len(recs) == 20
    for rec, p, ss in zip(recs, prompts, samples):
        assert set(rec) == {"prompt", "responses", "ranking"} and rec["prompt"] == p
        assert sorted(rec["ranking"]) == [0, 1, 2, 3]
        assert all(r in ss for r in rec["responses"])
        json.dumps(rec)  # plain JSON types
    rec = make_comparisons(rng, [REV], [[" fig pig red dog cat", ""]], [[True, True]], k=2, noise=0.0)
    assert rec[0]["ranking"] == [0, 1]
    with pytest.raises(ValueError, match=r"samples_per_prompt\[0\] has 2 samples, need k=4"):
        make_comparisons(rng, [REV], [[" a", " b"]], [[True, True]], k=4)
    with pytest.raises(ValueError, match=r"ended\[0\] 1"):
        make_comparisons(rng, [REV], [[" a", " b"]], [[True]], k=2)


# --- files and determinism -----------------------------------------------------------------


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_world_files_have_the_exact_formats(tmp_path):
    paths = make_world_files(tmp_path, 3, n_pretrain=50, n_demos=40, n_prompts=30,
                             n_eval_demos=20, n_eval_prompts=10)  # fmt: skip
    assert set(paths) == set(WORLD_FILES)
    demo, prompt = {"prompt", "response"}, {"prompt"}
    keys = {"pretrain": {"text"}, "demos": demo, "demos_eval": demo,
            "prompts": prompt, "prompts_eval": prompt}  # fmt: skip
    sizes = {"pretrain": 50, "demos": 40, "demos_eval": 20, "prompts": 30, "prompts_eval": 10}
    recs = {name: _read(tmp_path / f"{name}.jsonl") for name in WORLD_FILES}
    for name, rs in recs.items():
        assert len(rs) == sizes[name]
        assert all(set(r) == keys[name] and all(isinstance(v, str) for v in r.values()) for r in rs)
    held_out = {r["prompt"] for r in recs["demos_eval"] + recs["prompts_eval"]}
    assert held_out.isdisjoint(r["prompt"] for r in recs["demos"] + recs["prompts"])
    assert not list(tmp_path.glob("*.tmp"))


def test_world_files_are_deterministic_from_the_seed(tmp_path):
    kw = dict(n_pretrain=30, n_demos=30, n_prompts=30, n_eval_demos=10, n_eval_prompts=10)
    a = make_world_files(tmp_path / "a", 5, **kw)
    b = make_world_files(tmp_path / "b", 5, **kw)
    c = make_world_files(tmp_path / "c", 6, **kw)
    d = make_world_files(tmp_path / "d", 5, **{**kw, "n_pretrain": 40})
    for name in WORLD_FILES:
        assert a[name].read_bytes() == b[name].read_bytes()
        assert a[name].read_bytes() != c[name].read_bytes()
    assert all(a[n].read_bytes() == d[n].read_bytes() for n in WORLD_FILES if n != "pretrain")
    with pytest.raises(ValueError, match="n_demos"):
        make_world_files(tmp_path / "e", 5, **{**kw, "n_demos": -1})


def test_generators_are_deterministic_from_the_seed():
    def run(seed):
        rng = np.random.default_rng(seed)
        prompts = sample_prompts(rng, 10)
        sets, ended = zip(*[sft_like_responses(rng, p, 4) for p in prompts])
        return (prompts, pretraining_texts(rng, 10), demonstrations(rng, 10),
                make_comparisons(rng, prompts, sets, ended))  # fmt: skip

    assert run(0) == run(0)
    assert run(0) != run(1)


# --- config validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"seed": -1}, "seed"),
        ({"families": ()}, "families"),
        ({"families": ("copy", "shout")}, "families"),
        ({"families": ("copy", "copy")}, "families"),
        ({"n_words": 2}, "n_words"),
        ({"n_words": len(WORDS) + 1}, "n_words"),
        ({"min_len": 0}, "min_len"),
        ({"min_len": 4, "max_len": 3}, "min_len"),
        ({"max_len": 9}, "max_len"),
        ({"n_words": 4, "max_len": 5}, "max_len"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"error_rate": 1.1}, "error_rate"),
        ({"labeler_noise": -0.5}, "labeler_noise"),
        ({"labeler_noise": float("nan")}, "labeler_noise"),
        ({"ranking_k": 1}, "ranking_k"),
        ({"ranking_k": 10}, "ranking_k"),
    ],
)
def test_world_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"WorldConfig.{field} "):
        WorldConfig(**kwargs)


def test_world_config_is_frozen():
    with pytest.raises(AttributeError):
        WorldConfig().seed = 1  # type: ignore[misc]
