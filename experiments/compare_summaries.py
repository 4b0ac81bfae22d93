"""Compare two pipeline ``summary.json`` files bitwise: every field except the timing fields.

    python -m experiments.compare_summaries OLD/summary.json NEW/summary.json

Exits 1 when a field differs.  Used for issue 19's check that the refactored pipeline gives the
same numbers as before (a run of the old commit against a run of the new one, same settings).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterator

TIMING = {"stage_seconds", "stage_cpu_seconds", "wall_seconds", "wall_seconds_total", "cpu_seconds_total"}


def leaves(x: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every leaf of nested dicts and lists."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, x


def main(argv: list[str]) -> int:
    old, new = ({k: v for k, v in json.load(open(p)).items() if k not in TIMING} for p in argv[:2])
    a, b = dict(leaves(old)), dict(leaves(new))
    numbers = sum(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.values())
    print(f"{len(a)} fields ({numbers} numbers) compared; keys equal: {a.keys() == b.keys()}")
    diff = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    print("IDENTICAL" if not diff else f"DIFFERENT: {diff[:10]}")
    return int(bool(diff))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
