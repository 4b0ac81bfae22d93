"""Records -> padded NumPy token arrays with masks (no JAX here).

Conventions shared by every helper:
- `tokens` int32, pad positions hold `tokenizer.pad_id` (never EOS); `mask` int32, 1 on real tokens.
- `loss_mask[b, t] = 1` when token t is a training *target* (predicted from tokens < t): the
  response tokens and the final EOS; 0 on BOS, prompt and pad. A loss shifts it like the tokens:
  logits[:, :-1] predict tokens[:, 1:] weighted by loss_mask[:, 1:].
- A prompt and its response are encoded together as one string (so sentencepiece-style
  tokenizers do not add a second dummy space); a token whose character span crosses into the
  response counts as a response token.
- Chat records (`data.messages`: `{"messages": [...]}`) are rendered by the tokenizer's chat
  template, which writes BOS and the turn ends itself (no BOS/EOS added); an SFT dialogue's
  targets are its assistant turns.
- Lengths are bucketed: the time axis is the smallest bucket length that holds the longest
  sequence, so a jitted step sees only a few shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.messages import chat_comparisons_as_text, chat_demonstration_ids, chat_prompts_as_text, is_chat
from rlhf_jax.data.readers import Comparison, Demonstration, Prompt, Records
from rlhf_jax.data.truncation import TruncationStats, check_truncation, cut, fit_group
from rlhf_jax.tokenizer import Tokenizer

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


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
    stats: TruncationStats | None = None,
) -> dict[str, np.ndarray]:
    """SFT arrays, right padded: `[BOS] prompt response [EOS] pad...`.

    Args:
      buckets: allowed sequence lengths; the arrays get the smallest one that fits all records.
      train_on_prompt: put the prompt tokens in `loss_mask` too (IG is silent on prompt masking;
        masking it is our default, see shared/instructgpt.md).
      truncation: for a record longer than the largest bucket, `data.truncation`'s rule
        ("error", "left", "right" or "skip"); a "right" cut adds no EOS (the response did not
        end there), and a record left with no response token is skipped.
      stats: counts of cut and skipped records, filled in (also logged).

    Returns:
      tokens, mask, loss_mask: int32 `[n, L]`.
    """
    check_truncation(truncation)
    chat = is_chat(records)
    if chat:  # the template writes BOS and the turn ends (data.messages)
        add_bos = add_eos = False
    tokenizer.add_special([], add_bos, add_eos)  # fails early without bos/eos tokens
    stats = TruncationStats() if stats is None else stats
    max_len = max(buckets)
    head = int(add_bos)
    pairs = (chat_demonstration_ids(tokenizer, records) if chat
             else _encode_pairs(tokenizer, [(r.prompt, r.response) for r in records]))
    rows = []
    for i, (ids, is_response) in enumerate(pairs):
        stats.records += 1
        target = [train_on_prompt or r for r in is_response]
        if add_bos:
            ids, target, is_response = [tokenizer.bos_id, *ids], [False, *target], [False, *is_response]
        if add_eos:
            ids, target, is_response = [*ids, tokenizer.eos_id], [*target, True], [*is_response, True]
        first_target = is_response.index(True) if True in is_response else len(is_response)
        fit = fit_group([len(ids)], [first_target - head], max_len, truncation,
                        f"demonstration {i}{_line(records, i)}")
        if fit is None:
            stats.skipped += 1
            continue
        if len(ids) > max_len:
            if truncation == "right" and add_eos:  # the cut response does not end at the cut
                ids, target = ids[:-1], target[:-1]
            ids, target = cut(ids, *fit, head), cut(target, *fit, head)
            if not any(target):
                stats.skipped += 1
                continue
            stats.cut += 1
        rows.append((ids, target))
    stats.log(_name(records), "demonstrations", max_len, truncation)
    if not rows:
        raise ValueError("no demonstrations to tokenize" + (" (all were skipped)" if records else ""))
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
    truncation: str = "error",
    stats: TruncationStats | None = None,
    with_loss_mask: bool = False,
) -> dict[str, np.ndarray]:
    """Reward-model (and DPO) arrays: each response as `[BOS] prompt response [EOS]`, right padded.

    Responses stay best-first (as `Comparison` holds them); a record with K < k_max responses
    gets all-pad rows with `valid` 0 after its K real ones. The reward model reads its score at
    each sequence's last real token (the EOS), index `mask.sum(-1) - 1`.  A record with a
    sequence longer than `max_len` follows `truncation` (`data.truncation`: with "left" its K
    sequences lose the same oldest prompt tokens, so they still share one prompt); `stats`
    counts cut and skipped records (also logged).

    Returns:
      tokens, mask: int32 `[n, k_max, max_len]`; valid: int32 `[n, k_max]` (n: records kept);
      with `with_loss_mask` also loss_mask `[n, k_max, max_len]`, 1 at each response's tokens and
      its EOS (the module's convention; DPO sums the response log-probs under it).

    Raises:
      ValueError: a record has more than k_max responses, or a sequence is longer than max_len
        with `truncation="error"` (the message names the record, its line and the response), or
        every record was skipped.
    """
    check_truncation(truncation)
    if is_chat(records):  # as text; the template writes BOS and the turn ends (data.messages)
        records, add_bos, add_eos = chat_comparisons_as_text(tokenizer, records), False, False
    stats = TruncationStats() if stats is None else stats
    for i, rec in enumerate(records):
        if len(rec.responses) > k_max:
            raise ValueError(f"comparison {i}{_line(records, i)} has {len(rec.responses)} responses > k_max {k_max}")
    head = int(add_bos)
    pairs = iter(_encode_pairs(tokenizer, [(rec.prompt, r) for rec in records for r in rec.responses]))
    rows = []
    for i, rec in enumerate(records):
        stats.records += 1
        group = [next(pairs) for _ in rec.responses]
        seqs = [tokenizer.add_special(ids, add_bos, add_eos) for ids, _ in group]
        targets = [[False] * head + is_response + [True] * add_eos for _, is_response in group]
        prompt_lengths = [is_response.count(False) for _, is_response in group]
        fit = fit_group([len(s) for s in seqs], prompt_lengths, max_len, truncation,
                        f"comparison {i}{_line(records, i)}")
        if fit is None:
            stats.skipped += 1
            continue
        if max(len(s) for s in seqs) > max_len:
            stats.cut += 1
            seqs = [cut(s, *fit, head) for s in seqs]
            targets = [cut(t, *fit, head) for t in targets]
        rows.append((seqs, targets))
    stats.log(_name(records), "comparisons", max_len, truncation)
    if records and not rows:
        raise ValueError(f"all {len(records)} comparisons were skipped (truncation={truncation!r}, max_len {max_len})")
    tokens = np.full((len(rows), k_max, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), k_max, max_len), np.int32)
    valid = np.zeros((len(rows), k_max), np.int32)
    loss_mask = np.zeros_like(mask)
    for i, (seqs, targets) in enumerate(rows):
        for k, (ids, target) in enumerate(zip(seqs, targets)):
            tokens[i, k, : len(ids)] = ids
            mask[i, k, : len(ids)] = 1
            loss_mask[i, k, : len(ids)] = target
            valid[i, k] = 1
    arrays = {"tokens": tokens, "mask": mask, "valid": valid}
    return {**arrays, "loss_mask": loss_mask} if with_loss_mask else arrays


def tokenize_prompts(
    records: Sequence[Prompt],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    add_bos: bool = True,
    truncation: str = "error",
    stats: TruncationStats | None = None,
) -> dict[str, np.ndarray]:
    """Rollout prompts, left padded so every prompt ends at the last column.

    A prompt longer than `max_len` (BOS included) follows `truncation` (`data.truncation`: "left"
    keeps its end, "right" its start, "skip" drops it); `stats` counts them (also logged).

    Returns:
      tokens, mask: int32 `[n, max_len]` (n: prompts kept).
    """
    check_truncation(truncation)
    if is_chat(records):  # rendered with the generation prompt; the template writes BOS
        records, add_bos = chat_prompts_as_text(tokenizer, records), False
    stats = TruncationStats() if stats is None else stats
    head = int(add_bos)
    rows = []
    for i, enc in enumerate(tokenizer.hf.encode_batch([r.prompt for r in records], add_special_tokens=False)):
        stats.records += 1
        ids = tokenizer.add_special(enc.ids, add_bos, False)
        # A prompt is all prompt: "left" may drop all but its head.
        fit = fit_group([len(ids)], [len(ids) - head], max_len, truncation, f"prompt {i}{_line(records, i)}")
        if fit is None:
            stats.skipped += 1
            continue
        if len(ids) > max_len:
            stats.cut += 1
            ids = cut(ids, *fit, head)
        rows.append(ids)
    stats.log(_name(records), "prompts", max_len, truncation)
    if records and not rows:
        raise ValueError(f"all {len(records)} prompts were skipped (truncation={truncation!r}, max_len {max_len})")
    tokens = np.full((len(rows), max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for b, ids in enumerate(rows):
        tokens[b, max_len - len(ids):] = ids
        mask[b, max_len - len(ids):] = 1
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


def _line(records: Sequence, i: int) -> str:
    """`" (line n)"` for records read from a file (`Records`), else empty."""
    return f" (line {records.lines[i]})" if isinstance(records, Records) else ""


def _name(records: Sequence) -> str:
    return str(records.path) if isinstance(records, Records) else "records"


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
