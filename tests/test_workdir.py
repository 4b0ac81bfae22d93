"""The guarded workdir (lock, orphans, fingerprints) and, through the real SFT, RM and PPO stages,
the fallback past a damaged checkpoint and the refusal to reuse or resume a changed run.

Unit tests of `rlhf_jax.train.workdir` first; then one tiny run per stage (the configs of
tests/test_stage_*.py), each damaged, changed or forced, compared with the same run undisturbed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import rlhf_jax.train.workdir as wd
from rlhf_jax.stages.config import StageLoopConfig, StageOptimizerConfig
from rlhf_jax.stages.export import completed_model
from rlhf_jax.stages.ppo import train_ppo
from rlhf_jax.stages.reward import train_rm
from rlhf_jax.stages.sources import ModelSource
from rlhf_jax.stages.sft import train_sft
from rlhf_jax.train import DONE_FILE, WorkdirError, workdir_lock
from rlhf_jax.train.workdir import clean_orphans, describe_changes, fingerprint, fingerprint_changes
from test_checkpoint import NOISE, damage
from test_stage_ppo import make_ppo_world, ppo_config
from test_stage_reward import make_rm_world, rm_config
from test_stage_sft import jsonl, sft_config

# --------------------------------------------------------------------------------------- lock


def write_lock(workdir: Path, **record) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / wd.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), **record}))
    return lock


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_lock_refuses_a_live_holder(tmp_path, sleeper):
    write_lock(tmp_path, pid=sleeper.pid, start=wd._start_time(sleeper.pid))
    with pytest.raises(WorkdirError, match=rf"^{tmp_path} is in use by pid {sleeper.pid} on {socket.gethostname()} "
                                           rf"\(lock file {tmp_path}/\.lock\); wait for it to finish or use another "
                                           r"workdir$"):
        with workdir_lock(tmp_path):
            pass
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # left alone


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, pid=1, host="elsewhere")
    with pytest.raises(WorkdirError, match=r"in use by pid 1 on elsewhere .*; if that process is gone, delete .*\.lock"):
        with workdir_lock(tmp_path):
            pass
    (tmp_path / ".lock").write_text("{not json")
    with pytest.raises(WorkdirError, match=r"is locked \(.*\.lock exists but is unreadable\)"):
        with workdir_lock(tmp_path):
            pass


@pytest.mark.parametrize("holder", ["dead", "reused pid"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    if holder == "dead":
        proc = subprocess.Popen([sys.executable, "-c", "pass"])
        proc.wait()
        record = {"pid": proc.pid, "start": None}
    else:  # a running process that started after the lock was written: the pid was reused
        record = {"pid": os.getppid(), "start": -1}
    write_lock(tmp_path, **record)
    with caplog.at_level(logging.WARNING), workdir_lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert [r.getMessage() for r in caplog.records] == [
        f"taking over {tmp_path}/.lock: its process (pid {record['pid']} on {socket.gethostname()}) is no longer running"]
    assert not (tmp_path / ".lock").exists()


def test_unwritable_workdir_is_one_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match=rf"^cannot use {tmp_path}/file/run as a workdir: Not a directory$"):
        with workdir_lock(tmp_path / "file" / "run"):
            pass


def test_lock_is_reentrant_and_leaves_no_empty_workdir(tmp_path):
    workdir = tmp_path / "new"
    with workdir_lock(workdir):
        with workdir_lock(workdir):  # run_loop inside a guarded stage
            assert (workdir / ".lock").exists()
        assert (workdir / ".lock").exists()
    assert not workdir.exists()  # nothing was written: no empty directory left behind
    with workdir_lock(workdir):
        (workdir / "kept.txt").write_text("x")
    assert sorted(p.name for p in workdir.iterdir()) == ["kept.txt"]


def test_orphans_are_removed_and_moved_checkpoints_kept(tmp_path, caplog):
    orphans = ["model.tmp-123/config.json", "model.old-9/model.safetensors", "DONE.tmp",
               "checkpoints/8.orbax-checkpoint-tmp-1733/state/x", "checkpoints/.write-probe-ab12/"]
    kept = ["model/config.json", "checkpoints/4/commit_success.txt", "checkpoints/8.corrupt/x",
            "checkpoints/6.incomplete-20260101-000000/x", "metrics.jsonl"]
    for name in orphans + kept:
        path = tmp_path / name
        if name.endswith("/"):
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
    with caplog.at_level(logging.WARNING), workdir_lock(tmp_path):
        pass
    assert all((tmp_path / name).exists() for name in kept)
    assert not any((tmp_path / name.split("/")[0]).exists() for name in orphans if not name.startswith("checkpoints"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "6.incomplete-20260101-000000",
                                                                           "8.corrupt"]
    assert "removed 5 temporary item(s) left by an interrupted run" in caplog.text
    assert clean_orphans(tmp_path) == []


# ------------------------------------------------------------------------------- fingerprints


def test_fingerprint_hashes_files_and_directories(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    (model / "sub" / "w.bin").write_bytes(b"\x00\x01")
    fp = fingerprint({"lr": 0.1}, {"train_data": data, "model": model, "tokenizer": None})
    import hashlib

    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    assert fp["config"] == {"lr": 0.1} and fp["inputs"]["tokenizer"] is None
    assert fp["inputs"]["train_data"] == {"path": str(data), "size": 9, "mtime_ns": data.stat().st_mtime_ns,
                                          "files": 1, "sha256": sha(b'{"a": 1}\n')}
    listing = f"config.json\0{2}\0{sha(b'{}')}\nsub/w.bin\0{2}\0{sha(bytes([0, 1]))}\n"
    assert fp["inputs"]["model"]["sha256"] == sha(listing.encode())
    assert fp["inputs"]["model"]["files"] == 2 and fp["inputs"]["model"]["size"] == 4
    assert fingerprint({}, {"x": tmp_path / "nope"})["inputs"]["x"] == {"path": str(tmp_path / "nope"),
                                                                       "missing": True}


def test_unchanged_inputs_are_not_read_again(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("one\n")
    first = fingerprint({}, {"train_data": data})
    reads = []
    monkeypatch.setattr(wd, "_sha256", lambda path: reads.append(path) or "fresh")
    assert fingerprint({}, {"train_data": data}, previous=first) == first and reads == []
    data.write_text("two\n")  # same size, new mtime: read again
    assert fingerprint({}, {"train_data": data}, previous=first)["inputs"]["train_data"]["sha256"] == "fresh"
    assert reads == [data]


def test_changes_are_named(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("x")
    b.write_text("x")
    old = fingerprint({"optimizer": {"lr": 0.1, "schedule": "cosine"}, "seed": 0}, {"train_data": a, "demos": None})
    same_content_moved = fingerprint({"optimizer": {"lr": 0.1, "schedule": "cosine"}, "seed": 0},
                                     {"train_data": b, "demos": None})
    assert fingerprint_changes(old, same_content_moved) == []
    b.write_text("y")
    new = fingerprint({"optimizer": {"lr": 0.2, "schedule": "cosine"}, "k": [2, 3]}, {"train_data": b, "demos": a})
    assert fingerprint_changes(old, new) == [
        'k (unset) -> [2, 3]', "optimizer.lr 0.1 -> 0.2", "seed 0 -> (unset)",
        f"demos none -> {a}", f"train_data ({b}) content changed"]
    b.unlink()
    gone = fingerprint(old["config"], {"train_data": b, "demos": None})
    assert fingerprint_changes(old, gone) == [f"train_data ({b}) is missing"]
    assert describe_changes(["a", "b", "c", "d", "e", "f"]) == "a; b; c; d; and 2 more"


# -------------------------------------------------------------------------- through the stages


def same_model(a: Path, b: Path) -> None:
    got, want = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def interrupted_copy(run: Path, to: Path, damaged_step: int, mode: str) -> Path:
    """`run` as if killed after its last checkpoint (no DONE, no export), that checkpoint
    damaged in `mode`, and an export's orphaned temporary directory left behind."""
    shutil.copytree(run, to)
    (to / DONE_FILE).unlink()
    shutil.rmtree(to / "model")
    (to / "model.tmp-99999").mkdir()
    damage(to / "checkpoints" / str(damaged_step), mode)
    return to


