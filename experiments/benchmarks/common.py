"""Shared pieces of the benchmark scripts: timing, the machine's matmul peak, tables, JSON.

Benchmarks here compare against a peer measured in the same run (design.md, "Tests"), so every
script needs the same few things: a median over repeats of a blocking call, the machine's float32
matmul peak measured in that run (to turn FLOPs into a floor time and a fraction of peak), the
machine's state (the load average matters on a shared box), a plain-text table and a JSON dump.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def timed(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call of ``fn`` (which must block until its work is done)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """``(median, all times)`` in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones.

    ``fn`` must block until its work is done (``jax.block_until_ready`` on its outputs).
    """
    if repeats < 1:
        raise ValueError(f"median_time: repeats must be >= 1 (got {repeats})")
    for _ in range(warmup):
        fn()
    times = [timed(fn) for _ in range(repeats)]
    return statistics.median(times), times


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Float32 FLOP/s of an ``[n, n] @ [n, n]`` matmul (``2·n³`` FLOPs): jitted JAX, and PyTorch
    when it is importable (its CPU BLAS is often faster than XLA's, and the peak is the machine's,
    not one library's).

    Returns ``{"median": ..., "best": ..., "jax": {"median", "best"}, "torch": {...} | None,
    "n": n, "repeats": repeats}``; the top-level numbers are the better library's.  The median is
    what a benchmark's "% of peak" should divide by on a shared, noisy machine (it sees the same
    load the measured program saw); ``best`` is the closest to the hardware's capability.
    """
    flops = 2.0 * n**3
    x = np.random.default_rng(0).standard_normal((n, n), np.float32)
    a = jnp.asarray(x)
    f = jax.jit(lambda m: m @ m)
    med, times = median_time(lambda: f(a).block_until_ready(), repeats)
    result: dict[str, Any] = {"jax": {"median": flops / med, "best": flops / min(times)}, "torch": None}
    try:
        import torch
    except ImportError:
        pass
    else:
        t = torch.from_numpy(x)
        with torch.no_grad():
            med, times = median_time(lambda: t @ t, repeats)
        result["torch"] = {"median": flops / med, "best": flops / min(times)}
    libs = [r for r in (result["jax"], result["torch"]) if r]
    return {"median": max(r["median"] for r in libs), "best": max(r["best"] for r in libs),
            **result, "n": n, "repeats": repeats}


def machine_info() -> dict[str, Any]:
    """Versions, CPU count and the 1/5/15-minute load averages (the box is shared)."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()),
        "python": platform.python_version(),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned; floats as given
    (format them before passing)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON (NumPy and JAX scalars/arrays converted) and returns the path."""

    def default(x: Any) -> Any:
        if isinstance(x, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        if isinstance(x, Path):
            return str(x)
        raise TypeError(f"write_json: cannot serialise {type(x).__name__}")

    path = Path(path)
    path.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return path
