"""Tokenizer: a thin wrapper around Hugging Face `tokenizers` with explicit BOS/EOS/PAD ids.

Four ways in:

- `Tokenizer.from_file(path)` — a Hugging Face `tokenizer.json` (or a directory holding one, with
  optional `tokenizer_config.json` / `special_tokens_map.json` naming bos/eos/pad tokens, and
  `add_bos_token` and `chat_template`, also from `chat_template.jinja`).
- `Tokenizer.from_gguf(path)` — the byte-level BPE a GGUF file describes in its
  `tokenizer.ggml.*` metadata, built as `transformers`' GGUF loader builds it (identical ids).
- `Tokenizer.from_llama2c(path)` — the llama2.c `tok512.bin` format (score-ranked BPE with byte
  fallback), rebuilt as an equivalent `tokenizers` BPE model.
- `Tokenizer.train(texts, vocab_size)` — a small byte-level BPE for the synthetic task.

Special tokens: `bos_id`, `eos_id`, `pad_id`, and `stop_ids`, every id that ends a generated
answer: the EOS, the chat template's end-of-turn token (the special token the template writes right
after an assistant message: `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), the
ids of `generation_config.json`'s `eos_token_id` list beside a tokenizer file (Llama 3 lists
`<|end_of_text|>`, `<|eom_id|>`, `<|eot_id|>`), a GGUF's `tokenizer.ggml.{eot,eom}_token_id`, and
any `stop_tokens` passed in. Pass them to `GenerateConfig(stop_ids=tokenizer.stop_ids)`.

The pad token (decided here, issue 16): it is never a stop id, and it never grows the vocabulary
past the model's embedding when the tokenizer has a spare special token. In order: the pad token a
config names (or a common pad name such as Llama 3's `<|finetune_right_pad_id|>`, Gemma's
`<pad>`), unless it is a stop id; else the first special token (lowest id) that is not BOS, a stop
id, the unknown token or written by the chat template (`spare_special`): SmolLM2's GGUF says
pad = EOS (`<|im_end|>`, id 2), so its pad is `<|endoftext|>`, id 0, inside the 49,152-row
embedding, and the exported Hugging Face directory names it in `config.json` (`pad_token_id` 0)
and `tokenizer_config.json`. Only a tokenizer with no spare special token at all (GPT-2's single
`<|endoftext|>`, a trained one without a pad) gets `<|pad|>` added as a new token, id = the old
vocabulary size (`added_pad`); the stages then refuse it unless the model's embedding has that row
(`stages.sources.check_vocab`: every id, pad included, must be < the model's `vocab_size`).
Pad positions are always masked; the pad id only fills them.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from rlhf_jax.chat import apply_chat_template

PAD_TOKEN = "<|pad|>"
_GENERATION_CONFIG = "generation_config.json"

# Names tried, in order, when no config file names the token.
_BOS_CANDIDATES = (
    "<s>", "<|bos|>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"
)
_EOS_CANDIDATES = ("</s>", "<|eos|>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
_PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")

_SIDES = ("left", "right")
_TRUNCATIONS = ("error", "left", "right")


class Tokenizer:
    """Text <-> token ids with explicit special-token ids.

    Attributes:
      hf: the underlying `tokenizers.Tokenizer` (encodes without adding special tokens; BOS/EOS
        are added here, explicitly, by `encode(..., add_bos, add_eos)`).
      added_pad: True when `<|pad|>` was added because the tokenizer had no usable pad token and no
        spare special token (module docstring).
      add_bos_token: whether the model expects BOS before a text (from `tokenizer_config.json` or
        the GGUF's `tokenizer.ggml.add_bos_token`); informational, `encode` adds BOS only when asked.
      chat_template: the Jinja2 chat template, or None.
      template_source: how its errors name the template (`path/tokenizer_config.json`,
        `path/chat_template.jinja`, `file.gguf: tokenizer.chat_template`).
    """

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        stop_tokens: Sequence[str] = (),
        template_source: str = "chat_template",
    ):
        """Wraps `hf`; tokens not named are looked up among common names (`<s>`, `</s>`, ...).
        `stop_tokens`: more tokens that end an answer (module docstring, `stop_ids`);
        `template_source`: where the chat template came from, for its errors (e.g. the file)."""
        self.hf = hf
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self.template_source = template_source
        self._bos_id = _find_id(hf, bos_token, _BOS_CANDIDATES, "bos_token")
        self._eos_id = _find_id(hf, eos_token, _EOS_CANDIDATES, "eos_token")
        stops = {_find_id(hf, t, (), "stop token") for t in stop_tokens}
        turn_end = self.template_turn_end()
        self._stop_ids = tuple(sorted(
            i for i in {self._eos_id, *stops, None if turn_end is None else hf.token_to_id(turn_end)}
            if i is not None))
        pad_id = _find_id(hf, pad_token, _PAD_CANDIDATES, "pad_token")
        if pad_id is None or pad_id in self._stop_ids or pad_id == self._eos_id:
            pad_id = self.spare_special()
        self.added_pad = pad_id is None
        if self.added_pad:
            hf.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
            pad_id = hf.token_to_id(PAD_TOKEN)
            if pad_id in self._stop_ids:  # the file itself calls a stop token "<|pad|>"
                raise ValueError(
                    f"pad_token {PAD_TOKEN!r} is a stop token (EOS or end of turn); name another"
                )
        self._pad_id = int(pad_id)
        self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1
        added = hf.get_added_tokens_decoder()
        self._special_ids = frozenset(
            [i for i, tok in added.items() if tok.special]
            + [i for i in (self._bos_id, self._eos_id, self._pad_id) if i is not None]
        )

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> Tokenizer:
        """Loads a Hugging Face `tokenizer.json` (the file, or a directory that holds it).

        Special-token names come from the arguments, else `tokenizer_config.json` /
        `special_tokens_map.json` beside the file, else common names. From the config files also:
        `add_bos_token`, the chat template, `additional_special_tokens` / `extra_special_tokens`
        (made special: kept whole, skipped by `decode`), an `eos_token` list (the first is EOS,
        all are stop tokens), and `generation_config.json`'s `eos_token_id` (an id or a list:
        stop ids). A configured pad token that is a stop id is replaced (module docstring).

        Raises:
          FileNotFoundError: no tokenizer.json at `path`.
          ValueError: a file does not parse, or names a token or id the vocabulary lacks (the
            message names the file).
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ValueError(f"cannot parse tokenizer file {file}: {e}") from e
        names = _special_names_beside(file)
        extra = names.get("extra_special", [])
        if extra:
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
        stop_tokens = list(names.get("stop_tokens", []))
        for i in names.get("stop_ids", []):
            if hf.id_to_token(i) is None:
                raise ValueError(f"{file.parent / _GENERATION_CONFIG}: eos_token_id {i} is not in "
                                 f"the tokenizer's vocabulary")
            stop_tokens.append(hf.id_to_token(i))
        try:
            return cls(
                hf,
                bos_token=bos_token or names.get("bos_token"),
                eos_token=eos_token or names.get("eos_token"),
                pad_token=pad_token or names.get("pad_token"),
                add_bos_token=names.get("add_bos_token", False),
                chat_template=names.get("chat_template"),
                stop_tokens=stop_tokens,
                template_source=names.get("chat_template_source", "chat_template"),
            )
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.

        Only `tokenizer.ggml.model = "gpt2"` (byte-level BPE: GPT-2, SmolLM2, Llama 3, Qwen2) is
        supported. It is built as `transformers`' GGUF loader builds it (`gguf_tokenizer_mapping`:
        `byte_level_tokenizer`, `add_gguf_special_tokens`, `set_split_regex`), so the ids are
        identical: the vocabulary `tokens` (a token not spelled in GPT-2's byte alphabet is
        respelled byte by byte), the `merges`, GPT-2's byte-level pre-tokenizer, or the split
        regex named by `tokenizer.ggml.pre` for the Llama 3 and Qwen2 families; tokens of
        `token_type` 3 (control) become special added tokens, type 4 (user-defined) plain added
        tokens. BOS/EOS/pad come from `tokenizer.ggml.{bos,eos,padding}_token_id` (pad = EOS is
        replaced by an added `<|pad|>`, module docstring), `add_bos_token` from
        `tokenizer.ggml.add_bos_token`, the template from `tokenizer.chat_template`.

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

        return cls(hf, bos_token=name("bos"), eos_token=name("eos"), pad_token=name("padding"),
                   add_bos_token=key("tokenizer.ggml.add_bos_token", False),
                   chat_template=key("tokenizer.chat_template", None),
                   stop_tokens=[t for t in (name("eot"), name("eom")) if t is not None],
                   template_source=f"{path}: tokenizer.chat_template")

    @classmethod
    def from_llama2c(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a llama2.c tokenizer (`tok512.bin`) as an equivalent `tokenizers` BPE.

        Format: int32 max token length, then per id: float32 score, int32 byte length, bytes.
        Ids 0, 1, 2 are `<unk>`, BOS, EOS; byte-fallback tokens are `<0xXX>`.
        llama2.c encodes by prepending one space, mapping each character to its id (else its
        UTF-8 bytes to byte tokens) and repeatedly merging the adjacent pair whose concatenation
        has the highest score. That is a BPE whose merge ranks are the merged tokens' scores in
        descending order, which is what is built here (the tests check it against a direct
        implementation of the loop). Decoding drops the prepended space, as Hugging Face's Llama
        tokenizers do. The special tokens are renamed to `<unk>`, `<s>`, `</s>` (llama2.c stores
        them as "\\n<s>\\n" etc.), and `<|pad|>` is added as id = vocab size (llama2.c has none).
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
        return cls(hf, bos_token="<s>", eos_token="</s>")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (PAD_TOKEN, "<|bos|>", "<|eos|>"),
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Trains a byte-level BPE (GPT-2 style pre-tokenizer and decoder) on `texts`.

        The special tokens get ids 0, 1, ... in the order given; the default names are detected as
        pad, bos and eos.
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        low = len(alphabet) + len(special_tokens)
        if vocab_size < low:
            raise ValueError(
                f"vocab_size must be >= {low} (256 byte symbols + {len(special_tokens)} special "
                f"tokens), got {vocab_size}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes `tokenizer.json` (the pad token included) and returns its path.

        `path` is the file, or a directory; for a directory a `tokenizer_config.json` naming the
        bos/eos/pad tokens, `add_bos_token` and `chat_template` is written beside it, so
        `from_file(directory)` restores the same tokenizer and `transformers`' `AutoTokenizer`
        loads it as a `PreTrainedTokenizerFast` with the same ids and template; and a
        `generation_config.json` whose `eos_token_id` lists the stop ids (so `transformers`'
        `generate` stops where `GenerateConfig(stop_ids=...)` does, and they load back).
        """
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            config: dict[str, Any] = {
                f"{k}_token": self.hf.id_to_token(i)
                for k, i in (("bos", self._bos_id), ("eos", self._eos_id), ("pad", self._pad_id))
                if i is not None
            }
            config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=self.add_bos_token)
            if self.chat_template is not None:
                config["chat_template"] = self.chat_template
            (path / "chat_template.jinja").unlink(missing_ok=True)  # would shadow ours
            (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
            generation = {"bos_token_id": self._bos_id, "pad_token_id": self._pad_id,
                          "eos_token_id": list(self._stop_ids) if len(self._stop_ids) > 1 else self._eos_id}
            (path / _GENERATION_CONFIG).write_text(
                json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2))
            path = path / "tokenizer.json"
        self.hf.save(str(path))
        return path

    # ------------------------------------------------------------------------------- properties

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None when the tokenizer has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, or None when the tokenizer has none."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of the pad token; never equal to `eos_id`."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Largest id + 1, added pad token included (may exceed the model's embedding rows)."""
        return self._vocab_size

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Sorted ids that end a generated answer (EOS, the template's end of turn, configured
        extra EOS ids; module docstring); never contains `pad_id`."""
        return self._stop_ids

    def template_turn_end(self) -> str | None:
        """The special token the chat template writes right after an assistant message's text
        (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`), found by
        rendering a probe dialogue; None without a template, when the template raises on it, or
        when no special token follows the answer."""
        if self.chat_template is None:
            return None
        probe = "PROBE-ANSWER-7f3"
        token = lambda i: None if i is None else self.hf.id_to_token(i)  # noqa: E731
        try:
            text = apply_chat_template(
                self.chat_template,
                [{"role": "user", "content": "probe question"}, {"role": "assistant", "content": probe}],
                bos_token=token(self._bos_id), eos_token=token(self._eos_id))
        except ValueError:
            return None
        cut = text.find(probe)
        if cut < 0:
            return None
        rest = text[cut + len(probe):].lstrip()
        specials = [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]
        return max((t for t in specials if rest.startswith(t)), key=len, default=None)

    def spare_special(self) -> int | None:
        """The lowest-id special token that could serve as pad: not BOS, EOS, a stop id, the
        model's unknown token, nor written by the chat template; None when there is none."""
        unk = getattr(self.hf.model, "unk_token", None)
        template = self.chat_template or ""
        taken = {self._bos_id, self._eos_id, *self._stop_ids}
        for i, tok in sorted(self.hf.get_added_tokens_decoder().items()):
            if tok.special and i not in taken and tok.content != unk and tok.content not in template:
                return i
        return None

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by `decode(..., skip_special=True)`."""
        return self._special_ids

    # ------------------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """`messages` rendered by this tokenizer's `chat_template` (`rlhf_jax.chat`), as text, or
        with `tokenize=True` as ids (the text encoded with no BOS/EOS added: the template writes
        any it wants), exactly as `transformers`' `apply_chat_template`. `extra` are more template
        variables. Raises ValueError when the tokenizer has no template, and
        `chat.ChatTemplateError` for bad messages or a template that raises."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        token = lambda i: None if i is None else self.hf.id_to_token(i)  # noqa: E731
        text = apply_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=token(self._bos_id), eos_token=token(self._eos_id), template_name=self.template_source,
            **{"pad_token": token(self._pad_id), **extra},
        )
        return self.encode(text) if tokenize else text

    # --------------------------------------------------------------------------------- encoding

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS / EOS added only when asked."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return self.add_special(ids, add_bos, add_eos)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, PAD, other added special tokens) are dropped
        when `skip_special`."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self.hf.decode(ids, skip_special_tokens=False)

    def encode_batch(
        self,
        texts: Sequence[str],
        max_len: int,
        side: str = "right",
        add_bos: bool = False,
        add_eos: bool = False,
        truncation: str = "error",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads `texts` to `[batch, max_len]`.

        Args:
          side: "left" pads before the tokens (prompts, for generation); "right" after (training).
          truncation: for a text longer than `max_len`: "error" raises ValueError naming the
            text's index; "left" drops its first tokens, "right" its last. BOS / EOS are kept.

        Returns:
          ids: int32 `[batch, max_len]`, pad positions hold `pad_id`.
          mask: int32 `[batch, max_len]`, 1 on real tokens.
        """
        if side not in _SIDES:
            raise ValueError(f"side must be one of {_SIDES}, got {side!r}")
        if truncation not in _TRUNCATIONS:
            raise ValueError(f"truncation must be one of {_TRUNCATIONS}, got {truncation!r}")
        n_special = int(add_bos) + int(add_eos)
        if max_len < max(1, n_special):
            raise ValueError(f"max_len must be >= {max(1, n_special)}, got {max_len}")
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        ids = np.full((len(encodings), max_len), self._pad_id, np.int32)
        mask = np.zeros((len(encodings), max_len), np.int32)
        room = max_len - n_special
        for b, enc in enumerate(encodings):
            body = enc.ids
            if len(body) > room:
                if truncation == "error":
                    raise ValueError(
                        f"text {b} has {len(body) + n_special} tokens, more than max_len "
                        f"{max_len} (pass truncation='left' or 'right' to cut it)"
                    )
                body = body[len(body) - room :] if truncation == "left" else body[:room]
            row = self.add_special(body, add_bos, add_eos)
            span = slice(max_len - len(row), max_len) if side == "left" else slice(0, len(row))
            ids[b, span] = row
            mask[b, span] = 1
        return ids, mask

    def add_special(self, ids: Sequence[int], add_bos: bool, add_eos: bool) -> list[int]:
        """`ids` with BOS prepended / EOS appended when asked (ValueError if the tokenizer lacks
        the token)."""
        if add_bos:
            if self._bos_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos token")
            ids = [self._bos_id, *ids]
        if add_eos:
            if self._eos_id is None:
                raise ValueError("add_eos=True but the tokenizer has no eos token")
            ids = [*ids, self._eos_id]
        return list(ids)


def _find_id(
    hf: tokenizers.Tokenizer, name: str | None, candidates: Sequence[str], field: str
) -> int | None:
    """Id of the token `name` (which must exist), else of the first candidate that exists."""
    if name is not None:
        i = hf.token_to_id(name)
        if i is None:
            raise ValueError(f"{field} {name!r} is not in the tokenizer's vocabulary")
        return i
    for cand in candidates:
        i = hf.token_to_id(cand)
        if i is not None:
            return i
    return None


def _special_names_beside(file: Path) -> dict[str, Any]:
    """What the config files beside a `tokenizer.json` say: bos/eos/pad token names from
    `special_tokens_map.json` then `tokenizer_config.json` (an `eos_token` list: the first is
    EOS, all go to "stop_tokens"); "extra_special" from `additional_special_tokens` /
    `extra_special_tokens`; from `tokenizer_config.json` also `add_bos_token` and `chat_template`
    (a `chat_template.jinja` file wins, as in `transformers`; of a list of named templates, the
    one named "default"); "stop_ids" from `generation_config.json`'s `eos_token_id`."""
    names: dict[str, Any] = {}

    def content(value: Any) -> str | None:  # "<s>" or {"content": "<s>", "lstrip": false, ...}
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    for cfg_name in ("special_tokens_map.json", "tokenizer_config.json"):
        cfg = _read_json(file.parent / cfg_name)
        if cfg is None:
            continue
        for key in ("bos_token", "eos_token", "pad_token"):
            value = cfg.get(key)
            if key == "eos_token" and isinstance(value, list):
                stops = [t for t in map(content, value) if t is not None]
                names.setdefault("stop_tokens", []).extend(stops)
                value = stops[0] if stops else None
            value = content(value)
            if value is not None and key not in names:
                names[key] = value
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = cfg.get(key)
            value = list(value.values()) if isinstance(value, dict) else value
            if isinstance(value, list):
                names.setdefault("extra_special", []).extend(t for t in map(content, value) if t is not None)
        if isinstance(cfg.get("add_bos_token"), bool):
            names["add_bos_token"] = cfg["add_bos_token"]
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(template, str):
            names["chat_template"] = template
            names["chat_template_source"] = str(file.parent / cfg_name)
    jinja = file.parent / "chat_template.jinja"
    if jinja.is_file():
        names["chat_template"] = jinja.read_text(encoding="utf-8")
        names["chat_template_source"] = str(jinja)
    generation = _read_json(file.parent / _GENERATION_CONFIG) or {}
    eos = generation.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos
    if isinstance(eos, list):
        names["stop_ids"] = [i for i in eos if isinstance(i, int) and not isinstance(i, bool)]
    return names


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, None when the file is absent; ValueError naming the file when it
    does not parse or is not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot parse {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot parse {path}: expected a JSON object, got {type(data).__name__}")
    return data


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
