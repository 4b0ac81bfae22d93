"""The benchmark suite: every benchmark of a suite in turn, then one summary table.

    python -m experiments.benchmarks --suite cpu [--quick] [--dry-run] [--out DIR] [--trl-python PATH]
    python -m experiments.benchmarks --suite gpu [--dry-run] [--out DIR] [--time-limit-s S]
    python -m experiments.benchmarks --suite gpu-extra [--quick] [--dry-run] [--out DIR]

Each benchmark runs as its own process (``python -m experiments.benchmarks.<name> ... --json
DIR/<name>.json``; its output is shown and kept in ``DIR/<name>.log``), so one's device count,
memory and compile cache do not leak into the next.  Then the summary (``summary.py``: ours,
peer, ratio, target, met?) is printed and written to ``DIR/summary.json``.  With
``--time-limit-s`` a benchmark still running when the suite's time is spent is killed with the
processes it started (status ``timeout``; what its JSON already holds is kept) and the rest are
skipped, so the summary is written even then (``experiments/gpu_lease.sh`` sets it inside the
device call's limit).

- ``cpu``: generation (vs ``transformers.generate``), train_step (SFT and RM vs ``torch``),
  ppo_step (vs TRL 1.9.0, skipped without a TRL interpreter), roofline, scaling.
- ``gpu``: gpu_check (issue 18's targets on the 1.1B Llama with scanned layers: SFT MFU at
  8 × 2048, bf16-weight decode vs the HBM bound at batch 64 and the 32/128/256 sweep, one
  PPO-ptx iteration with its compile time and phase split; then, budget allowing, the batch-64
  decode and the PPO iteration under XLA's command buffers, the SFT rows given as packed, and
  the decode with the cache in blocks and scanned), within a 240 s
  budget and a hard stop at 280 s that keeps what was measured, so it ends within 5 minutes on
  an H200 (the 2026-12-04 run had 170 s and skipped the sweep at 128 and 256 and the phase
  split; each part's seconds are now in its JSON); then
  ``ppo_step_gpu``: ppo_step's 1.1B peer (``--shape llama-1b``: our PPO iteration against TRL
  1.9.0's ``PPOTrainer`` on the same GPU, bf16, 64 prompts × (128 + 128), 4 minibatches, one
  epoch, with the generation ratio), skipped with the reason when ``--trl-python`` cannot import
  ``trl`` (about 3 minutes more; ``--only gpu_check`` leaves it out).
- ``gpu-extra``: train_step (bf16, GPT-2 medium and large and the 1.1B Llama, MFU; no torch
  peer) and roofline (bf16 decode vs the HBM bound).
  Without an accelerator either GPU suite falls back to its dry run.

``--dry-run`` checks the wiring in about a minute on a quiet CPU: the suite's own benchmarks run
with micro shapes and XLA's backend optimisation off, and the others (generation, ppo_step,
which have no micro shapes) only parse their command line (``--help``).  Its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.benchmarks.summary import summary_rows, summary_table

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRL_PYTHON = "/work/trl-venv/bin/python"


@dataclasses.dataclass(frozen=True)
class Options:
    suite: str
    quick: bool
    dry_run: bool
    out: Path
    trl_python: str | None


@dataclasses.dataclass(frozen=True)
class Step:
    """One benchmark of a suite: ``args(options)`` is its command line after ``-m
    experiments.benchmarks.<name>`` (``--json`` is added); ``skip(options)`` a reason not to run
    it, or None; ``dry`` what a dry run does with it: ``"run"`` (its own ``--dry-run``) or
    ``"help"`` (only ``--help``); ``module`` the benchmark it runs when that is not ``name``
    (one benchmark in two settings: its JSON and log are named after ``name``)."""

    name: str
    args: Callable[[Options], list[str]]
    dry: str = "run"
    skip: Callable[[Options], str | None] = lambda o: None
    module: str | None = None  # experiments.benchmarks.<module> (default: name)


def _quick(o: Options) -> list[str]:
    return ["--quick"] if o.quick else []


def _no_trl(o: Options) -> str | None:
    if o.trl_python and Path(o.trl_python).exists():
        return None
    return (f"no TRL interpreter at {o.trl_python or DEFAULT_TRL_PYTHON}; pass --trl-python /path/to/trl-venv/bin/python "
            f"(setup: experiments/benchmarks/README.md, 'The TRL virtualenv')")


def _trl_not_importable(o: Options) -> str | None:
    """``_no_trl``, and whether that interpreter imports ``trl`` and makes a ``datasets.Dataset``
    (on a GPU machine: the system python with the carried wheels on its ``PYTHONPATH``, see
    ``experiments/gpu_lease.sh``)."""
    reason = _no_trl(o)
    if reason:
        return reason
    # the runner's first use of datasets too: a dataset's fingerprint pickles pyarrow's types
    probe = subprocess.run([o.trl_python, "-c", "import trl, datasets; datasets.Dataset.from_dict({'x': [[1]]})"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"{o.trl_python} cannot run trl and datasets: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _ppo_gpu_args(o: Options) -> list[str]:
    """ppo_step's GPU peer: the 1.1B Llama, bf16, one epoch, two timed iterations a side."""
    shape = ["--dry-run"] if o.dry_run else ["--shape", "llama-1b", "--epochs", "1", "--repeats", "2"]
    return [*shape, "--trl-python", o.trl_python]


