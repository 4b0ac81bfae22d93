"""Tokenizers rebuilt from other formats as `tokenizers` models: a GGUF file's `tokenizer.ggml.*`
metadata (byte-level BPE, as `transformers`' GGUF loader builds it) and llama2.c's `tok512.bin`
(score-ranked BPE with byte fallback). `Tokenizer.from_gguf` / `Tokenizer.from_llama2c` wrap them.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers


def gguf_tokenizer(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata, and its
    `Tokenizer(...)` keyword arguments (bos/eos/pad token names, `add_bos_token`,
    `chat_template`, `stop_tokens`, `template_source`).

    Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE: GPT-2, SmolLM2, Llama 3, Qwen2) is
    supported. It is built as `transformers`' GGUF loader builds it (`gguf_tokenizer_mapping`:
    `byte_level_tokenizer`, `add_gguf_special_tokens`, `set_split_regex`), so the ids are
    identical: the vocabulary `tokens` (a token not spelled in GPT-2's byte alphabet is
    respelled byte by byte), the `merges`, GPT-2's byte-level pre-tokenizer, or the split
    regex named by `tokenizer.ggml.pre` for the Llama 3 and Qwen2 families; tokens of
    `token_type` 3 (control) become special added tokens, type 4 (user-defined) plain added
    tokens. BOS/EOS/pad come from `tokenizer.ggml.{bos,eos,padding}_token_id` (pad = EOS is
    replaced, `rlhf_jax.tokenizer`'s docstring), stop tokens from
    `tokenizer.ggml.{eot,eom}_token_id`, `add_bos_token` from `tokenizer.ggml.add_bos_token`, the
    template from `tokenizer.chat_template`.

    Raises:
      FileNotFoundError: no file at `path`.
      GGUFError (a ValueError): not a GGUF file, or a tokenizer model, pre-tokenizer or merge
        that is not supported, naming the file and the key.
    """
    from rlhf_jax.gguf import GGUFError, gguf_metadata

    path = Path(path)
    meta = gguf_metadata(path)

    def key(name: str, default: Any = ...) -> Any:
        if name in meta:
            return meta[name]
        if default is ...:
            raise GGUFError(f"{path}: metadata {name!r} is missing")
        return default

    model_type = key("tokenizer.ggml.model")
    if model_type != "gpt2":
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.model' = {model_type!r} is not "
                        "supported (only 'gpt2', byte-level BPE)")
    pre = key("tokenizer.ggml.pre", "default")
    if pre in _GGUF_UNSUPPORTED_PRE:
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.pre' = {pre!r} is not supported")
    tokens = key("tokenizer.ggml.tokens")
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = []
    for i, merge in enumerate(key("tokenizer.ggml.merges")):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{path}: metadata 'tokenizer.ggml.merges'[{i}] = {merge!r} is not "
                            "two tokens separated by one space")
        merges.append(tuple(pair))
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                         continuing_subword_prefix="", end_of_word_suffix="",
                                         fuse_unk=False))
    split = _GGUF_PRE_SPLITS.get(pre)
    if split is None:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    hf.decoder = decoders.ByteLevel()
    types = key("tokenizer.ggml.token_type", [])
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers
    # skips it too: adding it would grow the vocabulary past the embedding).
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, kind in zip(tokens, types) if kind == 4 and t in vocab])

    def name(field: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{field}_token_id")
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise GGUFError(f"{path}: metadata 'tokenizer.ggml.{field}_token_id' = {i} is outside "
                            f"the {len(tokens)} tokens")
        return tokens[i]

    return hf, dict(bos_token=name("bos"), eos_token=name("eos"), pad_token=name("padding"),
                    add_bos_token=key("tokenizer.ggml.add_bos_token", False),
                    chat_template=key("tokenizer.chat_template", None),
                    stop_tokens=[t for t in (name("eot"), name("eom")) if t is not None],
                    template_source=f"{path}: tokenizer.chat_template")


def llama2c_tokenizer(path: str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """A llama2.c tokenizer (`tok512.bin`) as an equivalent `tokenizers` BPE, and its
    `Tokenizer(...)` keyword arguments (the bos and eos token names).

    Format: int32 max token length, then per id: float32 score, int32 byte length, bytes.
    Ids 0, 1, 2 are `<unk>`, BOS, EOS; byte-fallback tokens are `<0xXX>`.
    llama2.c encodes by prepending one space, mapping each character to its id (else its
    UTF-8 bytes to byte tokens) and repeatedly merging the adjacent pair whose concatenation
    has the highest score. That is a BPE whose merge ranks are the merged tokens' scores in
    descending order, which is what is built here (the tests check it against a direct
    implementation of the loop). Decoding drops the prepended space, as Hugging Face's Llama
    tokenizers do. The special tokens are renamed to `<unk>`, `<s>`, `</s>` (llama2.c stores
    them as "\\n<s>\\n" etc.), and `Tokenizer` adds `<|pad|>` as id = vocab size (llama2.c has none).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c tokenizer file not found: {path}")
    pieces, scores = _read_llama2c(path)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        vocab.setdefault(specials.get(i, piece), i)
    mergeable = {p: i for p, i in vocab.items() if i >= 3 and not _is_byte_token(p)}
    merges = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[i], i, left, right))
    merges.sort()
    model = models.BPE(
        vocab=vocab,
        merges=[(a, b) for _, _, a, b in merges],
        unk_token="<unk>",
        byte_fallback=True,
    )
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.Prepend(" ")
    hf.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials.values()]
    )
    return hf, dict(bos_token="<s>", eos_token="</s>")


def _byte_spelling() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`: each byte's printable stand-in in byte-level BPE vocabularies
    (printable Latin-1 bytes as themselves, the other 68 as chr(256 + k) in byte order)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(extra)}}


# `tokenizer.ggml.pre` values whose split regex differs from GPT-2's, as in transformers'
# `GGUF_PRE_TOKENIZER_SPLITS` (Llama 3 and Qwen2 families); the remaining ones there are refused.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                     "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
}
_GGUF_UNSUPPORTED_PRE = ("tekken", "qwen35", "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")


def _read_llama2c(path: Path) -> tuple[list[str], list[float]]:
    """(pieces, scores) of a llama2.c tokenizer file."""
    data = path.read_bytes()
    pieces, scores = [], []
    offset = 4  # skips the int32 max token length
    try:
        while offset < len(data):
            score, length = struct.unpack_from("<fi", data, offset)
            piece = data[offset + 8 : offset + 8 + length]
            if length < 0 or len(piece) != length:
                raise struct.error(f"token {len(pieces)} runs past the end of the file")
            pieces.append(piece.decode("utf-8"))
            scores.append(score)
            offset += 8 + length
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"cannot parse llama2.c tokenizer file {path}: {e}") from e
    if len(pieces) < 3:
        raise ValueError(f"cannot parse llama2.c tokenizer file {path}: only {len(pieces)} tokens")
    return pieces, scores


def _is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
