"""Records -> padded NumPy token arrays with masks (no JAX here).

Conventions shared by every helper:
- `tokens` int32, pad positions hold `tokenizer.pad_id` (never EOS); `mask` int32, 1 on real tokens.
- `loss_mask[b, t] = 1` when token t is a training *target* (predicted from tokens < t): the
  response tokens and the final EOS; 0 on BOS, prompt and pad. A loss shifts it like the tokens:
  logits[:, :-1] predict tokens[:, 1:] weighted by loss_mask[:, 1:].
- A prompt and its response are encoded together as one string (so sentencepiece-style
  tokenizers do not add a second dummy space); a token whose character span crosses into the
  response counts as a response token.
- Lengths are bucketed: the time axis is the smallest bucket length that holds the longest
  sequence, so a jitted step sees only a few shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.readers import Comparison, Demonstration, Prompt
from rlhf_jax.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)
_TRUNCATIONS = ("error", "right")


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= `length`; ValueError when `length` exceeds the largest."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")
    return min(fitting)


def tokenize_demonstrations(
    records: Sequence[Demonstration],
    tokenizer: Tokenizer,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    train_on_prompt: bool = False,
    truncation: str = "error",
) -> dict[str, np.ndarray]:
    """SFT arrays, right padded: `[BOS] prompt response [EOS] pad...`.

    Args:
      buckets: allowed sequence lengths; the arrays get the smallest one that fits all records.
      train_on_prompt: put the prompt tokens in `loss_mask` too (IG is silent on prompt masking;
        masking it is our default, see shared/instructgpt.md).
      truncation: for a record longer than the largest bucket: "error" raises ValueError naming
        the record; "right" cuts its end (then no EOS is added, since the response did not end
        there) and logs how many were cut. Records left with no response token are dropped.

    Returns:
      tokens, mask, loss_mask: int32 `[n, L]`.
    """
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"truncation must be one of {_TRUNCATIONS}, got {truncation!r}")
    tokenizer.add_special([], add_bos, add_eos)  # fails early without bos/eos tokens
    max_len = max(buckets)
    pairs = _encode_pairs(tokenizer, [(r.prompt, r.response) for r in records])
    rows, n_cut, n_dropped = [], 0, 0
    for i, (ids, is_response) in enumerate(pairs):
        target = [train_on_prompt or r for r in is_response]
        if add_bos:
            ids, target = [tokenizer.bos_id, *ids], [False, *target]
        if add_eos:
            ids, target = [*ids, tokenizer.eos_id], [*target, True]
        if len(ids) > max_len:
            if truncation == "error":
                raise ValueError(
                    f"demonstration {i} has {len(ids)} tokens, more than the largest bucket "
                    f"{max_len} (pass truncation='right' to cut it)"
                )
            n_cut += 1
            if add_eos:  # the cut response does not end at the cut, so no EOS
                ids, target = ids[:-1], target[:-1]
            ids, target = ids[:max_len], target[:max_len]
            if not any(target):
                n_dropped += 1
                continue
        rows.append((ids, target))
    if n_cut:
        logger.warning(
            "truncated %d of %d demonstrations to %d tokens (%d dropped: no response token left)",
            n_cut, len(records), max_len, n_dropped,
        )
    if not rows:
        raise ValueError("no demonstrations to tokenize")
    length = bucket_length(max(len(ids) for ids, _ in rows), buckets)
    tokens = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    loss_mask = np.zeros((len(rows), length), np.int32)
    for b, (ids, target) in enumerate(rows):
        tokens[b, : len(ids)] = ids
        mask[b, : len(ids)] = 1
        loss_mask[b, : len(ids)] = target
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


def tokenize_comparisons(
    records: Sequence[Comparison],
    tokenizer: Tokenizer,
    k_max: int,
    max_len: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
) -> dict[str, np.ndarray]:
    """Reward-model arrays: each response as `[BOS] prompt response [EOS]`, right padded.

    Responses stay best-first (as `Comparison` holds them); a record with K < k_max responses
    gets all-pad rows with `valid` 0 after its K real ones. The reward model reads its score at
    each sequence's last real token (the EOS), index `mask.sum(-1) - 1`.

    Returns:
      tokens, mask: int32 `[n, k_max, max_len]`; valid: int32 `[n, k_max]`.

    Raises:
      ValueError: a record has more than k_max responses, or a sequence is longer than max_len
        (the message names the record and the response).
    """
    for i, rec in enumerate(records):
        if len(rec.responses) > k_max:
            raise ValueError(f"comparison {i} has {len(rec.responses)} responses > k_max {k_max}")
    texts = [rec.prompt + response for rec in records for response in rec.responses]
    encodings = iter(tokenizer.hf.encode_batch(texts, add_special_tokens=False))
    n = len(records)
    tokens = np.full((n, k_max, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, k_max, max_len), np.int32)
    valid = np.zeros((n, k_max), np.int32)
    for i, rec in enumerate(records):
        for k in range(len(rec.responses)):
            ids = tokenizer.add_special(next(encodings).ids, add_bos, add_eos)
            if len(ids) > max_len:
                raise ValueError(
                    f"comparison {i} response {k} has {len(ids)} tokens, more than max_len "
                    f"{max_len}"
                )
            tokens[i, k, : len(ids)] = ids
            mask[i, k, : len(ids)] = 1
            valid[i, k] = 1
    return {"tokens": tokens, "mask": mask, "valid": valid}


def tokenize_prompts(
    records: Sequence[Prompt],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    add_bos: bool = True,
    truncation: str = "error",
) -> dict[str, np.ndarray]:
    """Rollout prompts, left padded so every prompt ends at the last column.

    `truncation` as in `Tokenizer.encode_batch` ("left" keeps a long prompt's end).

    Returns:
      tokens, mask: int32 `[n, max_len]`.
    """
    tokens, mask = tokenizer.encode_batch(
        [r.prompt for r in records], max_len, side="left", add_bos=add_bos, truncation=truncation
    )
    return {"tokens": tokens, "mask": mask}


def tokenize_texts(
    texts: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> dict[str, np.ndarray]:
    """Pretraining blocks: all texts joined as `text EOS text EOS ...`, cut into `seq_len` blocks.

    The tail shorter than one block is dropped.

    Returns:
      tokens, mask, loss_mask: int32 `[n, seq_len]`; both masks are all ones.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream: list[int] = []
    for enc in tokenizer.hf.encode_batch(list(texts), add_special_tokens=False):
        stream.extend(tokenizer.add_special(enc.ids, False, True))
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than seq_len {seq_len}")
    tokens = np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "mask": ones, "loss_mask": ones.copy()}


