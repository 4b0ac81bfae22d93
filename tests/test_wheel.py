"""The package as ``pip install`` users get it: the wheel built from this tree, installed
non-editable into a fresh virtualenv, runs ``rlhf-jax`` from an empty directory (no repository
files, no ``experiments/``), with the pipeline's tuned defaults read from the installed package."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path: Path) -> None:
    # Build from a copy of what the wheel is made of, so the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(REPO / "rlhf_jax", src / "rlhf_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", dist, src, cwd=tmp_path)
    (wheel,) = dist.glob("rlhf_jax-*.whl")

    # A fresh virtualenv that sees this environment's packages (jax, flax, ...) as dependencies
    # but not its rlhf_jax: a path added by a .pth line is not a site dir, so the editable
    # install's own .pth hooks there are not run.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (purelib / "_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
        cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JAX_PLATFORMS"] = "cpu"
    where = run(python, "-c", "import rlhf_jax; print(rlhf_jax.__file__)", cwd=empty, env=env)
    assert Path(where.strip()).is_relative_to(venv), where
    rlhf_jax = venv / "bin" / "rlhf-jax"
    assert "pipeline" in run(rlhf_jax, "--help", cwd=empty, env=env)
    assert '"name": "tiny"' in run(rlhf_jax, "pipeline", "--print-config", cwd=empty, env=env)
    tuned = run(python, "-c", "from rlhf_jax.pipeline import tuned_defaults; print(' '.join(tuned_defaults()))",
                cwd=empty, env=env)
    assert {"pretrain", "sft", "rm", "ppo"} <= set(tuned.split())
    assert list(empty.iterdir()) == []
