"""The ``rlhf-jax`` command line: one subcommand per stage, each built from a config file plus
``--set a.b.c=value`` overrides.

    rlhf-jax sft --config experiments/configs/sft_tiny.json --set loop.total_steps=200
    rlhf-jax rm  --config rm.toml --set optimizer.lr=1e-5 --print-config

One error boundary (``main``) turns every expected failure into one line on stderr,
``rlhf-jax: error: <the exception's own message>``, and an exit code:

- 2: a bad command line, config or override (the message names the key, file and line), or a bad
  input file other than training data: a missing model directory or file, a corrupt
  ``config.json``, ``model.safetensors``, tokenizer, GGUF file or chat template, a workdir that
  cannot be used or holds a stage with another config (``INPUT_ERRORS``, and a ``ValueError``
  raised by ``rlhf_jax``'s own input checks);
- 1: a failure while running: a malformed training-data record (``DataError``: the message names
  the file and line), a checkpoint that cannot be written or restored, a NaN that stopped
  training, an ``OSError`` such as a full disk, or running out of device memory (the message
  says what to change) (``RUNTIME_ERRORS``);
- 130: interrupted (Ctrl-C); a re-run resumes from the newest checkpoint.

Anything else is a bug and keeps its traceback.  ``rlhf-jax --debug COMMAND ...`` (or
``RLHF_JAX_DEBUG=1``) re-raises every failure with its full traceback.

Adding a subcommand is one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jax.errors import JaxRuntimeError
from safetensors import SafetensorError

from rlhf_jax.assets import main as fetch_main
from rlhf_jax.configs import load_config, read_config_file, to_dict
from rlhf_jax.distributed import DistributedConfig, initialize as initialize_distributed
from rlhf_jax.errors import (ChatTemplateError, CheckpointError, ConfigError, DataError, FetchError, GGUFError,
                             DeviceMemoryError, NonFiniteError, PlanError, WorkdirError)
from rlhf_jax.pipeline import PipelineConfig, run_pipeline
from rlhf_jax.plan import PlanConfig, run_plan
from rlhf_jax.ppo import PRESETS
from rlhf_jax.sample import SampleConfig, sample
from rlhf_jax.stages.dpo import DPOConfig, train_dpo
from rlhf_jax.stages.grpo import GRPOStageConfig, RLOOStageConfig, train_grpo, train_rloo
from rlhf_jax.stages.ppo import PPOStageConfig, train_ppo
from rlhf_jax.stages.reward import RMConfig, train_rm
from rlhf_jax.stages.sft import SFTConfig, train_sft

DEBUG_ENV = "RLHF_JAX_DEBUG"
"""Set to 1 (or true, yes) for the full traceback of every failure, like ``--debug``."""

MAX_MESSAGE_CHARS = 500

# Checked in this order, so a subclass listed in a later tuple must come first:
# DataError is a ValueError, FileNotFoundError an OSError.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, WorkdirError, GGUFError, ChatTemplateError, FileNotFoundError, NotADirectoryError,
    IsADirectoryError, SafetensorError)
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (
    DataError, CheckpointError, NonFiniteError, PlanError, DeviceMemoryError, FetchError, OSError)

OOM_ADVICE = (
    "to fit, turn on rematerialisation (model.remat_policy=dots, or full), lower batch_size "
    "(raise optimizer.grad_accum_steps to keep the effective batch), lower max_len or the largest "
    "bucket, or shard over more devices (mesh.fsdp); `rlhf-jax plan --config FILE` estimates the "
    "memory before training")

_PACKAGE_DIR = Path(__file__).resolve().parent

# Commands whose config has ``memory`` (train.memory): they take --force.
MEMORY_CHECKED = ("sft", "rm", "ppo", "grpo", "rloo", "dpo")


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its config dataclass, the function that runs it, a one-line help."""

    config: type
    run: Callable[[Any], Any]
    help: str


COMMANDS: dict[str, Command] = {
    "sft": Command(SFTConfig, train_sft, "stage 1: supervised fine-tuning on demonstrations"),
    "rm": Command(RMConfig, train_rm, "stage 2: K-way reward model on ranked comparisons"),
    "ppo": Command(PPOStageConfig, train_ppo, "stage 3: PPO-ptx against the reward model"),
    "grpo": Command(GRPOStageConfig, train_grpo, "stage 3 by GRPO: group-relative advantages, no value model"),
    "rloo": Command(RLOOStageConfig, train_rloo, "stage 3 by RLOO: leave-one-out baseline, no value model"),
    "dpo": Command(DPOConfig, train_dpo, "stages 2+3 by DPO: the policy on the ranked comparisons, no reward model"),
    "pipeline": Command(PipelineConfig, run_pipeline, "the whole recipe end to end (default: the built-in world)"),
    "generate": Command(SampleConfig, sample, "one answer from a model directory or GGUF file "
                                              "(--set model=DIR --set user=TEXT)"),
    "plan": Command(PlanConfig, run_plan, "per-device memory plan of a config, before any training "
                                          "(exit 1 when it does not fit)"),
}


def preset_overrides(name: str) -> list[str]:
    """``ppo.PRESETS[name]`` as ``--set`` strings on the stage's ``ppo`` table."""
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")

    def flat(prefix: str, table: dict[str, Any]) -> list[str]:
        out = []
        for k, v in table.items():
            out += flat(f"{prefix}.{k}", v) if isinstance(v, dict) else [f"{prefix}.{k}={json.dumps(v)}"]
        return out

    return flat("ppo", PRESETS[name])


