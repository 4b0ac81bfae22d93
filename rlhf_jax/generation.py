"""Rollouts: jitted KV-cache generation, reward scoring, and per-token log-probs / values.

Layout of a rollout: ``tokens = [prompt | response]`` ``[batch, P + N]``; prompts are
*left*-padded (the last prompt column is a real token of every row), responses are right-padded
with ``pad_id`` after the EOS. The attention mask of the whole sequence is
``[prompt_mask | response_mask]`` and positions are ``cumsum(mask) - 1``, so a forward pass on
the finished sequence sees exactly what the decoder saw (``sequence_logprobs`` recomputes the
rollout's ``logprobs``).

Everything here is a pure function of arrays and parameter pytrees; ``generate`` can be called
inside a larger ``jax.jit`` (the PPO iteration does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.advantages import last_index
from rlhf_jax.errors import check
from rlhf_jax.losses import chunked_logprobs, logprobs_of, sft_loss, token_entropy
from rlhf_jax.masked import masked_mean
from rlhf_jax.model import (Params, Transformer, decode_step, forward, fuse_projections, init_cache, positions_from_mask,
                            resize_cache, stack_layers, unembed_fn)
from rlhf_jax.sampling import greedy_token, sample_token

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """How to decode.

    ``temperature`` 1 with no top-k/top-p is InstructGPT's rollout sampling (App. C.4);
    ``temperature=0`` or ``greedy=True`` takes the argmax.

    Stopping: a row ends at the first token in ``stops``, i.e. ``eos_id`` or any of
    ``stop_ids`` (e.g. Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``, Gemma's
    ``<end_of_turn>``: ``Tokenizer.stop_ids``); with neither set it never stops early.
    ``stop_ids`` may be given as any iterable of ints and is stored sorted and deduplicated.
    ``pad_id`` fills the response after the stop token and must not be one (never use the EOS as
    pad; instructgpt.md, "Pitfalls").
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    eos_id: int | None = None
    pad_id: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, self, "max_new_tokens", "an int >= 1")
        check(isinstance(self.temperature, (int, float)) and self.temperature >= 0,
              self, "temperature", "a float >= 0 (0 = greedy)")
        check(is_int(self.top_k) and self.top_k >= 0, self, "top_k", "an int >= 0 (0 = off)")
        check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, self, "top_p", "in (0, 1] (1 = off)")
        check(isinstance(self.greedy, bool), self, "greedy", "a bool")
        check(self.eos_id is None or (is_int(self.eos_id) and self.eos_id >= 0),
              self, "eos_id", "None or an int >= 0")
        check(is_int(self.pad_id), self, "pad_id", "an int")
        check(not isinstance(self.stop_ids, (str, bytes)) and hasattr(self.stop_ids, "__iter__"),
              self, "stop_ids", "a set or list of ints >= 0")
        stop_ids = tuple(self.stop_ids)
        check(all(is_int(i) and i >= 0 for i in stop_ids), self, "stop_ids", "a set or list of ints >= 0")
        object.__setattr__(self, "stop_ids", tuple(sorted({int(i) for i in stop_ids})))
        check(self.pad_id not in self.stop_ids, self, "pad_id", f"none of stop_ids {list(self.stop_ids)}")

    @property
    def stops(self) -> tuple[int, ...]:
        """Every id that ends a row: ``eos_id`` and ``stop_ids``, sorted (empty: never stops)."""
        eos = () if self.eos_id is None else (self.eos_id,)
        return tuple(sorted({*eos, *self.stop_ids}))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The T of the recorded ``log softmax(logits / T)``: the sampling temperature, or 1 when
        ``temperature == 0``. Pass it to ``sequence_logprobs`` to recompute the rollout's log-probs."""
        return float(self.temperature) if self.temperature > 0 else 1.0