def pack_sequences(
    tokens: np.ndarray, mask: np.ndarray, loss_mask: np.ndarray, seq_len: int, *, pad_id: int
) -> dict[str, np.ndarray]:
    """Packs right-padded sequences several to a row (next-fit, in order).

    Each input row's real tokens (mask == 1, a prefix of the row) become one document. With
    `segment_ids` a model's attention mask is `segment_ids[q] == segment_ids[k] != 0` (plus
    causal), so attention never crosses documents; `positions` restart at 0 in each document.

    Args:
      tokens, mask, loss_mask: `[n, L]`, right padded.
      seq_len: length of a packed row; every document must fit.
      pad_id: the tokenizer's pad id, written at unused positions.

    Returns:
      tokens, mask, loss_mask, segment_ids (1, 2, ... per document, 0 on pad), positions:
      int32 `[m, seq_len]`.
    """
    lengths = np.asarray(mask).sum(axis=1)
    if np.any(lengths > seq_len):
        i = int(np.argmax(lengths > seq_len))
        raise ValueError(f"sequence {i} has {lengths[i]} tokens, more than seq_len {seq_len}")
    rows: list[list[int]] = []  # indices of the documents in each packed row
    used = seq_len
    for i, length in enumerate(lengths):
        if length == 0:
            continue
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in
           ("tokens", "mask", "loss_mask", "segment_ids", "positions")}
    out["tokens"][:] = pad_id
    for r, docs in enumerate(rows):
        start = 0
        for seg, i in enumerate(docs, start=1):
            n = lengths[i]
            span = slice(start, start + n)
            out["tokens"][r, span] = tokens[i, :n]
            out["mask"][r, span] = 1
            out["loss_mask"][r, span] = loss_mask[i, :n]
            out["segment_ids"][r, span] = seg
            out["positions"][r, span] = np.arange(n)
            start += n
    return out


def _encode_pairs(
    tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]
) -> list[tuple[list[int], list[bool]]]:
    """For each (prompt, response): the ids of prompt + response encoded together, and which
    tokens belong to the response (their character span ends past the prompt)."""
    encodings = tokenizer.hf.encode_batch([p + r for p, r in pairs], add_special_tokens=False)
    return [
        (enc.ids, [end > len(p) for _, end in enc.offsets])
        for (p, _), enc in zip(pairs, encodings, strict=True)
    ]
