"""What a finished stage leaves, and whether it is finished.

A stage's directory (``workdir``) holds what ``run_loop`` writes (``config.json``, the resolved
config; ``checkpoints/``, ``metrics.jsonl``, ``samples.jsonl``, ``DONE``) and, once finished,
``model/``: the final model in Hugging Face format (``save_pretrained`` + ``tokenizer.json`` +
stage side files such as ``reward_normalization.json``).  The next stage loads that directory as
its ``ModelSource(hf_dir=...)``.  A stage is complete when ``model/`` exists and records the same
number of steps as ``DONE`` (``completed_model``); it is reused only if its fingerprint
(``stage_fingerprint``: the config without operational fields, and the content of its input files
and models) is unchanged.  The export gathers the parameters to host memory on process 0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from rlhf_jax import hf
from rlhf_jax.configs import to_dict
from rlhf_jax.model import Params, Transformer
from rlhf_jax.stages.config import StageConfig
from rlhf_jax.tokenizer import Tokenizer
from rlhf_jax.train import DONE_FILE
from rlhf_jax.train.workdir import WorkdirError, describe_changes, fingerprint, fingerprint_changes

log = logging.getLogger(__name__)


MODEL_DIR = "model"


STAGE_FILE = "rlhf_jax_stage.json"  # inside model/: which stage wrote it, after how many steps


# Config fields that change how a stage runs or reports, not what it computes: left out of its
# fingerprint.  (Its length, ``epochs``/``loop.total_steps``, may grow on resume; a schedule that
# follows it shows up as a changed ``optimizer.total_steps``, see ``stage_optimizer``.)  Input
# paths are left out too: the inputs' content stands for them.
OPERATIONAL_FIELDS = (
    "workdir", "epochs", "loop", "eval_data", "eval_batches", "mesh", "distributed",
    "sample_prompts", "sample_max_new_tokens", "eval_samples", "phase_timing",
    "memory", "model.scan_layers", "model.scan_decode", "model.remat", "model.remat_policy", "model.attention_impl",
    "model.logits_chunk", "model.cache_block",
    "model.init.scan_decode", "model.init.cache_block",  # pretraining's from-scratch ModelConfig: decoding only
)


def stage_fingerprint(cfg: StageConfig, inputs: tuple[str, ...], resolved: Mapping[str, Any]) -> dict[str, Any]:
    """What defines the stage's result (``train.workdir.fingerprint``): ``cfg`` without
    ``OPERATIONAL_FIELDS`` and without the ``inputs`` fields (dotted keys such as
    ``"model.hf_dir"``, ``"train_data"``), whose files or directories are hashed instead, and
    with the fields of ``resolved`` (e.g. ``{"optimizer": stage_optimizer(cfg, steps)}``)
    replaced by those values.  The hashes recorded in ``workdir/DONE`` are reused for inputs
    whose size and modification time are unchanged."""
    data = to_dict(cfg)
    paths = {key: _pop(data, key) for key in inputs}
    _drop_operational(data)
    data.update({key: to_dict(value) for key, value in resolved.items()})
    done = _read_json(Path(cfg.workdir) / DONE_FILE) or {}
    return fingerprint(data, paths, previous=done.get("fingerprint"))


def _drop_operational(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config as a dict) without ``OPERATIONAL_FIELDS``, removed in place."""
    for key in OPERATIONAL_FIELDS:
        _pop(data, key)
    return data


def _pop(data: dict[str, Any], dotted: str) -> Any:
    """Remove ``data[a][b]`` for ``"a.b"`` and return it (None if absent)."""
    *parents, last = dotted.split(".")
    for key in parents:
        data = data.get(key)
        if not isinstance(data, dict):
            return None
    return data.pop(last, None)


def model_dir(workdir: str | os.PathLike) -> Path:
    """``workdir/model``: where a stage exports its final model."""
    return Path(workdir) / MODEL_DIR


def export_model(
    workdir: str | os.PathLike,
    model: Transformer,
    params: Params,
    tokenizer: Tokenizer | None,
    extra_json: Mapping[str, Any] | None = None,
) -> Path:
    """Write the final model to ``workdir/model/`` in Hugging Face format, atomically.

    ``save_pretrained`` (config.json + safetensors + the tokenizer's files) and one JSON file per
    ``extra_json`` item (file name -> JSON-able value, e.g. ``{"reward_normalization.json":
    {"gain": 1.0, "bias": -0.3}}``) go into a temporary directory that then replaces
    ``workdir/model`` by rename, so readers never see a half-written model.  Process 0 writes;
    every process returns the path.
    """
    target = model_dir(workdir)
    if jax.process_index() != 0:
        return target
    params = jax.device_get(params)
    tmp = target.with_name(f"{MODEL_DIR}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(model, params, tmp, tokenizer=tokenizer)
    for name, value in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    old = target.with_name(f"{MODEL_DIR}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def stage_record(stage: str, steps: int, cfg: Any) -> dict[str, Any]:
    """The ``STAGE_FILE`` content ``completed_model`` checks: stage name, steps, config, and from
    ``DONE`` the inputs' hashes and, if the config changed during the run, ``config_changes``."""
    done = _read_json(Path(cfg.workdir) / DONE_FILE) or {}
    record = {"stage": stage, "steps": int(steps), "config": to_dict(cfg)}
    if done.get("fingerprint"):
        record["inputs"] = done["fingerprint"].get("inputs", {})
    if done.get("config_changes"):
        record["config_changes"] = done["config_changes"]
    return record


def completed_model(workdir: str | os.PathLike, steps: int, fingerprint: Mapping[str, Any] | None = None,
                    force: bool = False) -> Path | None:
    """``workdir/model`` when the stage ran ``steps`` steps (``DONE``) and exported them, else
    None (not started, interrupted, exported before ``steps`` grew, or killed before export).

    With ``fingerprint`` (``stage_fingerprint``) a complete stage is reused only if ``DONE``
    records the same one; ``force`` (``loop.force``) always gives None, to train it again.

    Raises:
      WorkdirError: the stage is complete but its fingerprint differs, naming what changed.
    """
    workdir = Path(workdir)
    done, record = _read_json(workdir / DONE_FILE), _read_json(model_dir(workdir) / STAGE_FILE)
    if done is None or record is None or force:
        return None
    if done.get("step") != steps or record.get("steps") != steps:
        return None
    if fingerprint is None:
        return model_dir(workdir)
    if done.get("fingerprint") is None:
        log.warning("%s: DONE records no fingerprint (an older version wrote it); reusing the stage unchecked",
                    workdir)
        return model_dir(workdir)
    changes = fingerprint_changes(recorded_as_today(done["fingerprint"]), fingerprint)
    if changes:
        raise WorkdirError(f"{workdir} holds a finished run with another config or input: "
                           f"{describe_changes(changes)}; use a new workdir, or set loop.force=true to train "
                           "it again here")
    return model_dir(workdir)


def recorded_as_today(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """A fingerprint recorded in ``DONE`` or a checkpoint without today's ``OPERATIONAL_FIELDS``:
    a field made operational after the stage ran (e.g. ``model.init.scan_decode``) is no change,
    for reusing a finished stage (``completed_model``) and for resuming one (``run_loop``'s
    ``read_recorded``)."""
    return {**recorded, "config": _drop_operational(json.loads(json.dumps(recorded.get("config", {}))))}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None
