"""Tests for rlhf_jax.data: readers, tokenised batches, packing and the batch iterator."""

import gzip
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from rlhf_jax.data import (
    BatchIterator,
    Comparison,
    DataError,
    Demonstration,
    PretrainText,
    Prompt,
    pack_sequences,
    read_comparisons,
    read_demonstrations,
    read_pretrain_texts,
    read_prompts,
    split_hh_dialogues,
    tokenize_comparisons,
    tokenize_demonstrations,
    tokenize_prompts,
    tokenize_texts,
)
from rlhf_jax.data.truncation import TruncationStats, data_metrics
from rlhf_jax.tokenizer import Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

WORDS = ["<|pad|>", "<|bos|>", "<|eos|>", "what", "is", "it", "?", "yes", ".", "no", "a", "b"]
PAD, BOS, EOS = 0, 1, 2
W = {w: i for i, w in enumerate(WORDS)}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Whitespace word-level tokenizer: every expected id below is written by hand."""
    hf = tokenizers.Tokenizer(models.WordLevel(W, unk_token="<|pad|>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = Tokenizer(hf)
    assert (t.pad_id, t.bos_id, t.eos_id) == (PAD, BOS, EOS)
    return t


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------------------- readers


def test_readers_good_data(tmp_path):
    demos = read_demonstrations(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "what", "response": " yes"}, "", {"prompt": "", "response": "no", "extra": 1}]))
    assert demos == [Demonstration("what", " yes"), Demonstration("", "no")]
    assert demos.n_skipped == 0
    comps = read_comparisons(write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "p", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1]},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
         "rejected": "\n\nHuman: hi\n\nAssistant: go"},
    ]))
    assert comps == [
        Comparison("p", ("r2", "r0", "r3", "r1")),
        Comparison("q", ("good", "bad")),
        Comparison("\n\nHuman: hi\n\nAssistant:", (" hello", " go")),
    ]
    assert read_prompts(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}])) == [
        Prompt("a"), Prompt("")]
    assert read_pretrain_texts(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}])) == [
        PretrainText("a b")]


def test_gzip_file(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "é", "response": "ü"}) + "\n")
    assert read_demonstrations(path) == [Demonstration("é", "ü")]


GOOD_DEMO = {"prompt": "p", "response": "r"}
GOOD_RANKED = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 0]}

BAD_CASES = [
    # (reader, bad line, field named in the message or None, words in the message)
    (read_demonstrations, '{"prompt": "p", "response": ', None, "not valid JSON"),
    (read_demonstrations, '["p", "r"]', None, "JSON object"),
    (read_demonstrations, {"prompt": "p"}, "response", "missing"),
    (read_demonstrations, {"prompt": 3, "response": "r"}, "prompt", "string"),
    (read_demonstrations, {"prompt": "p", "response": " \n"}, "response", "empty"),
    (read_comparisons, {**GOOD_RANKED, "ranking": [0, 0, 1]}, "ranking", "permutation"),
    (read_comparisons, {**GOOD_RANKED, "ranking": [1, 2, 3]}, "ranking", "permutation"),
    (read_comparisons, {**GOOD_RANKED, "ranking": [0, 1]}, "ranking", "permutation"),
    (read_comparisons, {**GOOD_RANKED, "ranking": [0, 1, "2"]}, "ranking", "integers"),
    (read_comparisons, {k: v for k, v in GOOD_RANKED.items() if k != "ranking"}, "ranking",
     "missing"),
    (read_comparisons, {**GOOD_RANKED, "responses": ["a", "", "c"]}, "responses", "empty"),
    (read_comparisons, {**GOOD_RANKED, "responses": ["a", 2, "c"]}, "responses", "strings"),
    (read_comparisons, {"prompt": "p", "responses": ["a"], "ranking": [0]}, "responses", "got 1"),
    (read_comparisons, {"prompt": "p", "responses": list("abcdefghij"),
                        "ranking": list(range(10))}, "responses", "got 10"),
    (read_comparisons, {"responses": ["a", "b"], "ranking": [0, 1]}, "prompt", "missing"),
    (read_comparisons, {"prompt": "p"}, "responses", "missing"),
    (read_comparisons, {"prompt": "p", "chosen": "a", "rejected": ""}, "rejected", "empty"),
    (read_comparisons, {"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    (read_comparisons, {"chosen": "Human: a", "rejected": "Human: b"}, "chosen", "Assistant"),
    (read_comparisons, {"chosen": "\n\nHuman: a\n\nAssistant: ", "rejected":
                        "\n\nHuman: a\n\nAssistant: b"}, "chosen", "empty"),
    (read_prompts, {"text": "p"}, "prompt", "missing"),
    (read_prompts, {"prompt": None}, "prompt", "string"),
    (read_pretrain_texts, {"text": ""}, "text", "empty"),
    (read_pretrain_texts, {"text": ["a"]}, "text", "string"),
]


@pytest.mark.parametrize("reader,bad,field,words", BAD_CASES)
def test_bad_line_names_file_line_and_field(tmp_path, reader, bad, field, words):
    good = GOOD_RANKED if reader is read_comparisons else (
        {"prompt": "p"} if reader is read_prompts else
        {"text": "t"} if reader is read_pretrain_texts else GOOD_DEMO)
    path = write_jsonl(tmp_path / "bad_data.jsonl", [good, "", bad, good])
    with pytest.raises(DataError) as info:
        reader(path)
    msg = str(info.value)
    assert "bad_data.jsonl" in msg and "line 3" in msg and words in msg
    if field is not None:
        assert f"field '{field}'" in msg
    assert isinstance(info.value, ValueError)


def test_skip_bad_counts_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        GOOD_DEMO, "{oops", {"prompt": "p"}, {"prompt": "q", "response": "s"}, {"response": "r"}])
    with caplog.at_level(logging.WARNING):
        records = read_demonstrations(path, skip_bad=True)
    assert records == [Demonstration("p", "r"), Demonstration("q", "s")]
    assert records.n_skipped == 3
    assert "skipped 3" in caplog.text and "mixed.jsonl" in caplog.text


def test_sharding(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(11)]
    path = write_jsonl(tmp_path / "p.jsonl", rows[:5] + [""] + rows[5:])
    shards = [read_prompts(path, shard_index=i, shard_count=3) for i in range(3)]
    assert shards[1] == [Prompt(f"p{i}") for i in (1, 4, 7, 10)]
    assert sorted(p.prompt for s in shards for p in s) == sorted(f"p{i}" for i in range(11))
    with pytest.raises(ValueError, match="shard_index"):
        read_prompts(path, shard_index=3, shard_count=3)
    with pytest.raises(ValueError, match="shard_count"):
        read_prompts(path, shard_count=0)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read_prompts(tmp_path / "absent.jsonl")


@pytest.mark.skipif(not HH.is_file(), reason=f"{HH} absent (../shared)")
def test_hh_rlhf_real_file():
    with pytest.raises(DataError, match=r"harmless-base-test.jsonl.gz, line \d+, field 'chosen'"):
        read_comparisons(HH)
    records = read_comparisons(HH, skip_bad=True)
    originals = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    # 4 records of the file have an empty chosen reply (checked by hand).
    assert records.n_skipped == 4 and len(records) == len(originals) - 4
    kept = [o for o in originals if o["chosen"].rsplit("Assistant:", 1)[1].strip()]
    assert len(kept) == len(records)
    n_multi_turn = 0
    for rec, orig in zip(records, kept):
        assert rec.prompt.endswith("\n\nAssistant:") and rec.prompt.startswith("\n\nHuman:")
        chosen, rejected = rec.responses
        assert chosen != rejected
        assert rec.prompt + chosen == orig["chosen"] and rec.prompt + rejected == orig["rejected"]
        n_multi_turn += rec.prompt.count("\n\nHuman:") > 1
    assert n_multi_turn > 100


def test_split_hh_uses_last_shared_assistant_turn():
    a = "\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant: one"
    b = "\n\nHuman: x\n\nAssistant: y\n\nHuman: z\n\nAssistant: two"
    assert split_hh_dialogues(a, b) == (a[: -len(" one")], " one", " two")
    # The replies differ in the first turn: the prompt stops at the first "Assistant:".
    c = "\n\nHuman: x\n\nAssistant: q\n\nHuman: z\n\nAssistant: two"
    p = "\n\nHuman: x\n\nAssistant:"
    assert split_hh_dialogues(a, c) == (p, a[len(p) :], c[len(p) :])
    assert split_hh_dialogues("\n\nHuman: a", "\n\nHuman: b") is None


# ------------------------------------------------------------------------------ tokenising


def test_tokenize_demonstrations_loss_mask_by_hand(tok):
    recs = [Demonstration("what is it ?", " yes ."), Demonstration("", "no")]
    out = tokenize_demonstrations(recs, tok, buckets=(4, 12, 16))
    assert out["tokens"].tolist() == [
        [BOS, W["what"], W["is"], W["it"], W["?"], W["yes"], W["."], EOS] + [PAD] * 4,
        [BOS, W["no"], EOS] + [PAD] * 9,
    ]
    assert out["mask"].tolist() == [[1] * 8 + [0] * 4, [1] * 3 + [0] * 9]
    assert out["loss_mask"].tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 1] + [0] * 4,
        [0, 1, 1] + [0] * 9,
    ]
    assert all(v.dtype == np.int32 for v in out.values())
    all_tokens = tokenize_demonstrations(recs, tok, buckets=(12,), train_on_prompt=True)
    assert all_tokens["loss_mask"][0].tolist() == [0] + [1] * 7 + [0] * 4


def test_tokenize_demonstrations_truncation(tok, caplog):
    recs = [Demonstration("what is", " a b a b a b"), Demonstration("what is it ? a b a", " yes")]
    with pytest.raises(ValueError, match="demonstration 0 has 10 tokens"):
        tokenize_demonstrations(recs, tok, buckets=(4, 8))
    with caplog.at_level(logging.WARNING):
        out = tokenize_demonstrations(recs, tok, buckets=(4, 8), truncation="right")
    # Record 0 is cut to 8 tokens with no EOS; record 1 has no response token left: dropped.
    assert out["tokens"].tolist() == [[BOS, W["what"], W["is"]] + [W["a"], W["b"]] * 2 + [W["a"]]]
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    assert "2 of 2 demonstrations longer than 8 tokens: 1 cut, 1 skipped (truncation='right')" in caplog.text


def test_truncation_left_keeps_the_response_whole_by_hand(tok):
    """`data.truncation`: "left" drops the oldest prompt tokens after BOS; a response too long on
    its own skips the record; "skip" drops every long record; counts in `TruncationStats`."""
    recs = [Demonstration("what is it ? a b", " yes ."), Demonstration("a", " a b a b a b a"),
            Demonstration("no", " yes")]
    stats = TruncationStats()
    out = tokenize_demonstrations(recs, tok, buckets=(8,), truncation="left", stats=stats)
    assert out["tokens"].tolist() == [
        [BOS, W["it"], W["?"], W["a"], W["b"], W["yes"], W["."], EOS],
        [BOS, W["no"], W["yes"], EOS] + [PAD] * 4]
    assert out["loss_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert (stats.records, stats.cut, stats.skipped) == (3, 1, 1)
    stats = TruncationStats()
    out = tokenize_demonstrations(recs, tok, buckets=(8,), truncation="skip", stats=stats)
    assert out["tokens"].tolist() == [[BOS, W["no"], W["yes"], EOS] + [PAD] * 4]
    assert (stats.cut, stats.skipped) == (0, 2)
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_demonstrations(recs, tok, buckets=(8,), truncation="middle")


def test_data_metrics_name_only_files_with_a_cut_or_skip():
    stats = {"train_data": TruncationStats(records=5, cut=2, skipped=1, bad_lines=4), "eval_data": TruncationStats(3)}
    assert data_metrics(stats) == {"data/train_data/records": 5, "data/train_data/cut": 2,
                                   "data/train_data/skipped": 1, "data/train_data/bad_lines": 4}


def test_truncation_of_comparisons_cuts_one_shared_prompt(tok, tmp_path):
    rows = [{"prompt": "what is it ? a b", "responses": [" yes .", " no"], "ranking": [0, 1]},
            {"prompt": "a", "chosen": " a b a b a b a", "rejected": " no"},
            {"prompt": "no", "chosen": " yes", "rejected": " a"}]
    recs = read_comparisons(write_jsonl(tmp_path / "c.jsonl", rows))
    stats = TruncationStats()
    out = tokenize_comparisons(recs, tok, k_max=2, max_len=8, truncation="left", stats=stats)
    # Both responses of record 0 lose the same two oldest prompt tokens ("what is").
    assert out["tokens"][0].tolist() == [[BOS, W["it"], W["?"], W["a"], W["b"], W["yes"], W["."], EOS],
                                         [BOS, W["it"], W["?"], W["a"], W["b"], W["no"], EOS, PAD]]
    assert out["tokens"][1, 0].tolist() == [BOS, W["no"], W["yes"], EOS] + [PAD] * 4
    assert out["valid"].tolist() == [[1, 1], [1, 1]]
    assert (stats.records, stats.cut, stats.skipped) == (3, 1, 1)
    right = tokenize_comparisons(recs, tok, k_max=2, max_len=8, truncation="right")
    assert right["tokens"][1, 0].tolist() == [BOS, W["a"]] + [W["a"], W["b"]] * 3
    assert len(tokenize_comparisons(recs, tok, k_max=2, max_len=8, truncation="skip")["tokens"]) == 1
    with pytest.raises(ValueError, match=r"comparison 0 \(line 1\) response 0 has 10 tokens, more than max_len 8"):
        tokenize_comparisons(recs, tok, k_max=2, max_len=8)


def test_truncation_of_prompts(tok):
    recs = [Prompt("what is it ? a b"), Prompt("a")]
    left = tokenize_prompts(recs, tok, max_len=4, truncation="left")
    assert left["tokens"].tolist() == [[BOS, W["?"], W["a"], W["b"]], [PAD, PAD, BOS, W["a"]]]
    right = tokenize_prompts(recs, tok, max_len=4, truncation="right")
    assert right["tokens"][0].tolist() == [BOS, W["what"], W["is"], W["it"]]
    skip = tokenize_prompts(recs, tok, max_len=4, truncation="skip")
    assert skip["tokens"].tolist() == [[PAD, PAD, BOS, W["a"]]]
    with pytest.raises(ValueError, match="prompt 0 has 7 tokens, more than max_len 4 .set truncation to 'left'"):
        tokenize_prompts(recs, tok, max_len=4)


def test_bom_and_lone_surrogates(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert read_demonstrations(bom) == [Demonstration("a", "b")]
    bad = write_jsonl(tmp_path / "s.jsonl", ['{"prompt": "a", "response": "b"}', '{"prompt": "x", "response": "a\\ud800"}'])
    with pytest.raises(DataError, match=r"s.jsonl, line 2, field 'response': not valid Unicode: a lone surrogate"):
        read_demonstrations(bad)
    assert read_demonstrations(bad, skip_bad=True).n_skipped == 1
    ranked = write_jsonl(tmp_path / "r.jsonl", ['{"prompt": "x", "responses": ["a", "\\udc00"], "ranking": [0, 1]}'])
    with pytest.raises(DataError, match=r"line 1, field 'responses': not valid Unicode"):
        read_comparisons(ranked)


def test_tokenize_comparisons_ragged(tok):
    recs = [Comparison("what", (" yes", " no", " a")), Comparison("is it", (" b", " yes ."))]
    out = tokenize_comparisons(recs, tok, k_max=3, max_len=6)
    assert out["tokens"].shape == out["mask"].shape == (2, 3, 6)
    assert out["valid"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["tokens"][0, 1].tolist() == [BOS, W["what"], W["no"], EOS, PAD, PAD]
    assert out["tokens"][1, 1].tolist() == [BOS, W["is"], W["it"], W["yes"], W["."], EOS]
    assert out["tokens"][1, 2].tolist() == [PAD] * 6
    assert out["mask"][1].tolist() == [[1] * 5 + [0], [1] * 6, [0] * 6]
    with pytest.raises(ValueError, match="comparison 1 response 1 has 6 tokens"):
        tokenize_comparisons(recs, tok, k_max=3, max_len=5)
    with pytest.raises(ValueError, match="comparison 0 has 3 responses > k_max 2"):
        tokenize_comparisons(recs, tok, k_max=2, max_len=6)


def test_tokenize_prompts_left_padded(tok):
    out = tokenize_prompts([Prompt("what is it ?"), Prompt("a")], tok, max_len=6)
    assert out["tokens"].tolist() == [
        [PAD, BOS, W["what"], W["is"], W["it"], W["?"]], [PAD] * 4 + [BOS, W["a"]]]
    assert out["mask"].tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


def test_tokenize_texts_blocks(tok):
    out = tokenize_texts(["a b", "yes", "no no no"], tok, seq_len=4)
    stream = [W["a"], W["b"], EOS, W["yes"], EOS, W["no"], W["no"], W["no"], EOS]
    assert out["tokens"].tolist() == [stream[:4], stream[4:8]]
    assert out["mask"].tolist() == [[1] * 4] * 2 == out["loss_mask"].tolist()
    with pytest.raises(ValueError, match="fewer than seq_len 20"):
        tokenize_texts(["a b"], tok, seq_len=20)


def test_pack_sequences_by_hand():
    tokens = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [3, 0, 0, 0], [4, 4, 4, 4]])
    mask = (np.arange(4) < np.array([[3], [2], [1], [4]])).astype(np.int32)
    loss = np.array([[0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1]])
    out = pack_sequences(tokens, mask, loss, seq_len=6, pad_id=0)
    assert out["tokens"].tolist() == [[5, 6, 7, 8, 9, 3], [4, 4, 4, 4, 0, 0]]
    assert out["mask"].tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 0, 0]]
    assert out["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    with pytest.raises(ValueError, match="sequence 3 has 4 tokens"):
        pack_sequences(tokens, mask, loss, seq_len=3, pad_id=0)


# ------------------------------------------------------------------------------- iterator


def indexed(n: int) -> dict[str, np.ndarray]:
    return {"idx": np.arange(n), "x": np.arange(n * 2).reshape(n, 2) * 10}


def test_iterator_epochs_cover_every_example_once():
    it = BatchIterator(indexed(12), 4, seed=3)
    assert len(it) == 3
    for epoch in range(3):
        assert it.epoch == epoch
        seen = np.concatenate([next(it)["idx"] for _ in range(3)])
        assert sorted(seen.tolist()) == list(range(12))
        assert seen.tolist() == np.random.default_rng([3, epoch]).permutation(12).tolist()
    b = next(it)
    assert b["x"].tolist() == (b["idx"][:, None] * 20 + np.array([0, 10])).tolist()


def test_iterator_drop_last_and_partial():
    it = BatchIterator(indexed(10), 4, seed=0)
    seen = [next(it)["idx"] for _ in range(2)]
    assert all(len(s) == 4 for s in seen) and len(set(np.concatenate(seen))) == 8
    assert it.epoch == 1  # the 2 left over are skipped
    it = BatchIterator(indexed(10), 4, seed=0, shuffle=False, drop_last=False)
    assert [next(it)["idx"].tolist() for _ in range(4)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [0, 1, 2, 3]]


def test_iterator_determinism_and_state_round_trip():
    straight = BatchIterator(indexed(10), 3, seed=7)
    batches = [next(straight)["idx"].tolist() for _ in range(12)]
    again = BatchIterator(indexed(10), 3, seed=7)
    assert [next(again)["idx"].tolist() for _ in range(12)] == batches
    other = BatchIterator(indexed(10), 3, seed=8)
    assert [next(other)["idx"].tolist() for _ in range(12)] != batches

    first = BatchIterator(indexed(10), 3, seed=7)
    for _ in range(7):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    resumed = BatchIterator(indexed(10), 3, seed=7)
    resumed.set_state(state)
    assert [next(resumed)["idx"].tolist() for _ in range(5)] == batches[7:12]
    for bad in ({"epoch": 1}, {"epoch": -1, "position": 0}, {"epoch": 0, "position": 11}):
        with pytest.raises(ValueError, match="state"):
            resumed.set_state(bad)


def test_iterator_bucket_trimming():
    n, length = 8, 16
    lengths = np.array([3, 5, 2, 9, 4, 3, 2, 1])
    mask = (np.arange(length) < lengths[:, None]).astype(np.int32)
    arrays = {"tokens": mask * 7, "mask": mask, "loss_mask": mask, "reward": np.ones(n)}
    it = BatchIterator(arrays, 2, seed=0, shuffle=False, buckets=(4, 8))
    shapes = [next(it)["tokens"].shape for _ in range(4)]
    assert shapes == [(2, 8), (2, 16), (2, 4), (2, 4)]  # longest 5, 9 (> all buckets), 3, 2
    b = next(it)
    assert b["mask"].shape == b["loss_mask"].shape == (2, 8) and b["reward"].shape == (2,)
    assert b["mask"].sum() == 8
    left = {"mask": mask[:, ::-1].copy()}
    it = BatchIterator(left, 2, seed=0, shuffle=False, buckets=(4, 8), trim_side="left")
    b = next(it)
    assert b["mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]


def sized(n: int, seed: int = 0, k: int = 6, length: int = 8) -> dict[str, np.ndarray]:
    """`n` examples of 1..k items (`valid` [n, k], a prefix) of 1..length tokens (`mask` [n, k, length])."""
    rng = np.random.default_rng(seed)
    valid = (np.arange(k) < rng.integers(1, k + 1, n)[:, None]).astype(np.int32)
    mask = (np.arange(length) < rng.integers(1, length + 1, (n, k, 1))).astype(np.int32) * valid[:, :, None]
    return {"idx": np.arange(n), "valid": valid, "mask": mask, "tokens": mask * 5}


def test_iterator_group_by_size():
    """Windows of whole batches hold the plain permutation's examples; inside a window the batches
    cut the size-sorted window (ties in permutation order) and come in a shuffled order."""
    n, size, window = 42, 4, 5
    arrays = sized(n)
    sizes = arrays["valid"].sum(1)
    it = BatchIterator(arrays, size, seed=1, group_by="valid", group_window=window, drop_last=False)
    dealt_in_order = []
    for epoch in range(3):
        batches = [next(it)["idx"] for _ in range(len(it))]
        assert [len(b) for b in batches] == [size] * 10 + [2]
        perm = np.random.default_rng([1, epoch]).permutation(n)
        np.testing.assert_array_equal(batches[-1], perm[40:])  # the partial batch stays last
        for start in (0, 5):  # windows of 5 batches: examples 0..19 and 20..39 of the permutation
            got = batches[start : start + window]
            assert sorted(np.concatenate(got).tolist()) == sorted(perm[start * size : (start + window) * size].tolist())
            for a, b in itertools.combinations(got, 2):  # sorted then cut: size ranges do not overlap
                assert sizes[a].max() <= sizes[b].min() or sizes[b].max() <= sizes[a].min()
            for s in set(sizes[np.concatenate(got)].tolist()):  # equal sizes keep the permutation's order
                order = [i for b in sorted(got, key=lambda b: (sizes[b].min(), sizes[b].max())) for i in b if sizes[i] == s]
                assert order == [i for i in perm if i in order]
            dealt_in_order.append([sizes[b].min() for b in got] == sorted(sizes[b].min() for b in got))
    assert not all(dealt_in_order)

    resumed = BatchIterator(arrays, size, seed=1, group_by="valid", group_window=window, drop_last=False)
    straight = BatchIterator(arrays, size, seed=1, group_by="valid", group_window=window, drop_last=False)
    expected = [next(straight)["idx"].tolist() for _ in range(20)]
    resumed.set_state({"epoch": 1, "position": 12})
    assert [next(resumed)["idx"].tolist() for _ in range(6)] == expected[14:]


def test_iterator_group_buckets_cut_the_item_axis():
    arrays = sized(16, seed=3)
    it = BatchIterator(arrays, 2, seed=0, shuffle=False, group_by="valid", group_buckets=(2, 4), buckets=(4,))
    for _ in range(8):
        b = next(it)
        most, longest = int(b["valid"].sum(1).max()), int(b["mask"].sum(-1).max())
        items = 2 if most <= 2 else 4 if most <= 4 else 6
        assert b["valid"].shape == (2, items) and b["mask"].shape == b["tokens"].shape == (2, items, 4 if longest <= 4 else 8)
        assert b["valid"].sum() == arrays["valid"][b["idx"]].sum() and b["mask"].sum() == arrays["mask"][b["idx"]].sum()
    with pytest.raises(ValueError, match="group_buckets"):
        BatchIterator(arrays, 2, seed=0, group_by="mask", group_buckets=(2,))
    with pytest.raises(ValueError, match="group_by"):
        BatchIterator(arrays, 2, seed=0, group_by="nope")
    with pytest.raises(ValueError, match="group_window"):
        BatchIterator(arrays, 2, seed=0, group_by="valid", group_window=0)


def test_iterator_bad_arguments():
    with pytest.raises(ValueError, match="first dimension"):
        BatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(indexed(3), 4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(indexed(3), 0, seed=0)
    with pytest.raises(ValueError, match="bucket_key"):
        BatchIterator(indexed(3), 1, seed=0, buckets=(4,))