GPU_MODELS = ["gpt2-medium", "gpt2-large", "llama-1b"]
GPU_CHECK_BUDGET_S = 240  # + its 40 s hard limit + the process and GPU start-up: inside 5 minutes

SUITES: dict[str, list[Step]] = {
    "cpu": [
        Step("generation", lambda o: _quick(o), dry="help"),
        Step("train_step", lambda o: ["--dry-run", "--host-devices", "1"] if o.dry_run else _quick(o)),
        Step("ppo_step", lambda o: ["--trl-python", o.trl_python, *_quick(o)], dry="help", skip=_no_trl),
        Step("roofline", lambda o: ["--dry-run"] if o.dry_run else _quick(o)),
        Step("scaling", lambda o: ["--dry-run"] if o.dry_run else _quick(o)),
    ],
    "gpu": [
        Step("gpu_check", lambda o: ["--dry-run"] if o.dry_run else ["--budget-s", str(GPU_CHECK_BUDGET_S)]),
        Step("ppo_step_gpu", _ppo_gpu_args, skip=_trl_not_importable, module="ppo_step"),
    ],
    "gpu-extra": [
        Step("train_step", lambda o: ["--dtype", "bfloat16", "--no-peer"]
             + (["--dry-run"] if o.dry_run else ["--models", *GPU_MODELS, *_quick(o)])),
        Step("roofline", lambda o: ["--dtype", "bfloat16"]
             + (["--dry-run"] if o.dry_run else ["--models", *GPU_MODELS, *_quick(o)])),
    ],
}


def command(step: Step, o: Options) -> list[str]:
    """The step's command line (``--help`` only in a dry run of a ``dry="help"`` step)."""
    base = [sys.executable, "-m", f"experiments.benchmarks.{step.module or step.name}"]
    if o.dry_run and step.dry == "help":
        return [*base, "--help"]
    return [*base, *step.args(o), "--json", str(o.out / f"{step.name}.json")]


def run_step(cmd: list[str], log: Path, env: dict[str, str], timeout_s: float | None = None) -> int | None:
    """Runs ``cmd`` from the repository root, echoing its output and keeping it in ``log``.
    Returns its exit code, or None when it ran past ``timeout_s``: then it and every process it
    started (its own session: ppo_step's TRL runner too) are killed."""
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(timeout_s, 0.0), kill) if timeout_s is not None else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
        return None if fired.is_set() else rc