def pipeline_command(path: str | None) -> Command:
    """``pipeline``'s command: the built-in pipeline, or the named recipe (``rlhf_jax.recipes``)
    when the config file has a ``"recipe"`` field."""
    name = read_config_file(path).get("recipe") if path is not None else None
    if name is None:
        return COMMANDS["pipeline"]
    from rlhf_jax.recipes import RECIPES

    if name not in RECIPES:
        raise ConfigError(f"config ({path}): unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    config, run = RECIPES[name]
    return Command(config, run, f"the {name} recipe")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per ``COMMANDS`` entry."""
    parser = argparse.ArgumentParser(prog="rlhf-jax", description="The InstructGPT recipe in JAX.")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of a failure (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", metavar="FILE", help="a .json or .toml config (default: all defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. optimizer.lr=1e-5 (repeatable)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as JSON and exit")
        if name in MEMORY_CHECKED:
            p.add_argument("--force", action="store_true",
                           help="skip the memory plan's check before compiling (memory.check=false)")
        if name == "ppo":
            p.add_argument("--preset", choices=sorted(PRESETS),
                           help="start from another implementation's PPO defaults (before --set)")
        if name == "plan":
            p.add_argument("--no-compile", action="store_true", help="analytic only (same as --set compile=none)")
    # ``fetch`` likewise (rlhf_jax.assets.main): ``rlhf-jax fetch smollm2 [--dir DIR]``.
    sub.add_parser("fetch", help="download a model file, e.g. `fetch smollm2` (prints its path)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rlhf-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    The error boundary of every command: see the module docstring for what maps to which code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        return _dispatch(argv, debug)
    except KeyboardInterrupt:
        if debug:
            raise
        _quiet()
        print("rlhf-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        failure = None if debug else classify(e)
        if failure is None:
            raise
        _quiet()
        print(f"rlhf-jax: error: {failure[1]}", file=sys.stderr)
        return failure[0]


def _dispatch(argv: list[str], debug: bool) -> int:
    if argv[:1] == ["fetch"]:
        return fetch_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    command = COMMANDS[args.command]
    if args.command == "pipeline":
        command = pipeline_command(args.config)
    overrides = preset_overrides(args.preset) if getattr(args, "preset", None) else []
    if getattr(args, "force", False):
        overrides.append("memory.check=false")
    if getattr(args, "no_compile", False):
        overrides.append("compile=none")
    cfg = load_config(command.config, args.config, overrides + args.overrides)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        for handler in logging.getLogger().handlers:
            if _LIBRARY_TRACEBACKS not in handler.filters:
                handler.addFilter(_LIBRARY_TRACEBACKS)
    initialize_distributed(getattr(cfg, "distributed", DistributedConfig()))
    result = command.run(cfg)
    if result is not None and not isinstance(result, dict):  # the pipeline and plan print their own
        print(result)
    return 0


def classify(error: BaseException) -> tuple[int, str] | None:
    """``(exit code, one-line message)`` for an expected failure, ``None`` for a bug.

    The message is the first line of the exception's own message, at most
    ``MAX_MESSAGE_CHARS``, prefixed by the exception's type only for a library's own type (such
    as ``SafetensorError``), whose message may not say what failed."""
    if isinstance(error, JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error):
        return 1, f"out of device memory ({first_line(error, 200)}); {OOM_ADVICE}"
    if isinstance(error, INPUT_ERRORS) and not isinstance(error, DataError):
        return 2, one_line(error)
    if isinstance(error, RUNTIME_ERRORS):
        return 1, one_line(error)
    if isinstance(error, ValueError) and _raised_by_package(error):
        return 2, one_line(error)
    return None


def one_line(error: BaseException) -> str:
    """``first_line(error)``, after ``"TypeName: "`` when the type is a library's own."""
    line = first_line(error)
    module = type(error).__module__
    if module == "builtins" or module.startswith("rlhf_jax") or line == type(error).__name__:
        return line
    return first_line(f"{type(error).__name__}: {line}")


def first_line(error: BaseException | str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """The first non-empty line of ``str(error)`` (the type's name if none), at most ``limit``
    characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raised_by_package(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` in ``rlhf_jax`` (an input check with its own
    message) rather than inside a library, where a ``ValueError`` is more likely a bug."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


class _NoLibraryTracebacks(logging.Filter):
    """Keeps a library's log record but drops its traceback (orbax logs a 50-line one for each of
    its threads when a save fails, before the save's own ``CheckpointError``); ``--debug`` keeps
    them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and not record.name.startswith("rlhf_jax"):
            record.exc_info, record.exc_text = None, None
        return True


_LIBRARY_TRACEBACKS = _NoLibraryTracebacks()


def _quiet() -> None:
    """After a failure: drop what orbax (through absl's logger) and asyncio still log while the
    process ends, and the warnings of orbax coroutines that will never run, so the error line is
    the last word.  Narrow on purpose: ``main`` also runs inside other programs (the tests)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


_NOISY_LOGGERS = ("absl", "asyncio")


if __name__ == "__main__":
    sys.exit(main())
