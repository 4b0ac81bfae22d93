"""Tests for rlhf_jax.tokenizer against hand-built expectations and a direct llama2.c encoder."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from rlhf_jax.tokenizer import PAD_TOKEN, Tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOK512 = SHARED / "models" / "stories260K" / "tok512.bin"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
needs_tok512 = pytest.mark.skipif(not TOK512.is_file(), reason=f"{TOK512} absent (../shared)")

CORPUS = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog met on the mat!",
    "héllo wörld — naïve café",
] * 20


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


def word_tokenizer(vocab: list[str]) -> tokenizers.Tokenizer:
    """A whitespace word-level tokenizer, so expected ids can be written by hand."""
    hf = tokenizers.Tokenizer(
        models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0])
    )
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return hf


# ----------------------------------------------------------------------------------- training


def test_train_round_trip_and_special_ids(trained):
    assert (trained.pad_id, trained.bos_id, trained.eos_id) == (0, 1, 2)
    assert trained.vocab_size == 300
    assert not trained.added_pad
    for text in ["the cat sat on the log.", "naïve café — ok?", "unseen: Ωmega 123\n\tx", ""]:
        ids = trained.encode(text)
        assert all(0 <= i < trained.vocab_size for i in ids)
        assert trained.decode(ids) == text
    ids = trained.encode("the cat", add_bos=True, add_eos=True)
    assert ids[0] == trained.bos_id and ids[-1] == trained.eos_id
    assert ids[1:-1] == trained.encode("the cat")
    assert trained.decode(ids) == "the cat"
    assert trained.decode(ids, skip_special=False) == "<|bos|>the cat<|eos|>"
    # BPE actually merged something: a frequent word is a single token.
    assert len(trained.encode(" cat")) == 1


def test_train_rejects_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=100)


def test_missing_pad_is_added_never_eos():
    tok = Tokenizer.train(CORPUS, vocab_size=280, special_tokens=("</s>",))
    assert tok.eos_id == 0 and tok.bos_id is None
    assert tok.added_pad
    assert tok.pad_id != tok.eos_id
    assert tok.pad_id == 280 and tok.vocab_size == 281  # one past the trained vocabulary
    assert tok.hf.id_to_token(tok.pad_id) == PAD_TOKEN
    with pytest.raises(ValueError, match="bos"):
        tok.encode("x", add_bos=True)


# ----------------------------------------------------------------------------- encode_batch


def test_encode_batch_padding_sides(trained):
    texts = ["the cat", "a dog met on the mat", ""]
    rows = [trained.encode(t, add_bos=True, add_eos=True) for t in texts]
    max_len = max(map(len, rows)) + 2
    pad = trained.pad_id
    for side in ("left", "right"):
        ids, mask = trained.encode_batch(texts, max_len, side=side, add_bos=True, add_eos=True)
        assert ids.dtype == np.int32 and mask.dtype == np.int32
        assert ids.shape == mask.shape == (3, max_len)
        for b, row in enumerate(rows):
            n_pad = max_len - len(row)
            padded = [pad] * n_pad + row if side == "left" else row + [pad] * n_pad
            m = [0] * n_pad + [1] * len(row) if side == "left" else [1] * len(row) + [0] * n_pad
            assert ids[b].tolist() == padded
            assert mask[b].tolist() == m


def test_encode_batch_truncation(trained):
    texts = ["the cat", "the cat sat on the mat. the dog sat on the log."]
    body = trained.encode(texts[1])
    assert len(body) > 6
    with pytest.raises(ValueError, match=r"text 1 has"):
        trained.encode_batch(texts, 6, add_bos=True)
    ids, mask = trained.encode_batch(texts, 6, add_bos=True, add_eos=True, truncation="left")
    assert ids[1].tolist() == [trained.bos_id, *body[-4:], trained.eos_id]
    ids, mask = trained.encode_batch(texts, 6, add_bos=True, truncation="right", side="left")
    assert ids[1].tolist() == [trained.bos_id, *body[:5]]
    assert mask[1].tolist() == [1] * 6
    with pytest.raises(ValueError, match="side"):
        trained.encode_batch(texts, 6, side="middle")
    with pytest.raises(ValueError, match="truncation"):
        trained.encode_batch(texts, 6, truncation="both")


# ------------------------------------------------------------------------------------ files


def test_save_and_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "tok")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        loaded = Tokenizer.from_file(path)
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
            trained.bos_id, trained.eos_id, trained.pad_id, trained.vocab_size)
        assert loaded.encode("the dog met the cat") == trained.encode("the dog met the cat")


def test_special_names_from_config_files(tmp_path):
    hf = word_tokenizer(["[UNK]", "[START]", "[STOP]", "[P]", "hi"])
    hf.save(str(tmp_path / "tokenizer.json"))
    # No known names and no config: none found, a pad is added.
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 5)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[START]", "lstrip": False}, "eos_token": "[STOP]",
         "pad_token": "[P]"}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 5)
    # special_tokens_map.json wins over tokenizer_config.json; pad == eos is refused.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[STOP]"}))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.eos_id == 2 and tok.pad_id == 5 and tok.added_pad
    # An explicit argument wins over both files.
    assert Tokenizer.from_file(tmp_path, pad_token="[P]").pad_id == 3
    with pytest.raises(ValueError, match="eos_token '<nope>'"):
        Tokenizer.from_file(tmp_path, eos_token="<nope>")


def test_common_names_detected(tmp_path):
    hf = word_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "hi"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    hf = word_tokenizer(["<|endoftext|>", "hi"])  # GPT-2: one token for bos and eos, no pad
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 0, 2)


def test_bad_files(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="broken.json"):
        Tokenizer.from_file(broken)
    with pytest.raises(FileNotFoundError, match="tok9.bin"):
        Tokenizer.from_llama2c(tmp_path / "tok9.bin")
    short = tmp_path / "short.bin"
    short.write_bytes(struct.pack("<ifi", 7, 0.0, 50) + b"<unk>")
    with pytest.raises(ValueError, match="short.bin"):
        Tokenizer.from_llama2c(short)


# ---------------------------------------------------------------------------------- llama2.c


def llama2c_reference_encode(text: str, pieces: list[bytes], scores: list[float]) -> list[int]:
    """llama2.c's `encode` (run.c), transcribed loop for loop, with BOS."""
    lookup = {p: i for i, p in enumerate(pieces)}
    tokens = [1]
    if text:
        tokens.append(lookup[b" "])
    for ch in text:
        b = ch.encode("utf-8")
        if b in lookup:
            tokens.append(lookup[b])
        else:
            tokens.extend(byte + 3 for byte in b)
    body = tokens[1:]
    while True:
        best_score, best_id, best_idx = -1e10, -1, -1
        for i in range(len(body) - 1):
            j = lookup.get(pieces[body[i]] + pieces[body[i + 1]])
            if j is not None and scores[j] > best_score:
                best_score, best_id, best_idx = scores[j], j, i
        if best_idx == -1:
            break
        body[best_idx : best_idx + 2] = [best_id]
    return [1, *body]


