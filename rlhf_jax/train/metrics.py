"""Metric sinks: `metrics.jsonl` (+ TensorBoard when available), `samples.jsonl`, a progress bar.

Only the primary process (`jax.process_index() == 0`) writes; on the others every call is a no-op.

The progress bar shows, besides steps/s and ETA, what a step costs (`BatchCount`):

- `pad`: padding efficiency, real tokens / padded tokens (the mask's ones over its size) since
  the bar started, so a bucket four times the records' length shows as 25%;
- `MFU`: model FLOPs per second over the device's *measured* peak (`measured_peak_flops`: a
  square matmul in the model's compute dtype, timed once per process), on all devices.  Model
  FLOPs are those of the padded batch (`train_flops_per_token`, PaLM's 6N + 12·L·H·Q·T), i.e. what
  the device computes: MFU says how well the device runs the shape, `pad` how much of that
  shape is real data; their product is the useful fraction of the peak.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model import ModelConfig

__all__ = ["MetricsWriter", "ProgressBar", "BatchCount", "batch_count", "train_flops_per_token",
           "measured_peak_flops"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


class MetricsWriter:
    """Appends `{"step": s, name: value, ...}` lines to `<path_dir>/metrics.jsonl`, flushed per call.

    Values may be Python, NumPy or (fetched) jax scalars; ints stay ints, the rest become floats.
    TensorBoard events go to `path_dir` too if `tensorboardX` or `flax.metrics.tensorboard`
    (TensorFlow) imports; otherwise JSONL only, said once in the log.
    """

    def __init__(self, path_dir: str | Path, *, tensorboard: bool = True, is_primary: bool | None = None) -> None:
        self.path_dir = Path(path_dir)
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._tb = None
        self._files: dict[str, TextIO] = {}
        if not self.is_primary:
            return
        self.path_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = _open_tensorboard(self.path_dir)

    def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line for `step`; returns the record written (host Python numbers)."""
        record = {"step": int(step)}
        for key, value in scalars.items():
            record[key] = _scalar(key, value)
        if self.is_primary:
            self._append(METRICS_FILE, record)
            if self._tb is not None:
                for key, value in record.items():
                    if key != "step":
                        self._tb.scalar(key, value, int(step))
                self._tb.flush()
        return record

    def write_text(self, step: int, key: str, text: str) -> None:
        """Log a text sample (e.g. a generated response) to `samples.jsonl` and TensorBoard."""
        if not self.is_primary:
            return
        self._append(SAMPLES_FILE, {"step": int(step), "key": key, "text": str(text)})
        if self._tb is not None:
            self._tb.text(key, str(text), int(step))
            self._tb.flush()

    def read(self) -> list[dict[str, Any]]:
        """All records in metrics.jsonl, in file order ([] if absent or not primary)."""
        path = self.path_dir / METRICS_FILE
        if not self.is_primary or not path.exists():
            return []
        self._flush()
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def rewind(self, step: int) -> None:
        """Drop records with step > `step` from both files (a resumed run re-does those steps)."""
        if not self.is_primary:
            return
        self._flush()
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.path_dir / name
            if not path.exists():
                continue
            with path.open(encoding="utf-8") as f:
                # A crash can leave a torn last line; it belongs to an unsaved step either way.
                keep = [line for line in f if (s := _line_step(line)) is not None and s <= step]
            if name in self._files:
                self._files.pop(name).close()
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line.rstrip("\n") + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, path)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = (self.path_dir / name).open("a", encoding="utf-8")
        f.write(json.dumps(record) + "\n")
        f.flush()

    def _flush(self) -> None:
        for f in self._files.values():
            f.flush()


