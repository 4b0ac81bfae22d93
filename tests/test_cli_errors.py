"""The CLI's error boundary (`rlhf_jax.cli.main`): each expected failure is one line
`rlhf-jax: error: ...` on stderr with exit 2 (bad config or input file) or 1 (runtime failure), no
traceback; `--debug` or `RLHF_JAX_DEBUG=1` shows it.  The input cases run `python -m rlhf_jax.cli`
in a subprocess on a damaged copy of a tiny random model; they fail before any compile (a few
seconds each).  The runtime cases (out of memory, a full disk) raise from a stand-in command."""

from __future__ import annotations

import errno
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jax.errors import JaxRuntimeError

from rlhf_jax import cli
from rlhf_jax.configs import ConfigError
from rlhf_jax.train import CheckpointError
from test_stage_sft import make_world

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("cli_errors_world"), n_demos=8, n_eval=4)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def can_mount() -> bool:
    """Root with `unshare -m` (a private mount namespace): tmpfs and read-only bind mounts."""
    return (os.geteuid() == 0 and shutil.which("unshare") is not None
            and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0)


def run_cli_mounted(mount: str, *args: str) -> subprocess.CompletedProcess:
    """`run_cli` after the shell command `mount`, in a private mount namespace (`can_mount`)."""
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "rlhf_jax.cli", *args])
    return subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && {command}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def read_only(path: Path) -> str:
    """The shell command that bind-mounts `path` read-only onto itself."""
    return f"mount --bind {path} {path} && mount -o remount,bind,ro {path}"


def sft_args(world: dict[str, Path], workdir: Path | str, model_dir: Path | str) -> list[str]:
    return ["sft", "--set", f"workdir={workdir}", "--set", f"model.hf_dir={model_dir}",
            "--set", f"train_data={world['demos']}", "--set", "batch_size=4", "--set", "buckets=[64]",
            "--set", "sample_prompts=0", "--set", "loop.total_steps=1"]


def assert_one_line(result: subprocess.CompletedProcess, code: int, *expected: str) -> None:
    """Exit `code`, stderr exactly one `rlhf-jax: error:` line containing each of `expected`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax: error: "), result.stderr
    assert all(text in lines[0] for text in expected), lines[0]


def damaged_model(world: dict[str, Path], root: Path, file: str, content: bytes) -> Path:
    """A copy of the world's base model directory with `file` replaced by `content`."""
    model = root / "model"
    shutil.copytree(world["base"], model)
    (model / file).write_bytes(content)
    return model


def test_bad_config_value_exits_2(world, tmp_path):
    result = run_cli(*sft_args(world, tmp_path / "run", world["base"]), "--set", "batch_size=-1")
    assert_one_line(result, 2, "SFTConfig.batch_size must be an int >= 1")
    assert not (tmp_path / "run").exists()


def test_missing_model_dir_exits_2(world, tmp_path):
    assert_one_line(run_cli(*sft_args(world, tmp_path / "run", tmp_path / "nope")), 2, str(tmp_path / "nope"))


def test_corrupt_config_json_exits_2(world, tmp_path):
    model = damaged_model(world, tmp_path, "config.json", b'{"n_layer": 2,')
    assert_one_line(run_cli(*sft_args(world, tmp_path / "run", model)), 2,
                    f"{model / 'config.json'}: invalid JSON")


@pytest.mark.parametrize("size", [100, 0])
def test_truncated_or_empty_safetensors_exits_2(world, tmp_path, size):
    blob = (Path(world["base"]) / "model.safetensors").read_bytes()
    model = damaged_model(world, tmp_path, "model.safetensors", blob[:size])
    assert_one_line(run_cli(*sft_args(world, tmp_path / "run", model)), 2,
                    f"{model / 'model.safetensors'}: not a valid safetensors file")


def test_unparsable_tokenizer_exits_2(world, tmp_path):
    model = damaged_model(world, tmp_path, "tokenizer.json", b'{"version": "1.0", "model": {')
    assert_one_line(run_cli(*sft_args(world, tmp_path / "run", model)), 2,
                    f"cannot parse tokenizer file {model / 'tokenizer.json'}")


