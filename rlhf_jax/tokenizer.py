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

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from rlhf_jax.chat import apply_chat_template
from rlhf_jax.tokenizer_files import (
    BOS_CANDIDATES,
    EOS_CANDIDATES,
    PAD_CANDIDATES,
    find_id,
    read_tokenizer_json,
    write_config_files,
)
from rlhf_jax.tokenizer_import import gguf_tokenizer, llama2c_tokenizer

PAD_TOKEN = "<|pad|>"

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
        self._bos_id = find_id(hf, bos_token, BOS_CANDIDATES, "bos_token")
        self._eos_id = find_id(hf, eos_token, EOS_CANDIDATES, "eos_token")
        stops = {find_id(hf, t, (), "stop token") for t in stop_tokens}
        turn_end = self.template_turn_end()
        self._stop_ids = tuple(sorted(
            i for i in {self._eos_id, *stops, None if turn_end is None else hf.token_to_id(turn_end)}
            if i is not None))
        pad_id = find_id(hf, pad_token, PAD_CANDIDATES, "pad_token")
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
        file, hf, settings = read_tokenizer_json(path)
        given = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        settings.update({k: v for k, v in given.items() if v})
        try:
            return cls(hf, **settings)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata (byte-level BPE,
        ids identical to `transformers`' GGUF loader's; `tokenizer_import.gguf_tokenizer`).

        Raises:
          FileNotFoundError: no file at `path`.
          GGUFError (a ValueError): not a GGUF file, or a tokenizer model, pre-tokenizer or merge
            that is not supported, naming the file and the key.
        """
        hf, settings = gguf_tokenizer(path)
        return cls(hf, **settings)

    @classmethod
    def from_llama2c(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a llama2.c tokenizer (`tok512.bin`) as an equivalent `tokenizers` BPE
        (`tokenizer_import.llama2c_tokenizer`); `<|pad|>` is added as id = vocab size."""
        hf, settings = llama2c_tokenizer(path)
        return cls(hf, **settings)

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
            write_config_files(path, self.hf, bos_id=self._bos_id, eos_id=self._eos_id,
                               pad_id=self._pad_id, stop_ids=self._stop_ids,
                               add_bos_token=self.add_bos_token, chat_template=self.chat_template)
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