@flax.struct.dataclass
class Rollout:
    """A batch of sampled responses.

    ``tokens`` ``[b, P + N]`` int32, prompt then response; ``prompt_mask`` ``[b, P]`` int32 (left
    padding = 0); ``response`` ``[b, N]`` int32 (``pad_id`` after the EOS); ``response_mask``
    ``[b, N]`` int32, 1 up to and including the stop token; ``logprobs`` ``[b, N]`` float32,
    ``log softmax(logits / T)`` of each sampled token under the unfiltered distribution (see
    ``rlhf_jax.sampling``), 0 outside the mask; ``ended`` ``[b]`` bool, the row emitted a stop token
    (``GenerateConfig.stops``).
    """

    tokens: Array
    prompt_mask: Array
    response: Array
    response_mask: Array
    logprobs: Array
    ended: Array

    @property
    def mask(self) -> Array:
        """``[b, P + N]`` attention mask of ``tokens``: ``[prompt_mask | response_mask]``."""
        return jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)

    @property
    def response_start(self) -> int:
        """``P``: the column of ``tokens`` where the response begins."""
        return self.prompt_mask.shape[1]


def _check_prompts(model: Transformer, prompt_ids: Any, prompt_mask: Any, config: GenerateConfig) -> None:
    if not isinstance(config, GenerateConfig):
        raise TypeError(f"generate: config must be a GenerateConfig (got {type(config).__name__})")
    c = model.config
    if c.head != "lm":
        raise ValueError(f"generate: the model needs an LM head (got ModelConfig.head={c.head!r})")
    shape, mask_shape = np.shape(prompt_ids), np.shape(prompt_mask)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must be [batch, prompt_len] with both >= 1 (got shape {shape})")
    if mask_shape != shape:
        raise ValueError(f"generate: prompt_mask shape {mask_shape} must equal prompt_ids shape {shape}")
    prompt_len, total = shape[1], shape[1] + config.max_new_tokens
    if prompt_len > c.max_len:
        raise ValueError(
            f"generate: prompt_len {prompt_len} exceeds the model context ModelConfig.max_len={c.max_len}")
    if total > c.max_len:
        raise ValueError(
            f"generate: prompt_len {prompt_len} + GenerateConfig.max_new_tokens {config.max_new_tokens} = "
            f"{total} exceeds the model context ModelConfig.max_len={c.max_len}")
    if not isinstance(prompt_mask, jax.core.Tracer):
        mask = (np.asarray(prompt_mask) != 0).astype(np.int8)
        bad = np.flatnonzero((mask[:, -1] == 0) | (np.diff(mask, axis=1) < 0).any(axis=1))
        if bad.size:
            raise ValueError(
                f"generate: prompts must be left-padded with a real last token (prompt_mask rows "
                f"{bad[:8].tolist()} are not of the form 0..0 1..1)")


def _next_token(key: Array, logits: Array, config: GenerateConfig) -> tuple[Array, Array]:
    """One decode step's token and its ``log softmax(logits / T)``, the rollout's log-prob.

    ``logits`` ``[b, V]`` float32. The row max serves the greedy pick, the log-sum-exp and the
    picked logit (``log softmax(l / T)[y] = (l_y - max) / T - log Σ exp((l - max) / T)``), so
    the step makes no ``[b, V]`` log-softmax array (and, greedy, no variadic argmax reduction).

    Returns:
      ``(token [b] int32, logprob [b] float32)``.
    """
    temperature = config.logprob_temperature
    top = jnp.max(logits, axis=-1, keepdims=True)
    if config.is_greedy:
        new = greedy_token(logits, top)
        picked = top[:, 0]
    else:
        new = sample_token(key, logits, temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p)
        picked = jnp.take_along_axis(logits, new[:, None], axis=-1)[:, 0]
    log_norm = jnp.log(jnp.sum(jnp.exp((logits - top) / temperature), axis=-1))
    return new, (picked - top[:, 0]) / temperature - log_norm