def check_fallback(run: Path, straight: Path, step: int, caplog, capfd) -> None:
    assert (run / "checkpoints" / f"{step}.corrupt").is_dir() and not (run / "model.tmp-99999").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and f"checkpoints/{step} does not restore" in warnings[0]
    _, err = capfd.readouterr()
    assert not [n for n in NOISE if n in err], err[-2000:]
    untimed = lambda d: [{k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
                         for r in jsonl(d / "metrics.jsonl")]  # wall times differ (PPO)
    assert untimed(run) == untimed(straight)
    same_model(run, straight)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_rm_world(tmp_path_factory.mktemp("world"), n_train=64, n_eval=16)


@pytest.fixture(scope="module")
def sft_straight(world, tmp_path_factory) -> Path:
    """8 SFT steps in one go, checkpoints at 4 and 8."""
    workdir = tmp_path_factory.mktemp("sft") / "run"
    train_sft(sft_config(world, workdir, eval_data=None))
    return workdir


def test_sft_falls_back_past_a_truncated_blob(world, sft_straight, tmp_path, caplog, capfd):
    run = interrupted_copy(sft_straight, tmp_path / "run", 8, "truncate")
    with caplog.at_level(logging.WARNING):
        assert train_sft(sft_config(world, run, eval_data=None)) == run / "model"
    check_fallback(run, sft_straight, 8, caplog, capfd)


def test_rm_falls_back_past_a_flipped_bit(world, tmp_path, caplog, capfd):
    cfg = rm_config(world, tmp_path / "straight", eval_data=None, loop=StageLoopConfig(total_steps=4, save_every=2))
    train_rm(cfg)
    run = interrupted_copy(tmp_path / "straight", tmp_path / "run", 4, "flip")
    with caplog.at_level(logging.WARNING):
        train_rm(dataclasses.replace(cfg, workdir=str(run)))
    check_fallback(run, tmp_path / "straight", 4, caplog, capfd)
    norm = [json.loads((d / "model" / "reward_normalization.json").read_text()) for d in (run, tmp_path / "straight")]
    assert norm[0] == norm[1]


@pytest.mark.slow  # ~35 s: two compiles of the PPO iteration (test_stage_ppo's resume test restores a
# PPOState through the same checksum verification in the default suite)
def test_ppo_falls_back_past_a_missing_meta_item(tmp_path, caplog, capfd):
    world = make_ppo_world(tmp_path / "world")
    cfg = ppo_config(world, tmp_path / "straight", eval_data=None, loop=StageLoopConfig(total_steps=2, save_every=1))
    train_ppo(cfg)
    run = interrupted_copy(tmp_path / "straight", tmp_path / "run", 2, "meta")
    with caplog.at_level(logging.WARNING):
        train_ppo(dataclasses.replace(cfg, workdir=str(run)))
    check_fallback(run, tmp_path / "straight", 2, caplog, capfd)


def test_finished_stage_with_another_config_or_input_is_refused(world, sft_straight, tmp_path, sleeper):
    done = (sft_straight / DONE_FILE).read_text()
    with pytest.raises(WorkdirError, match=rf"^{sft_straight} holds a finished run with another config or input: "
                                           r"optimizer\.lr 0\.003 -> 0\.002; use a new workdir, or set "
                                           r"loop\.force=true to train it again here$"):
        train_sft(sft_config(world, sft_straight, eval_data=None, optimizer=StageOptimizerConfig(schedule="cosine", lr=2e-3, total_steps=8)))
    changed = tmp_path / "demos.jsonl"
    changed.write_text(Path(world["demos"]).read_text().replace("answer", "Answer", 1))
    with pytest.raises(WorkdirError, match=rf"another config or input: train_data \({changed}\) content changed"):
        train_sft(sft_config(world, sft_straight, eval_data=None, train_data=str(changed)))
    # Operational fields (eval cadence, samples, the mesh, ...) and the inputs' paths are not the run's identity.
    moved = tmp_path / "moved.jsonl"
    shutil.copy(world["demos"], moved)
    assert train_sft(sft_config(world, sft_straight, eval_data=None, train_data=str(moved), sample_prompts=3,
                                loop=StageLoopConfig(total_steps=8, eval_every=2, save_every=4, log_every=3))) \
        == sft_straight / "model"
    assert (sft_straight / DONE_FILE).read_text() == done
    # A second process on the workdir: refused at once.
    write_lock(sft_straight, pid=sleeper.pid, start=wd._start_time(sleeper.pid))
    try:
        with pytest.raises(WorkdirError, match=rf"in use by pid {sleeper.pid}"):
            train_sft(sft_config(world, sft_straight, eval_data=None))
    finally:
        (sft_straight / ".lock").unlink()


def test_a_field_made_operational_later_is_no_change(world, sft_straight, tmp_path):
    """A DONE written when a field was still part of the identity (``model.scan_decode`` here,
    ``model.init.scan_decode`` for pretraining before 7d68cbc) is reused after it became
    operational, and with an execution switch (``model.cache_block``) set now."""
    run = tmp_path / "run"
    shutil.copytree(sft_straight, run)
    done = json.loads((run / DONE_FILE).read_text())
    done["fingerprint"]["config"]["model"]["scan_decode"] = True
    (run / DONE_FILE).write_text(json.dumps(done))
    assert train_sft(sft_config(world, run, eval_data=None)) == run / "model"
    blocked = ModelSource(hf_dir=str(world["base"]), cache_block=16)
    assert train_sft(sft_config(world, run, eval_data=None, model=blocked)) == run / "model"


def test_a_checkpoint_recorded_before_a_field_became_operational_resumes(world, sft_straight, tmp_path):
    """A run killed after a checkpoint whose fingerprint still holds a field that has since
    become operational (``model.scan_decode``, as a checkpoint written before 7d68cbc) resumes
    without ``allow_config_change`` and ends as the straight run did."""
    run = tmp_path / "run"
    shutil.copytree(sft_straight, run)
    for name in (DONE_FILE, "model", "checkpoints/8"):  # killed after the step-4 checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    meta_file = run / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["fingerprint"]["config"]["model"]["scan_decode"] = True
    meta_file.write_text(json.dumps(meta))
    train_sft(sft_config(world, run, eval_data=None))
    assert "config_changes" not in json.loads((run / "config.json").read_text())
    same_model(run, sft_straight)


def test_force_retrains_and_keeps_the_previous_run(world, sft_straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_straight, run)
    cfg = sft_config(world, run, eval_data=None, loop=StageLoopConfig(total_steps=8, save_every=4, force=True))
    assert completed_model(run, 8, force=True) is None
    train_sft(cfg)
    (kept,) = run.glob("replaced-*")
    assert sorted(p.name for p in kept.iterdir()) == ["DONE", "checkpoints", "config.json", "metrics.jsonl", "model"]
    assert jsonl(run / "metrics.jsonl") == jsonl(sft_straight / "metrics.jsonl")
    same_model(run, sft_straight)


def test_resume_with_another_lr_is_refused_unless_allowed(world, sft_straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sft_straight, run)
    for name in (DONE_FILE, "model", "checkpoints/8"):  # killed after the step-4 checkpoint
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    config = (run / "config.json").read_text()
    new_lr = StageOptimizerConfig(schedule="cosine", lr=2e-3, total_steps=8)
    with pytest.raises(WorkdirError, match=r"has a checkpoint \(step 4\) of a run with another config or input: "
                                           r"optimizer\.lr 0\.003 -> 0\.002; .* loop\.allow_config_change=true to "
                                           r"continue from step 4 with the new config"):
        train_sft(sft_config(world, run, eval_data=None, optimizer=new_lr))
    assert (run / "config.json").read_text() == config  # still the config the checkpoint was trained with

    allowed = StageLoopConfig(total_steps=8, save_every=4, allow_config_change=True)
    train_sft(sft_config(world, run, eval_data=None, optimizer=new_lr, loop=allowed))
    change = {"step": 4, "changes": ["optimizer.lr 0.003 -> 0.002"]}
    written = json.loads((run / "config.json").read_text())
    assert written["optimizer"]["lr"] == 2e-3 and written["config_changes"] == [change]
    assert {"step": 4, "config_changes": change["changes"]} in jsonl(run / "metrics.jsonl")
    record = json.loads((run / "model" / "rlhf_jax_stage.json").read_text())
    assert record["config_changes"] == [change] and record["inputs"]["train_data"]["path"] == str(world["demos"])
    # The lr changed mid-run: the result differs from the straight run's.
    want = load_file(sft_straight / "model" / "model.safetensors")
    got = load_file(run / "model" / "model.safetensors")
    assert not all(np.array_equal(got[k], want[k]) for k in want)


def test_schedule_that_follows_the_stage_length_is_part_of_the_identity(world, tmp_path):
    """Growing a stage is a resume (test_stage_sft: 4 then 8 steps of a fixed cosine equal 8
    straight); when the cosine decays over the stage (no optimizer.total_steps) growing it changes
    the schedule of the steps already taken, so the resume is refused."""
    cfg = sft_config(world, tmp_path / "run", eval_data=None, optimizer=StageOptimizerConfig(schedule="cosine", lr=3e-3),
                     loop=StageLoopConfig(total_steps=2))
    train_sft(cfg)
    with pytest.raises(WorkdirError, match=r"has a checkpoint \(step 2\) .*: optimizer\.total_steps 2 -> 3; "):
        train_sft(dataclasses.replace(cfg, loop=StageLoopConfig(total_steps=3)))