def test_unusable_workdir_exits_2_and_debug_shows_the_traceback(world):
    """A workdir under a file fails for root too; `--debug` and `RLHF_JAX_DEBUG=1` re-raise."""
    args = sft_args(world, "/dev/null/x", world["base"])
    assert_one_line(run_cli(*args), 2, "cannot use /dev/null/x as a workdir")
    for result in run_cli("--debug", *args), run_cli(*args, env={"RLHF_JAX_DEBUG": "1"}):
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr and "WorkdirError" in result.stderr
        assert "rlhf-jax: error:" not in result.stderr


def test_read_only_workdir_exits_2(world, tmp_path):
    """A directory without write permission for a user; a read-only bind mount for root (who
    writes into any directory)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    args = sft_args(world, locked / "run", world["base"])
    if os.geteuid() == 0:
        if not can_mount():
            pytest.skip("root without unshare -m: cannot make a directory read-only")
        result = run_cli_mounted(read_only(locked), *args)
    else:
        locked.chmod(0o500)
        try:
            result = run_cli(*args)
        finally:
            locked.chmod(0o700)
    assert_one_line(result, 2, str(locked / "run"))


def test_mesh_that_does_not_match_the_devices_exits_2(world, tmp_path):
    assert_one_line(run_cli(*sft_args(world, tmp_path / "run", world["base"]), "--set", "mesh.fsdp=3"), 2,
                    "mesh shape data×fsdp×tensor = 1×3×1 = 3 does not match the 1 devices")


def test_lone_surrogate_in_the_data_exits_1_naming_the_line(world, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "x", "response": "a\\ud800"}\n')
    args = sft_args(world, tmp_path / "run", world["base"])
    args[args.index(f"train_data={world['demos']}")] = f"train_data={data}"
    assert_one_line(run_cli(*args), 1, f"{data}, line 2, field 'response': not valid Unicode: a lone surrogate")


def always_overcommits() -> bool:
    """Linux `vm.overcommit_memory=1` grants any allocation (then kills on touch)."""
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(always_overcommits(), reason="the 1 TiB allocation would be granted, not refused")
def test_real_out_of_memory_exits_1_saying_what_to_change(world, tmp_path):
    """A random model with d_model 2^19: the memory plan (its first 2^19 x 2^19 weight alone is
    1 TiB) is refused before compiling; with `--force` XLA refuses the weight (RESOURCE_EXHAUSTED)
    before any training and the error names the stage, the step and the plan; ~1 GB resident,
    a few seconds."""
    model = '{"init": {"arch": "gpt2", "vocab_size": 320, "d_model": 524288, "n_layers": 1, "n_heads": 1, "max_len": 64}}'
    args = sft_args(world, tmp_path / "run", "x")
    args[args.index("model.hf_dir=x")] = f"model={model}"
    args += ["--set", f"tokenizer={world['tokenizer']}"]
    assert_one_line(run_cli(*args), 1, "sft stage: the memory plan needs", "--force")
    assert_one_line(run_cli(*args, "--force"), 1,
                    "out of device memory in the sft stage during setup (before step 1) (RESOURCE_EXHAUSTED: "
                    "Out of memory allocating", "the planner estimated", "model.remat=true", "grad_accum_steps",
                    "max_len", "mesh.fsdp")


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_failed_checkpoint_save_exits_1_promptly_with_one_error_line(world, tmp_path, disk):
    """In a private mount namespace (root): the workdir on a 300 KiB tmpfs, or its `checkpoints/`
    bind-mounted read-only.  Step 1 trains, its save fails (the full disk inside orbax; the
    read-only directory before orbax starts), and the run ends promptly with the one
    `CheckpointError` line.  Before it, stderr holds only the progress line and orbax's log
    records, one line each (their tracebacks cut): no traceback, none of TensorStore's "Event loop
    is closed" reports (2 to 3 of 10 full-disk runs printed dozens before `Checkpointer` filtered
    them) and no "never awaited" coroutine warnings."""
    if not can_mount():
        pytest.skip("mounting needs root and unshare -m")
    root = tmp_path / "disk"
    checkpoints = root / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    mount = {"full": f"mount -t tmpfs -o size=300k tmpfs {root}", "read-only": read_only(checkpoints)}[disk]
    start = time.monotonic()
    result = run_cli_mounted(mount, *sft_args(world, root / "run", world["base"]))
    seconds = time.monotonic() - start
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    expected = {"full": f"saving a checkpoint in {checkpoints} failed",
                "read-only": f"cannot write checkpoint step 1 in {checkpoints}: Read-only file system"}[disk]
    assert lines[-1].startswith(f"rlhf-jax: error: {expected}"), lines[-1]
    if disk == "full":  # step 1 was logged before its save failed: the progress line shows pad and MFU (§6)
        assert any(line.startswith("run 1/1") and " pad " in line and " MFU " in line for line in lines), lines
    others = [line for line in lines[:-1] if "steps/s" not in line]
    assert all(line.startswith("ERROR:absl:") for line in others), result.stderr[-3000:]
    assert not any(noise in result.stderr for noise in ("Traceback", "Event loop is closed", "never awaited"))
    assert seconds < 60, seconds


# ------------------------------------------------------- runtime failures, from a stand-in command


def failing(monkeypatch, error: BaseException) -> list[str]:
    """`sft` arguments whose run raises `error` (the config itself is valid)."""
    def run(cfg):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "sft", cli.Command(cli.COMMANDS["sft"].config, run, "stand-in"))
    return ["sft", "--set", "workdir=w", "--set", "model.hf_dir=m", "--set", "train_data=t.jsonl"]


def test_out_of_memory_exits_1_saying_what_to_change(monkeypatch, capsys):
    oom = JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 26364482436 bytes.\n"
                          + "BufferAssignment OOM Debugging.\n" * 50)
    assert cli.main(failing(monkeypatch, oom)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax: error: out of device memory (RESOURCE_EXHAUSTED")
    assert "26364482436 bytes" in lines[0] and "BufferAssignment" not in lines[0]
    for advice in "model.remat_policy", "batch_size", "grad_accum_steps", "max_len", "mesh", "rlhf-jax plan":
        assert advice in lines[0]


@pytest.mark.parametrize("error, code, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/run/x"), 1,
     "[Errno 28] No space left on device: '/run/x'"),
    (CheckpointError("no checkpoint in c restores (5: bad)\nsecond line"), 1, "no checkpoint in c restores (5: bad)"),
    (ConfigError("x" * 2000), 2, "x" * 497 + "..."),
])
def test_runtime_and_config_errors_are_one_trimmed_line(monkeypatch, capsys, error, code, message):
    assert cli.main(failing(monkeypatch, error)) == code
    assert capsys.readouterr().err == f"rlhf-jax: error: {message}\n"


def test_library_type_is_named_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from safetensors import SafetensorError

    assert cli.main(failing(monkeypatch, SafetensorError("Error while deserializing header"))) == 2
    assert capsys.readouterr().err == "rlhf-jax: error: SafetensorError: Error while deserializing header\n"
    bug = ValueError("operands could not be broadcast together")  # raised outside rlhf_jax: a bug
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(failing(monkeypatch, bug))
    with pytest.raises(KeyError):
        cli.main(failing(monkeypatch, KeyError("params")))


def test_missing_model_dir_names_its_config_json_for_every_stage(world, tmp_path, capsys):
    """The model's config is read before its tokenizer, so each stage names the missing file."""
    nope = tmp_path / "nope"
    common = ["--set", f"workdir={tmp_path / 'run'}", "--set", f"model.hf_dir={nope}", "--set", "train_data=t.jsonl"]
    for command in (["sft"], ["rm", "--set", "normalize=none"], ["ppo", "--set", "reward_model=r", "--set", "ppo.ptx_coef=0"],
                    ["grpo", "--set", "reward_model=r"], ["rloo", "--set", "reward_model=r"], ["dpo"]):
        assert cli.main([*command, *common]) == 2
        assert capsys.readouterr().err == f"rlhf-jax: error: {nope / 'config.json'}: no such file (ModelSource.hf_dir)\n"