def cache_lengths(prompt_len: int, new: int, block: int) -> tuple[int, ...]:
    """The KV-cache lengths of ``generate``'s decode loops (``ModelConfig.cache_block``): with
    ``block > 0`` the multiples of ``block`` from the first that holds the prompt (step 0 writes
    slot ``prompt_len - 1``) up to, and then, ``prompt_len + new``; with ``block = 0`` only
    ``prompt_len + new``.  A loop over a cache of ``L`` slots runs the steps that write slots
    below ``L``, so each step attends to at most ``block - 1`` empty slots past the filled ones."""
    total = prompt_len + new
    if block <= 0:
        return (total,)
    return (*range(-(-prompt_len // block) * block, total, block), total)


def generate_traced(
    model: Transformer,
    params: Params,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    config: GenerateConfig,
) -> Rollout:
    """``generate`` without its Python-side checks and its own ``jax.jit``: for callers that are
    already inside a compiled program and have checked the shapes (``ppo.rollout_phase``).

    Prefill writes prompt columns ``[0, P - 1)`` into a ``P + N``-slot cache; step ``i`` of the
    ``lax.while_loop`` feeds the token at slot ``P - 1 + i`` (the last prompt token for ``i = 0``,
    else response token ``i - 1``) at position ``prompt_len - 1 + i`` with segment id 1 and
    samples response token ``i`` from its logits. The loop stops once every row has emitted a
    stop token (``config.stops``), or after ``N`` steps.

    The decode steps use ``model.fuse_projections``' weights, made once here.  With
    ``ModelConfig.cache_block`` the steps run as one loop per ``cache_lengths`` entry, over the
    prefilled cache cut to that length and then zero-padded block by block.
    """
    b, p = prompt_ids.shape
    n = config.max_new_tokens
    prompt_ids = prompt_ids.astype(jnp.int32)
    prompt_mask = (prompt_mask != 0).astype(jnp.int32)
    prompt_len = prompt_mask.sum(axis=1)
    stops = config.stops

    params = fuse_projections(params, model.config)  # once, outside the decode loop
    if model.config.scans(cached=True):  # stack the layers once, not in every decode step
        params = stack_layers(params, model.config.n_layers)
    cache = init_cache(model.config, b, p + n)
    if p > 1:  # the prefill's logits are unused, so XLA drops the unembedding
        cache = decode_step(model, params, prompt_ids[:, :-1], positions_from_mask(prompt_mask[:, :-1]),
                            prompt_mask[:, :-1], cache, 0).cache

    def body(state):
        i, token, cache, done, response, response_mask, logprobs = state
        out = decode_step(model, params, token[:, None], (prompt_len - 1 + i)[:, None],
                          jnp.ones((b, 1), jnp.int32), cache, p - 1 + i)
        new, logprob = _next_token(jax.random.fold_in(key, i), out.logits[:, 0], config)
        live = ~done
        new = jnp.where(live, new, config.pad_id)
        logprob = jnp.where(live, logprob, 0.0)
        if len(stops) == 1:
            done = done | (new == stops[0])
        elif stops:
            done = done | jnp.any(new[:, None] == jnp.asarray(stops, jnp.int32), axis=1)
        response = jax.lax.dynamic_update_slice_in_dim(response, new[:, None], i, 1)
        response_mask = jax.lax.dynamic_update_slice_in_dim(response_mask, live.astype(jnp.int32)[:, None], i, 1)
        logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, logprob[:, None], i, 1)
        return i + 1, new, out.cache, done, response, response_mask, logprobs

    def cond(state, end):
        i, done = state[0], state[3]
        if not stops:  # nothing ends early: no per-step all-reduce over the batch
            return i < end
        return (i < end) & ~jnp.all(done)

    state = (
        jnp.int32(0),
        prompt_ids[:, -1],
        cache,
        jnp.zeros((b,), bool),
        jnp.full((b, n), config.pad_id, jnp.int32),
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b, n), jnp.float32),
    )
    for length in cache_lengths(p, n, model.config.cache_block):  # step i writes slot p - 1 + i
        state = (*state[:2], resize_cache(state[2], length), *state[3:])
        state = jax.lax.while_loop(functools.partial(cond, end=min(n, length - p + 1)), body, state)
    _, _, _, done, response, response_mask, logprobs = state
    return Rollout(
        tokens=jnp.concatenate([prompt_ids, response], axis=1),
        prompt_mask=prompt_mask,
        response=response,
        response_mask=response_mask,
        logprobs=logprobs,
        ended=done,
    )


_generate_jit = jax.jit(generate_traced, static_argnames=("model", "config"))


