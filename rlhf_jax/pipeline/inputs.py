"""The pipeline's inputs: the built-in world's files (or the user's), the tokenizer, and the
pretraining corpus as prompt-less demonstrations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlhf_jax.tasks import make_world_files, pretraining_texts, write_jsonl
from rlhf_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from rlhf_jax.pipeline.config import PipelineConfig


def world_files(cfg: PipelineConfig) -> dict[str, Path]:
    """The synthetic world's JSONL files (idempotent: same seed, same bytes)."""
    data = cfg.run_dir / "data"
    if cfg.task == "files":
        return {k: Path(v) for k, v in dataclasses.asdict(cfg.files).items() if v is not None}
    files = {name: data / f"{name}.jsonl" for name in ("pretrain", "demos", "demos_eval", "prompts", "prompts_eval")}
    if not all(p.exists() for p in files.values()):
        files = make_world_files(data, cfg.seed, cfg.n_pretrain, cfg.n_demos, cfg.n_prompts,
                                 n_eval_demos=cfg.n_eval_demos, n_eval_prompts=cfg.n_eval_prompts, config=cfg.world)
    heldout = data / "pretrain_eval.jsonl"
    if not heldout.exists():
        rng = np.random.default_rng([cfg.seed, 99])
        write_jsonl(heldout, [{"text": t} for t in pretraining_texts(rng, 256, cfg.world)])
    return {**files, "pretrain_eval": heldout}


def tokenizer_file(cfg: PipelineConfig, files: dict[str, Path]) -> Path:
    """A byte-level BPE trained on the world's text (or the given tokenizer)."""
    if cfg.tokenizer is not None:
        return Path(cfg.tokenizer)
    if cfg.base_model is not None:
        return Path(cfg.base_model)
    path = cfg.run_dir / "tokenizer" / "tokenizer.json"
    if not path.exists():
        texts = [json.loads(line)["text"] for line in files["pretrain"].read_text().splitlines()]
        texts += [json.loads(line)["prompt"] + json.loads(line)["response"]
                  for line in files["demos"].read_text().splitlines()]
        Tokenizer.train(texts, cfg.vocab_size).save(path.parent)
    return path


def pretrain_as_demos(cfg: PipelineConfig, files: dict[str, Path], tokenizer: Path) -> Path:
    """Pretraining rows as prompt-less demonstrations (the LM loss on every token is the SFT
    loss with an empty prompt): consecutive texts joined by the EOS token, as many as fit
    ``model.max_len`` with BOS and the final EOS.  This is the layout of the PPO-ptx stream
    (``data.tokenize_texts``: ``text EOS text EOS ...``), so the ptx term and ``ptx_loss_*``
    measure the distribution the base model was trained on (attention crosses documents and the
    token after an EOS starts a new text, as in GPT-style pretraining)."""
    path = cfg.run_dir / "data" / "pretrain_as_demos.jsonl"
    if not path.exists():
        tok = Tokenizer.from_file(tokenizer)
        eos = tok.hf.id_to_token(tok.eos_id)
        texts = [json.loads(line)["text"] for line in files["pretrain"].read_text().splitlines() if line.strip()]
        rows, row, used = [], [], 0
        for text, n in zip(texts, (len(e.ids) + 1 for e in tok.hf.encode_batch(texts, add_special_tokens=False))):
            if row and used + n > cfg.model.max_len - 1:  # + BOS
                rows.append(row)
                row, used = [], 0
            row.append(text)
            used += n
        rows.append(row)
        write_jsonl(path, [{"prompt": "", "response": eos.join(r)} for r in rows if r])
    return path