def read_tok512() -> tuple[list[bytes], list[float]]:
    data = TOK512.read_bytes()
    off, pieces, scores = 4, [], []
    while off < len(data):
        score, n = struct.unpack_from("<fi", data, off)
        pieces.append(data[off + 8 : off + 8 + n])
        scores.append(score)
        off += 8 + n
    return pieces, scores


@needs_tok512
def test_llama2c_readme_reference():
    tok = Tokenizer.from_llama2c(TOK512)
    assert tok.encode("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 512, 513)
    assert tok.decode([1, 403, 407, 261, 378, 2]) == "Once upon a time"


@needs_tok512
def test_llama2c_matches_reference_loop():
    tok = Tokenizer.from_llama2c(TOK512)
    pieces, scores = read_tok512()
    texts = ["", "a", "Lily and Ben went to the park.", "naïve café — 日本 ✓", "  two  spaces\n"]
    if SHAKESPEARE.is_file():
        lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines()
        texts += lines[:150] + ["\n".join(lines[200:240])]
    for text in texts:
        expected = llama2c_reference_encode(text, pieces, scores)
        assert tok.encode(text, add_bos=True) == expected, text
        assert tok.decode(expected) == text


@needs_tok512
def test_llama2c_save_load_round_trip(tmp_path):
    tok = Tokenizer.from_llama2c(TOK512)
    tok.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (1, 2, 512)
    text = "Once upon a time, there was a little girl named Lily."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


# ------------------------------------------------------------------ tokenizer_config, GGUF


def test_config_add_bos_token_and_chat_template(trained, tmp_path):
    """`tokenizer_config.json` as transformers writes it (special tokens as dicts, a list of
    named templates, or a `chat_template.jinja` beside it), and our own `save` round trip."""
    trained.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "eos_token": {"content": "<|eos|>", "special": True},
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    tok = Tokenizer.from_file(tmp_path)
    assert tok.add_bos_token and tok.chat_template == "D" and tok.eos_id == trained.eos_id
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_file(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "the cat"}]) == "the cat!"
    assert tok.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=True) == \
        trained.encode("the cat!")
    tok.save(tmp_path)  # rewrites the config with the template and drops the .jinja file
    assert not (tmp_path / "chat_template.jinja").exists()
    loaded = Tokenizer.from_file(tmp_path)
    assert (loaded.add_bos_token, loaded.chat_template) == (True, "{{ messages[0]['content'] }}!")
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").add_bos_token  # beside the file too