def generate(
    model: Transformer,
    params: Params,
    prompt_ids: Array,
    prompt_mask: Array,
    key: Array,
    config: GenerateConfig,
) -> Rollout:
    """Sample up to ``config.max_new_tokens`` tokens per prompt with a KV cache.

    Compiled once per (model, config, shapes); callable inside an outer ``jax.jit``. Shapes and
    the context length are checked in Python before tracing (and, for concrete masks, that the
    prompts are left-padded).

    Args:
      model: an LM-head ``Transformer`` (static).
      params: its parameters, as they are or already in ``fuse_projections``' decode form (not
        fused again; ``shard_params`` places either form by the default rules).
      prompt_ids: ``[b, P]`` int, left-padded.
      prompt_mask: ``[b, P]`` 0/1, ``0..0 1..1`` per row.
      key: PRNG key; step ``i`` samples with ``fold_in(key, i)`` (pass a fresh key per call).
      config: decoding settings (static).

    Returns:
      A ``Rollout`` with ``N = config.max_new_tokens`` response columns.
    """
    _check_prompts(model, prompt_ids, prompt_mask, config)
    return _generate_jit(model, params, prompt_ids, prompt_mask, key, config)


def _check_sequences(fn: str, tokens: Any, mask: Any, response_start: int | None = None) -> None:
    shape = np.shape(tokens)
    if len(shape) != 2:
        raise ValueError(f"{fn}: tokens must be [batch, time] (got shape {shape})")
    if np.shape(mask) != shape:
        raise ValueError(f"{fn}: mask shape {np.shape(mask)} must equal tokens shape {shape}")
    if response_start is not None and not (
            isinstance(response_start, (int, np.integer)) and 1 <= response_start < shape[1]):
        raise ValueError(f"{fn}: response_start must be an int in [1, {shape[1]}) (got {response_start!r})")


def _check_head(fn: str, model: Transformer, head: str) -> None:
    if model.config.head != head:
        raise ValueError(f"{fn}: needs a model with ModelConfig.head={head!r} (got {model.config.head!r})")


@functools.partial(jax.jit, static_argnames=("model", "right_padded"))
def score(
    model: Transformer,
    params: Params,
    tokens: Array,
    mask: Array,
    *,
    index: Array | None = None,
    gain: float | Array = 1.0,
    bias: float | Array = 0.0,
    right_padded: bool = False,
) -> Array:
    """Reward ``gain · pool(v, index) + bias`` of whole sequences from a scalar-head model.

    Where the score is read: by default ``index = last_index(mask)``, the last real token —
    the EOS when the response has one (Stiennon et al. 2020; N+). TRL-style scoring one token
    *after* the EOS is ``index=last_index(mask) + 1`` (it must stay ``< T``); the token at
    ``index`` is always attended as a real token, whatever ``mask`` says there.

    ``pool`` is ``model.config.score_pooling``: ``"last"`` reads ``v(index)``; ``"mean"``
    averages ``v(t)`` over the real tokens ``t <= index``, prompt tokens included (under causal
    attention their values depend on the prompt alone).

    ``gain``/``bias`` normalise the reward: InstructGPT §3.5 sets a bias so labeler
    demonstrations score 0 on average; Ziegler et al. 2019 fit gain and bias to mean 0, std 1 on
    reference-policy samples.

    Args:
      tokens: ``[b, T]`` int; mask: ``[b, T]`` 0/1 (left-padded prompt, right-padded response).
      index: optional ``[b]`` int positions in ``[0, T)``.
      right_padded: static; every row is ``[BOS] prompt response`` from column 0 with padding
        after (the reward model's training rows), and ``index`` at most one past its last real
        token: see ``model.forward``.

    Returns:
      ``[b]`` float32 rewards.
    """
    _check_head("score", model, "scalar")
    _check_sequences("score", tokens, mask)
    if index is None:
        index = last_index(mask)
    index = index.astype(jnp.int32)
    cols = jnp.arange(tokens.shape[1])[None, :]
    seg = ((mask != 0) | (cols == index[:, None])).astype(jnp.int32)
    values = forward(model, params, tokens, seg, right_padded=right_padded).values
    if model.config.score_pooling == "mean":
        pooled = (seg != 0) & (cols <= index[:, None])
        mean = jnp.sum(jnp.where(pooled, values, 0.0), axis=1) / jnp.maximum(jnp.sum(pooled, axis=1), 1)
        return gain * mean + bias
    return gain * jnp.take_along_axis(values, index[:, None], axis=1)[:, 0] + bias


def score_rollout(
    model: Transformer,
    params: Params,
    rollout: Rollout,
    *,
    index: Array | None = None,
    gain: float | Array = 1.0,
    bias: float | Array = 0.0,
) -> Array:
    """``score`` of a rollout's ``tokens`` under its ``mask``: ``[b]`` float32."""
    return score(model, params, rollout.tokens, rollout.mask, index=index, gain=gain, bias=bias)