def has_accelerator() -> bool:
    """Whether JAX sees a GPU or TPU (asked in a child so that this process never starts JAX)."""
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() not in ("", "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=list(SUITES), required=True)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and points in every benchmark")
    parser.add_argument("--dry-run", action="store_true", help="micro shapes: checks the wiring, not the speed")
    parser.add_argument("--out", type=Path, default=None, help="where the JSON, logs and plots go "
                        "(default benchmark_results/<suite>-<date>)")
    parser.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", DEFAULT_TRL_PYTHON),
                        help=f"python of TRL 1.9.0's virtualenv for ppo_step (default $TRL_PYTHON or {DEFAULT_TRL_PYTHON})")
    parser.add_argument("--only", nargs="+", default=None, help="run only these benchmarks of the suite")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="stop the suite after this many seconds: a benchmark still running then is killed "
                             "(status 'timeout', what its JSON holds is kept) and the summary is still written")
    args = parser.parse_args(argv)
    suite_start = time.perf_counter()
    steps = SUITES[args.suite]
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            parser.error(f"--only: {sorted(unknown)} not in the {args.suite} suite ({[s.name for s in steps]})")
        steps = [s for s in steps if s.name in args.only]
    dry_run = args.dry_run
    if args.suite.startswith("gpu") and not dry_run and not has_accelerator():
        print("no accelerator found: running the gpu suite's dry run (micro shapes) on CPU instead", flush=True)
        dry_run = True
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or REPO / "benchmark_results" / f"{args.suite}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    o = Options(args.suite, args.quick, dry_run, out, args.trl_python)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if dry_run:  # compile faster; the numbers of a dry run mean nothing anyway
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    record: dict[str, Any] = {"suite": args.suite, "quick": args.quick, "dry_run": dry_run,
                              "command": shlex.join([sys.executable, "-m", "experiments.benchmarks", *(argv or sys.argv[1:])]),
                              "started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "load_avg_start": list(os.getloadavg()), "steps": {}}
    results: dict[str, Any] = {}
    for step in steps:
        left = None if args.time_limit_s is None else args.time_limit_s - (time.perf_counter() - suite_start)
        reason = (f"the suite's time limit ({args.time_limit_s:.0f} s) is spent" if left is not None and left <= 0
                  else step.skip(o))
        if reason and not (dry_run and step.dry == "help"):
            print(f"\n=== {step.name}: SKIPPED: {reason}", flush=True)
            record["steps"][step.name] = {"status": "skipped", "reason": reason}
            continue
        cmd = command(step, o)
        print(f"\n=== {step.name}: {shlex.join(cmd[1:])}", flush=True)
        json_path = out / f"{step.name}.json"
        json_path.unlink(missing_ok=True)  # an earlier run's, in the same folder
        start = time.perf_counter()
        rc = run_step(cmd, out / f"{step.name}.log", env, left)
        seconds = time.perf_counter() - start
        status = "timeout" if rc is None else "failed" if rc else "checked" if "--help" in cmd else "ok"
        record["steps"][step.name] = {"status": status, "returncode": rc, "seconds": seconds, "command": shlex.join(cmd)}
        print(f"=== {step.name}: {status} in {seconds:.0f} s", flush=True)
        if status != "checked" and json_path.exists():  # a run cut short (gpu_check's hard limit) keeps its figures
            results[step.name] = json.loads(json_path.read_text())

    rows = summary_rows(results)
    record["load_avg_end"] = list(os.getloadavg())
    # the device each benchmark measured (issue 18's GPU targets are an H200's)
    record["device_kinds"] = sorted({r["machine"]["device_kind"] for r in results.values()
                                     if "device_kind" in r.get("machine", {})})
    record["summary"] = [{**dataclasses.asdict(r), "ratio": r.ratio, "met": r.met} for r in rows]
    (out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    load = lambda xs: "/".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"\n=== summary ({args.suite} suite{', dry run' if dry_run else ''}{', quick' if args.quick else ''}; "
          f"on {', '.join(record['device_kinds']) or 'no device reported'}; load average {load(record['load_avg_start'])} at start, {load(record['load_avg_end'])} at end; "
          f"results in {out})\n")
    print(summary_table(rows) if rows else "(no results)")
    for name, s in record["steps"].items():
        if s["status"] in ("skipped", "failed", "timeout"):
            print(f"{name}: {s['status']}" + (f" ({s['reason']})" if s.get("reason") else f", see {out / name}.log"))
    return 1 if any(s["status"] in ("failed", "timeout") for s in record["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
