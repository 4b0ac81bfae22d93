"""Golden numbers from reference implementations, shared by the parity tests.

``trl116.json`` holds TRL 1.16.0's outputs on fixed inputs, written by ``make_trl116_golden.py``
(run in a separate environment with ``trl==1.16.0``; see its docstring).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path


TRL116 = Path(__file__).with_name("trl116.json")


@cache
def trl116() -> dict:
    """The parsed golden file (inputs under ``"inputs"``, TRL's outputs under ``"cases"`` etc.)."""
    return json.loads(TRL116.read_text())

