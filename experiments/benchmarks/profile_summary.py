"""Where a compiled program's time goes: a ``jax.profiler`` trace of a few calls, summed by kernel.

``profile(fn, calls)`` runs the blocking ``fn`` ``calls`` times under ``jax.profiler.trace`` (with
the Perfetto JSON export) and ``summarize`` reads the trace back:

- Each call runs inside a ``TraceAnnotation`` named ``CALL``: its host interval is the call's
  wall time (``wall_s``, per call), and ``busy_s`` is the union of the kernels' intervals inside
  those windows, per call.  ``busy_fraction = busy / wall``: well under 1 means the device waits
  on the host between kernels (launch- or loop-bound), near 1 that the kernels themselves are the
  time.
- On a GPU or TPU the kernels are the events of the device's processes (``/device:GPU:0`` ...),
  on its ``Stream`` lines when it has them (a trace may add derived lines that repeat them).
- On a CPU (no device process) the kernels are the host events that name an HLO op
  (``args.hlo_op``: XLA:CPU's thunks, run on the caller's and the pool's threads).

Each kernel is put in a category by its name and HLO op (``CATEGORIES``: matmul, attention,
copy, collective, else fusion/other) and the ``top`` kernels by time are listed, all in seconds
per call.  The summary is small enough for a benchmark's JSON; the raw trace stays in
``directory``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

# first match wins; tested against "name hlo_op"
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|cudnn|sdpa|dot_product_attention|fused_attention"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"),
    ("copy", r"memcpy|memset|^copy|\bcopy[.\d]*$|dynamic-update-slice"),
    ("matmul", r"gemm|cublas|cutlass|xmma|wgmma|matmul|triton_gemm|(^|\s)dot[.\d]*(\s|$)|ynn_fusion"),
)
CALL = "profile_summary.call"  # the annotation around each profiled call
_DEVICE = re.compile(r"/device:(GPU|TPU)", re.I)
_HOST_SKIP = re.compile(r"^(end: |\$|ThunkExecutor|SlinkyThreadPool|PjitFunction|ParseArguments|DevicePut|Handle )")


def category(name: str, hlo_op: str = "") -> str:
    """The first ``CATEGORIES`` entry whose pattern matches ``"name hlo_op"``, else ``"fusion/other"``."""
    text = f"{name} {hlo_op}".strip()
    for label, pattern in CATEGORIES:
        if re.search(pattern, text, re.I):
            return label
    return "fusion/other"


def _union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``[start, end)`` intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def kernel_events(events: list[Mapping[str, Any]]) -> tuple[str, list[Mapping[str, Any]]]:
    """``(mode, events)``: the device's kernels (``"device"``) or, without a device process, the
    host's HLO-op events (``"host"``); complete (``ph == "X"``) events only."""
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X"]
    devices = {pid for pid, name in processes.items() if _DEVICE.search(name)}
    if devices:
        streams = {key for key, name in threads.items() if key[0] in devices and name.lower().startswith("stream")}
        keep = [e for e in complete if e["pid"] in devices and (not streams or (e["pid"], e.get("tid")) in streams)]
        return "device", keep
    return "host", [e for e in complete if "hlo_op" in e.get("args", {}) and not _HOST_SKIP.match(e["name"])]


def summarize(events: list[Mapping[str, Any]], top: int = 25) -> dict[str, Any]:
    """The trace's kernels per call (module docstring).  ``events``: Chrome/Perfetto trace events
    (``ts``, ``dur`` in µs) holding one ``CALL`` event per profiled call."""
    windows = sorted((e["ts"] * 1e-6, (e["ts"] + e.get("dur", 0.0)) * 1e-6) for e in events
                     if e.get("ph") == "X" and e.get("name") == CALL)
    if not windows:
        raise ValueError(f"summarize: the trace has no {CALL!r} events (profile() marks each call)")
    calls = len(windows)
    mode, kernels = kernel_events(events)
    inside = []  # (start, end, event) of the kernels that start inside a call
    for e in kernels:
        start = e["ts"] * 1e-6
        if any(a <= start <= b for a, b in windows):
            inside.append((start, start + e.get("dur", 0.0) * 1e-6, e))
    per_kernel: dict[tuple[str, str], list[float]] = {}
    for start, end, e in inside:
        entry = per_kernel.setdefault((e["name"], str(e.get("args", {}).get("hlo_op", ""))), [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    by_category: dict[str, float] = {}
    for (name, hlo_op), (seconds, _) in per_kernel.items():
        label = category(name, hlo_op)
        by_category[label] = by_category.get(label, 0.0) + seconds / calls
    wall = sum(b - a for a, b in windows) / calls
    busy = _union_length((a, b) for a, b, _ in inside) / calls
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "mode": mode, "calls": calls, "kernels_per_call": len(inside) / calls, "wall_s": wall, "busy_s": busy,
        "busy_fraction": busy / wall if wall else None,
        "by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name, "hlo_op": hlo_op, "category": category(name, hlo_op), "s_per_call": seconds / calls,
                 "count_per_call": count / calls} for (name, hlo_op), (seconds, count) in ranked],
    }


def profile(fn: Callable[[], Any], calls: int = 1, directory: str | None = None, top: int = 25) -> dict[str, Any]:
    """``summarize`` of ``calls`` calls of the blocking ``fn`` (warm it up first: a compile in the
    trace would count), traced into ``directory`` (default: a temporary one, removed after)."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="profile_") as tmp:
            return profile(fn, calls, tmp, top)
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for _ in range(calls):
            with jax.profiler.TraceAnnotation(CALL):
                fn()
    paths = sorted(glob.glob(os.path.join(directory, "**", "*perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"profile: no *perfetto_trace.json.gz under {directory}")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    return summarize(trace["traceEvents"] if isinstance(trace, dict) else trace, top)