@functools.partial(jax.jit, static_argnames=("model", "response_start"))
def sequence_logprobs(
    model: Transformer,
    params: Params,
    tokens: Array,
    mask: Array,
    response_start: int,
    *,
    temperature: float | Array = 1.0,
) -> tuple[Array, Array]:
    """Log-probs and entropies of the response tokens from one forward pass.

    The logits at column ``t - 1`` give token ``t``; both use ``log softmax(logits / T)`` (the
    unfiltered temperature-scaled distribution, like the rollout; instructgpt.md "Pitfalls").

    Args:
      tokens: ``[b, P + N]`` prompt then response; mask: ``[b, P + N]`` 0/1.
      response_start: ``P`` (static).
      temperature: the rollout's ``GenerateConfig.logprob_temperature``.

    Returns:
      ``(logprobs, entropy)``, each ``[b, N]`` float32, 0 where ``mask[:, P:]`` is 0.
    """
    _check_head("sequence_logprobs", model, "lm")
    _check_sequences("sequence_logprobs", tokens, mask, response_start)
    targets = tokens[:, response_start:]
    if model.config.logits_chunk:
        hidden = forward(model, params, tokens, mask, unembed=False).hidden[:, response_start - 1:-1]
        logprobs, entropy = chunked_logprobs(unembed_fn(model.config, params), hidden, targets,
                                             model.config.logits_chunk, temperature)
    else:
        logits = forward(model, params, tokens, mask, logits_slice=(response_start - 1, -1)).logits
        logprobs, entropy = logprobs_of(logits, targets, temperature), token_entropy(logits, temperature)
    keep = mask[:, response_start:] != 0
    return jnp.where(keep, logprobs, 0.0), jnp.where(keep, entropy, 0.0)


def next_token_nll(
    model: Transformer,
    params: Params,
    tokens: Array,
    mask: Array,
    loss_mask: Array,
    *,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    right_padded: bool = False,
) -> Array:
    """``losses.sft_loss`` (= ``ptx_loss``) of ``model`` on ``tokens``: the mean next-token NLL over
    the targets ``loss_mask`` marks (aligned with ``tokens``; ``loss_mask[:, 0]`` is unused).
    ``right_padded``: as for ``model.forward`` (the rows of ``mask`` are ones then zeros).

    With ``ModelConfig.logits_chunk > 0`` the log-probs come from ``losses.chunked_logprobs`` and
    the ``[b, T, V]`` logits are never held whole; otherwise from the full logits.

    Args:
      tokens, mask, loss_mask: ``[b, T]``; positions, segment_ids: optional ``[b, T]`` (packing).

    Returns:
      A float32 scalar.
    """
    chunk = model.config.logits_chunk
    out = forward(model, params, tokens, mask, positions=positions, segment_ids=segment_ids, unembed=not chunk,
                  right_padded=right_padded)
    if not chunk:
        return sft_loss(out.logits, tokens, loss_mask)
    logprobs, _ = chunked_logprobs(unembed_fn(model.config, params), out.hidden[:, :-1], tokens[:, 1:], chunk,
                                   with_entropy=False)
    return -masked_mean(logprobs, loss_mask[:, 1:])


@functools.partial(jax.jit, static_argnames=("model", "response_start"))
def sequence_values(
    model: Transformer,
    params: Params,
    tokens: Array,
    mask: Array,
    response_start: int,
) -> Array:
    """Value estimates for the response tokens from a scalar-head model.

    The value of response token ``t`` is read at column ``t - 1``, the state whose logits predict
    ``t`` (the state *before* the action; Ziegler et al. 2019, TRL), so values and
    ``sequence_logprobs`` line up column for column.

    Args:
      tokens: ``[b, P + N]``; mask: ``[b, P + N]`` 0/1; response_start: ``P`` (static).

    Returns:
      ``[b, N]`` float32, 0 where ``mask[:, P:]`` is 0.
    """
    _check_head("sequence_values", model, "scalar")
    _check_sequences("sequence_values", tokens, mask, response_start)
    values = forward(model, params, tokens, mask).values[:, response_start - 1:-1]
    return jnp.where(mask[:, response_start:] != 0, values, 0.0)