@pytest.fixture(scope="module")
def gguf_tokenizer_file(tmp_path_factory):
    """Factory: (pre, pad_is_eos) -> a tiny llama GGUF carrying a byte-level BPE tokenizer
    (trained here; `<|endoftext|>` (pad), `<|im_start|>` (bos), `<|im_end|>` (eos) control
    tokens, "the" user-defined)."""
    _gguf = pytest.importorskip("_gguf", reason="the `gguf` package is needed for the GGUF tests")
    from conftest import random_params
    from rlhf_jax.model import ModelConfig, Transformer

    trained = Tokenizer.train(CORPUS, vocab_size=300,
                              special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok = Tokenizer(trained.hf, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    model = Transformer(ModelConfig(arch="llama", vocab_size=300, d_model=32, n_layers=1,
                                    n_heads=2, d_ff=32, max_len=32, tie_embeddings=True))
    params = random_params(model)
    cache = {}

    def get(pre: str, pad_is_eos: bool) -> Path:
        if (pre, pad_is_eos) not in cache:
            path = tmp_path_factory.mktemp("gguf_tok") / "tok.gguf"
            _gguf.write_model_gguf(
                path, model, params, tokenizer=tok, pre=pre, pad_is_eos=pad_is_eos,
                user_defined=("the",),
                template="{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
            cache[pre, pad_is_eos] = path
        return cache[pre, pad_is_eos]

    return get


GGUF_TEXTS = ["the cat sat on the mat.", "<|im_start|>hi<|im_end|>other", "naïve café — 123 4567",
              "  two  spaces\n\nthen\tthe end", "theme", ""]


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2"])
def test_from_gguf_matches_transformers(pre, gguf_tokenizer_file):
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    path = gguf_tokenizer_file(pre, False)
    tok = Tokenizer.from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 300)
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (1, 2, 0)
    assert tok.chat_template == ref.chat_template and not tok.add_bos_token
    for text in GGUF_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special=False) == text
    assert tok.encode("<|im_start|>")[0] == 1  # control tokens stay whole
    assert tok.encode("theme")[0] == tok.hf.token_to_id("the")  # user-defined token matched whole


def test_from_gguf_pad_equal_to_eos_is_replaced(gguf_tokenizer_file, tmp_path):
    """A GGUF whose pad is its EOS (as SmolLM2's): the pad becomes the spare control token
    `<|endoftext|>` (id 0), never a stop id, and the vocabulary does not grow past the 300-row
    embedding; the saved directory says the same to `transformers`."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    tok = Tokenizer.from_gguf(gguf_tokenizer_file("smollm", True))
    assert tok.eos_id == 2 and not tok.added_pad
    assert tok.stop_ids == (2,) and tok.template_turn_end() == "<|im_end|>"
    assert (tok.pad_id, tok.vocab_size) == (0, 300) and tok.pad_id not in tok.stop_ids
    ids, mask = tok.encode_batch(["the cat", "a"], 4, side="left")
    assert ids[1].tolist()[:3] == [0] * 3 and mask[1].tolist() == [0, 0, 0, 1]
    assert tok.decode(ids[1]) == "a"
    tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ref.pad_token_id, ref.eos_token_id, len(ref)) == (0, 2, 300)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert Tokenizer.from_file(tmp_path).pad_id == 0


def test_from_gguf_errors(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed for the GGUF tests")
    from rlhf_jax.gguf import GGUFError

    def write(name: str, **kv) -> Path:
        w = gguf.GGUFWriter(tmp_path / name, "llama")
        w.add_tokenizer_model(kv.pop("model", "gpt2"))
        w.add_token_list(["a", "b", "ab"])
        w.add_token_merges(kv.pop("merges", ["a b"]))
        for key, value in kv.items():
            w.add_string(key, value)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    assert Tokenizer.from_gguf(write("ok.gguf")).encode("ab") == [2]
    with pytest.raises(GGUFError, match=r"spm\.gguf: metadata 'tokenizer.ggml.model' = 'llama'"):
        Tokenizer.from_gguf(write("spm.gguf", model="llama"))
    with pytest.raises(GGUFError, match=r"pre\.gguf: metadata 'tokenizer.ggml.pre' = 'tekken'"):
        Tokenizer.from_gguf(write("pre.gguf", **{"tokenizer.ggml.pre": "tekken"}))
    with pytest.raises(GGUFError, match=r"merge\.gguf: metadata 'tokenizer.ggml.merges'\[0\]"):
        Tokenizer.from_gguf(write("merge.gguf", merges=["a b c"]))


def test_config_stop_tokens_and_extra_specials(tmp_path):
    """`tokenizer_config.json`'s `eos_token` list and `additional_special_tokens`, and
    `generation_config.json`'s `eos_token_id` list (Llama 3's shape); a pad named in the config
    that is a stop id is replaced by a spare special token; bad ids name the file."""
    hf = word_tokenizer(["<unk>", "<|begin|>", "<|end_text|>", "<|eot|>", "<|eom|>", "<|spare|>", "hi", "<x>"])
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in
                           ("<|begin|>", "<|end_text|>", "<|eot|>", "<|eom|>", "<|spare|>")])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin|>", "eos_token": ["<|end_text|>", {"content": "<|eom|>"}],
        "pad_token": "<|eot|>", "additional_special_tokens": ["<x>"]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2, 3, 4))
    assert tok.pad_id == 5 and not tok.added_pad and tok.vocab_size == 8  # <|spare|>, no growth
    assert tok.encode("hi <x>") == [6, 7] and tok.decode([6, 7]) == "hi"  # <x> is special now
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 99}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id 99 is not in"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"generation_config.json: expected a JSON object"):
        Tokenizer.from_file(tmp_path)


def test_from_gguf_eot_and_eom_are_stop_ids(tmp_path):
    """llama.cpp's `tokenizer.ggml.eot_token_id` / `eom_token_id` (Llama 3's `<|eot_id|>`,
    `<|eom_id|>`) join EOS in `stop_ids`; the pad (= EOS in the file) becomes the spare control
    token, not one of them."""
    gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed for the GGUF tests")
    w = gguf.GGUFWriter(tmp_path / "l3.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["<|begin|>", "<|end_text|>", "<|eot|>", "<|eom|>", "<|reserved|>", "a", "b", "ab"])
    w.add_token_types([3, 3, 3, 3, 3, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(1)
    w.add_eot_token_id(2)
    w.add_eom_token_id(3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_gguf(tmp_path / "l3.gguf")
    assert (tok.bos_id, tok.eos_id, tok.stop_ids, tok.pad_id, tok.vocab_size) == (0, 1, (1, 2, 3), 4, 8)
