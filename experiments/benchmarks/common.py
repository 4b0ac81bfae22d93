"""Shared pieces of the benchmark scripts: timing, the machine's matmul peak and memory bandwidth,
tables, JSON.

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


def matmul_probes(n: int = 2048, dtype: str = "float32") -> dict[str, Callable[[], Any]]:
    """Blocking calls of an ``[n, n] @ [n, n]`` matmul (``2·n³`` FLOPs) in ``dtype``: ``"jax"``
    (jitted), and ``"torch"`` for float32 on a CPU backend when PyTorch is importable (its CPU BLAS
    is often faster than XLA's, and the peak is the machine's, not one library's)."""
    x = np.random.default_rng(0).standard_normal((n, n), np.float32)
    a = jnp.asarray(x, dtype)
    f = jax.jit(lambda m: m @ m)
    probes: dict[str, Callable[[], Any]] = {"jax": lambda: f(a).block_until_ready()}
    try:
        import torch
    except ImportError:
        return probes
    if dtype == "float32" and jax.default_backend() == "cpu":
        t = torch.from_numpy(x)

        def torch_matmul() -> Any:
            with torch.no_grad():
                return t @ t

        probes["torch"] = torch_matmul
    return probes


def measure_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict[str, Any]:
    """FLOP/s of the ``matmul_probes``: median and best of ``repeats`` calls each.

    Returns ``{"median": ..., "best": ..., "jax": {"median", "best"}, "torch": {...} | None,
    "n": n, "repeats": repeats, "dtype": dtype}``; the top-level numbers are the better library's.
    The median is what a benchmark's "% of peak" should divide by on a shared, noisy machine (it
    sees the same load the measured program saw); ``best`` is the closest to the hardware's
    capability.
    """
    flops = 2.0 * n**3
    result: dict[str, Any] = {"jax": None, "torch": None}
    for name, probe in matmul_probes(n, dtype).items():
        med, times = median_time(probe, repeats)
        result[name] = {"median": flops / med, "best": flops / min(times)}
    libs = [r for r in (result["jax"], result["torch"]) if r]
    return {"median": max(r["median"] for r in libs), "best": max(r["best"] for r in libs),
            **result, "n": n, "repeats": repeats, "dtype": dtype}


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, Any]:
    """Memory bandwidth in bytes/s of a float32 array of ``n_bytes`` (far larger than the caches):
    a sum (reads ``n_bytes``) and a scale-and-copy ``y = 2·x`` (reads and writes ``n_bytes`` each:
    2·``n_bytes`` counted; write-allocate traffic, when the CPU does it, is not), in jitted JAX
    and, on a CPU backend, NumPy.

    Returns ``{"median", "best", "read": {"jax", "numpy"}, "copy": {...}, "n_bytes", "repeats"}``
    with ``{"median", "best"}`` per entry; the top level is the best entry's.  A decode step
    mostly reads (weights, KV cache), so ``read`` is the closest to its bound.
    """
    n = n_bytes // 4
    host = np.random.default_rng(0).standard_normal(n, np.float32)
    x = jnp.asarray(host)
    jsum, jcopy = jax.jit(jnp.sum), jax.jit(lambda v: 2 * v)
    kinds: dict[str, dict[str, tuple[Callable[[], Any], float]]] = {
        "read": {"jax": (lambda: jsum(x).block_until_ready(), n_bytes)},
        "copy": {"jax": (lambda: jcopy(x).block_until_ready(), 2 * n_bytes)},
    }
    if jax.default_backend() == "cpu":
        out = np.empty_like(host)
        kinds["read"]["numpy"] = (lambda: host.sum(), n_bytes)
        kinds["copy"]["numpy"] = (lambda: np.multiply(host, 2, out=out), 2 * n_bytes)
    result: dict[str, Any] = {}
    for kind, libs in kinds.items():
        result[kind] = {}
        for lib, (fn, moved) in libs.items():
            med, times = median_time(fn, repeats)
            result[kind][lib] = {"median": moved / med, "best": moved / min(times)}
    entries = [e for libs in (result["read"], result["copy"]) for e in libs.values()]
    return {"median": max(e["median"] for e in entries), "best": max(e["best"] for e in entries),
            **result, "n_bytes": n_bytes, "repeats": repeats}


# Dense bf16 FLOP/s and HBM bytes/s from the vendors' data sheets, by ``device_kind`` substring
# (first match wins): the denominators MFU is usually quoted against.
DEVICE_SPECS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM
    ("H200", 989e12, 4.8e12),
    ("A100", 312e12, 2.0e12),  # 80 GB SXM
)


def device_spec(device_kind: str) -> dict[str, float] | None:
    """``{"bf16_flops", "hbm_bytes_s"}`` of a known accelerator (``DEVICE_SPECS``), else None."""
    for name, flops, bandwidth in DEVICE_SPECS:
        if name.lower() in device_kind.lower():
            return {"bf16_flops": flops, "hbm_bytes_s": bandwidth}
    return None


def machine_info() -> dict[str, Any]:
    """Versions, CPU count and the 1/5/15-minute load averages (the box is shared)."""
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=default) + "\n")
    return path
