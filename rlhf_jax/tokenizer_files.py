"""The files beside a Hugging Face `tokenizer.json` and the special-token names they give.

Read: `special_tokens_map.json` and `tokenizer_config.json` (bos/eos/pad token names, extra special
tokens, `add_bos_token`, the chat template), `chat_template.jinja`, and `generation_config.json`
(`eos_token_id`: stop ids). Written by `Tokenizer.save`: `tokenizer_config.json` and
`generation_config.json`, so `Tokenizer.from_file` and `transformers` load the same tokenizer back.
Also the common token names tried when no file names a token (`find_id`). `rlhf_jax.tokenizer`'s
docstring says how the bos, eos, pad and stop ids are decided from these.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken

GENERATION_CONFIG = "generation_config.json"

# Names tried, in order, when no config file names the token.
BOS_CANDIDATES = (
    "<s>", "<|bos|>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"
)
EOS_CANDIDATES = ("</s>", "<|eos|>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


def find_id(
    hf: tokenizers.Tokenizer, name: str | None, candidates: Sequence[str], field: str
) -> int | None:
    """Id of the token `name` (which must exist: ValueError naming `field` otherwise), else of the
    first of `candidates` that exists, else None."""
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


def read_tokenizer_json(path: str | os.PathLike) -> tuple[Path, tokenizers.Tokenizer, dict[str, Any]]:
    """A Hugging Face `tokenizer.json` (the file, or a directory that holds it) and what the
    config files beside it say (`Tokenizer.from_file`).

    Returns:
      file: the `tokenizer.json` read.
      hf: its `tokenizers.Tokenizer`, with `additional_special_tokens` / `extra_special_tokens`
        added as special tokens (kept whole, skipped by `decode`).
      settings: `Tokenizer(...)` keyword arguments: `bos_token`, `eos_token`, `pad_token` (None
        when no file names one), `add_bos_token`, `chat_template`, `template_source` and
        `stop_tokens` (an `eos_token` list's tokens, and those of `generation_config.json`'s
        `eos_token_id`, an id or a list).

    Raises:
      FileNotFoundError: no tokenizer.json at `path`.
      ValueError: a file does not parse, or `generation_config.json` names an id the vocabulary
        lacks (the message names the file).
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
            raise ValueError(f"{file.parent / GENERATION_CONFIG}: eos_token_id {i} is not in "
                             f"the tokenizer's vocabulary")
        stop_tokens.append(hf.id_to_token(i))
    settings = {
        "bos_token": names.get("bos_token"),
        "eos_token": names.get("eos_token"),
        "pad_token": names.get("pad_token"),
        "add_bos_token": names.get("add_bos_token", False),
        "chat_template": names.get("chat_template"),
        "stop_tokens": stop_tokens,
        "template_source": names.get("chat_template_source", "chat_template"),
    }
    return file, hf, settings


def write_config_files(
    directory: Path,
    hf: tokenizers.Tokenizer,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int,
    stop_ids: Sequence[int],
    add_bos_token: bool,
    chat_template: str | None,
) -> None:
    """Writes `tokenizer_config.json` (the bos/eos/pad token names, `add_bos_token`,
    `chat_template`, `tokenizer_class` for `transformers`' `AutoTokenizer`) and
    `generation_config.json` (`eos_token_id`: the stop ids when there are several, else the EOS id)
    into `directory`, removing a `chat_template.jinja` there that would shadow the template."""
    config: dict[str, Any] = {
        f"{k}_token": hf.id_to_token(i)
        for k, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id))
        if i is not None
    }
    config.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos_token)
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "chat_template.jinja").unlink(missing_ok=True)  # would shadow ours
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos_id, "pad_token_id": pad_id,
                  "eos_token_id": list(stop_ids) if len(stop_ids) > 1 else eos_id}
    (directory / GENERATION_CONFIG).write_text(
        json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2))


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
    generation = _read_json(file.parent / GENERATION_CONFIG) or {}
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
