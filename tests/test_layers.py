"""The layers of docs/architecture.md (core <- adapters <- stages <- drivers), as import-linter
contracts in pyproject.toml: they hold on the package, and they break when a core module imports
an edge (shown on a copy of the package with one injected import)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[test]')")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``rlhf_jax`` package under ``root`` with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_hold() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("injected, broken", [
    ("import orbax.checkpoint", "the pure core imports no I/O library BROKEN"),
    ("from rlhf_jax import configs", "core <- adapters <- stages <- drivers BROKEN"),
])
def test_contracts_break_when_the_core_imports_an_edge(tmp_path: Path, injected: str, broken: str) -> None:
    shutil.copytree(REPO / "rlhf_jax", tmp_path / "rlhf_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    losses = tmp_path / "rlhf_jax" / "losses.py"
    source = losses.read_text()
    assert "\nimport jax\n" in source
    losses.write_text(source.replace("\nimport jax\n", f"\nimport jax\n{injected}\n", 1))
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout
    assert "rlhf_jax.losses" in result.stdout


def test_core_import_loads_no_edge() -> None:
    """At run time too: the core and the TrainState/optimizer factory load no checkpoint, loop,
    metrics or config module, and no orbax."""
    code = ("import sys, rlhf_jax.ppo, rlhf_jax.grpo, rlhf_jax.train.state, rlhf_jax.train.optim\n"
            "edges = ('orbax', 'rlhf_jax.configs', 'rlhf_jax.train.checkpoint', 'rlhf_jax.train.loop',\n"
            "         'rlhf_jax.train.metrics', 'rlhf_jax.train.workdir', 'rlhf_jax.stages')\n"
            "print(sorted(m for m in sys.modules if m.startswith(edges)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
