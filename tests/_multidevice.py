"""Run a test body on N simulated CPU devices in a child process.

The pytest process keeps its single device (``XLA_FLAGS`` is read once, when jax starts), so
multi-device checks run as ``python -c code`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu``.  The code asserts
what it checks; a failure raises here with the child's stdout and stderr.  Tests compile far more
than they run, so by default the child compiles with XLA's backend (LLVM) optimisation off, which
roughly halves compile time and leaves the HLO (fusions, sharding, collectives) unchanged.

    out = run_on_devices('''
        import jax
        assert jax.device_count() == 8
        print("ok")
    ''')
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_on_devices(code: str, n: int = 8, timeout: float = 120.0, optimize: bool = False) -> str:
    """Run ``code`` (dedented) in a fresh Python with ``n`` CPU devices; return its stdout.

    The child's working directory and ``PYTHONPATH`` are the repository root, so
    ``import rlhf_jax`` works.  Raises ``AssertionError`` with the
    child's output if it exits non-zero, and ``subprocess.TimeoutExpired`` after ``timeout`` s.
    ``optimize=True`` keeps XLA's default backend optimisation (for anything timed).
    """
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    flags += f" --xla_force_host_platform_device_count={n}"
    if not optimize:
        flags += " --xla_backend_optimization_level=0"
    env["XLA_FLAGS"] = flags.strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode:
        raise AssertionError(
            f"child on {n} devices exited with {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc.stdout