class BatchCount(NamedTuple):
    """What one step processed: `real` tokens (mask ones), `padded` tokens (the mask's size),
    the model FLOPs of the padded batch, and the compute dtype they ran in (for the peak)."""

    real: int
    padded: int
    flops: float = 0.0
    dtype: str = "float32"


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a `seq_len` sequence: PaLM's estimate
    (Chowdhery et al. 2022, App. B) `6·N + 12·L·H·Q·T`, with `N` the parameters in matmuls (the
    blocks' projections and the output head; no embedding lookups, norms or biases), `L` layers,
    `H` heads of size `Q`, `T = seq_len`."""
    c = config
    attention = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.kv_heads)  # q, o; k, v
    mlp = (3 if c.arch == "llama" else 2) * c.d_model * c.ff_dim
    head = c.vocab_size * c.d_model if c.head == "lm" else c.d_model
    n = c.n_layers * (attention + mlp) + head
    return 6.0 * n + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


def batch_count(mask: Any, config: ModelConfig | None = None) -> BatchCount:
    """`BatchCount` of a batch whose `mask` (0/1, last axis time; e.g. `[b, T]` or `[b, K, T]`)
    marks its real tokens; FLOPs from `train_flops_per_token(config, T)` when `config` is given."""
    mask = np.asarray(mask)
    padded = int(mask.size)
    flops = 0.0 if config is None else padded * train_flops_per_token(config, mask.shape[-1])
    return BatchCount(int(mask.sum()), padded, flops, str(jnp.dtype(config.dtype)) if config else "float32")


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype: str = "float32") -> float:
    """FLOP/s of all local devices, measured once per process and dtype: the best of 5 timed
    `[n, n] @ [n, n]` products on one device (n = 512 on CPU, 8192 elsewhere; 2n³ FLOPs each)
    times the local device count."""
    device = jax.local_devices()[0]
    n = 512 if device.platform == "cpu" else 8192
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()  # compile
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9) * jax.local_device_count()


class ProgressBar:
    """One status line on stderr: `desc step/total [pct] steps/s tok/s pad MFU ETA`.

    On a terminal the line is redrawn in place (`\\r`, at most 10×/s); otherwise a full line is
    printed every `interval` seconds. Rates are measured from the first `update` of this bar, so
    a resumed run reports its own speed. `tokens` is what was processed since the last update:
    a count of tokens, or a `BatchCount`, which adds padding efficiency and, with FLOPs, MFU
    against `peak_flops` (default: `measured_peak_flops` of its dtype, measured at the first
    line that needs it); see the module docstring.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        initial: int = 0,
        interval: float = 30.0,
        stream: TextIO | None = None,
        is_primary: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        peak_flops: float | None = None,
    ) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.stream = sys.stderr if stream is None else stream
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._clock = clock
        self._t0 = clock()
        self._step0 = self._step = initial
        self._tokens = 0
        self._padded = 0
        self._flops = 0.0
        self._dtype = "float32"
        self._peak = peak_flops
        self._last_print = -math.inf
        self._printed_step: int | None = None

    def update(self, step: int, tokens: int | BatchCount | None = None) -> None:
        """Record that `step` steps are done (absolute count) and `tokens` more were processed."""
        self._step = step
        if isinstance(tokens, BatchCount):
            self._tokens += tokens.real
            self._padded += tokens.padded
            self._flops += tokens.flops
            self._dtype = tokens.dtype
        else:
            self._tokens += int(tokens or 0)
        now = self._clock()
        if now - self._last_print >= (0.1 if self._tty else self.interval) or step >= self.total:
            self._print(now, final=False)

    def close(self) -> None:
        """Print the final state (unless already shown) and end the line."""
        if self._printed_step != self._step:
            self._print(self._clock(), final=True)
        elif self._tty and self.is_primary:
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The status text (no line ending)."""
        elapsed = max((self._clock() if now is None else now) - self._t0, 1e-9)
        done = self._step - self._step0
        rate = done / elapsed
        parts = [f"{self.desc} " if self.desc else "", f"{self._step}/{self.total}"]
        parts.append(f" [{100.0 * self._step / max(self.total, 1):3.0f}%] {rate:.2f} steps/s")
        if self._tokens:
            parts.append(f" {self._tokens / elapsed:,.0f} tok/s")
        if self._padded:
            parts.append(f" pad {100.0 * self._tokens / self._padded:.0f}%")
        if self._flops:
            if self._peak is None:
                self._peak = measured_peak_flops(self._dtype)
            parts.append(f" MFU {100.0 * self._flops / elapsed / self._peak:.2g}% of {_si(self._peak)}FLOP/s")
        if rate > 0:
            parts.append(f" ETA {_hms((self.total - self._step) / rate)}")
        return "".join(parts)

    def _print(self, now: float, final: bool) -> None:
        if not self.is_primary:
            return
        self._last_print, self._printed_step = now, self._step
        if self._tty:
            self.stream.write("\r" + self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def _open_tensorboard(path_dir: Path) -> "_TensorBoard | None":
    try:
        import tensorboardX

        return _TensorBoard(tensorboardX.SummaryWriter(str(path_dir)), "tensorboardX")
    except ImportError:
        pass
    try:
        from flax.metrics import tensorboard as flax_tb

        return _TensorBoard(flax_tb.SummaryWriter(str(path_dir)), "flax")
    except ImportError:
        pass
    log.info("TensorBoard not available (pip install tensorboardX); writing %s only", path_dir / METRICS_FILE)
    return None


class _TensorBoard:
    """The two summary-writer APIs behind one interface."""

    def __init__(self, writer: Any, kind: str) -> None:
        self.writer, self.kind = writer, kind

    def scalar(self, key: str, value: float, step: int) -> None:
        if self.kind == "tensorboardX":
            self.writer.add_scalar(key, value, step)
        else:
            self.writer.scalar(key, value, step)

    def text(self, key: str, text: str, step: int) -> None:
        if self.kind == "tensorboardX":
            self.writer.add_text(key, text, step)
        else:
            self.writer.text(key, text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _scalar(key: str, value: Any) -> int | float:
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(f"metric {key!r} must be a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool) or not isinstance(item, (int, float)):
        return float(item)
    return item


def _line_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _si(value: float) -> str:
    """`value` with an SI prefix and a trailing space: 1.2e12 -> "1.2 T"."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}"
    return f"{value:.1f} "


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
