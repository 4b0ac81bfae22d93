"""The ``rlhf-jax`` command line: one subcommand per stage, each built from a config file plus
``--set a.b.c=value`` overrides.

    rlhf-jax sft --config experiments/configs/sft_tiny.json --set loop.total_steps=200
    rlhf-jax rm  --config rm.toml --set optimizer.lr=1e-5 --print-config

Exit codes: 0 done; 2 a bad config, override or command line (the message names the key, file
and line); 1 bad input data (a malformed JSONL line: the message names the file and line), a
missing file, or a NaN that stopped training.  None of these print a traceback.

Adding a subcommand is one entry in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_jax.assets import main as fetch_main
from rlhf_jax.configs import ConfigError, load_config, read_config_file, to_dict
from rlhf_jax.data import DataError
from rlhf_jax.distributed import DistributedConfig, initialize as initialize_distributed
from rlhf_jax.pipeline import PipelineConfig, run_pipeline
from rlhf_jax.plan import main as plan_main
from rlhf_jax.ppo import PRESETS
from rlhf_jax.stages.ppo import PPOStageConfig, train_ppo
from rlhf_jax.stages.reward import RMConfig, train_rm
from rlhf_jax.stages.sft import SFTConfig, train_sft
from rlhf_jax.train import NonFiniteError


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
    "pipeline": Command(PipelineConfig, run_pipeline, "the whole recipe end to end (default: the built-in world)"),
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.add_argument("--config", metavar="FILE", help="a .json or .toml config (default: all defaults)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. optimizer.lr=1e-5 (repeatable)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config as JSON and exit")
        if name == "ppo":
            p.add_argument("--preset", choices=sorted(PRESETS),
                           help="start from another implementation's PPO defaults (before --set)")
    # `plan` parses its own arguments (rlhf_jax.plan.main); listed here for --help only.
    sub.add_parser("plan", help="per-device memory plan of a config, before any training", add_help=False)
    # `fetch` likewise (rlhf_jax.assets.main): `rlhf-jax fetch smollm2 [--dir DIR]`.
    sub.add_parser("fetch", help="download a model file, e.g. `fetch smollm2` (prints its path)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rlhf-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plan"]:
        return plan_main(argv[1:])
    if argv[:1] == ["fetch"]:
        return fetch_main(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage message
        return int(e.code or 0)
    command = COMMANDS[args.command]
    try:
        if args.command == "pipeline":
            command = pipeline_command(args.config)
        overrides = preset_overrides(args.preset) if getattr(args, "preset", None) else []
        cfg = load_config(command.config, args.config, overrides + args.overrides)
    except ConfigError as e:
        return _fail(2, e)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    initialize_distributed(getattr(cfg, "distributed", DistributedConfig()))
    try:
        result = command.run(cfg)
    except ConfigError as e:
        return _fail(2, e)
    except (DataError, FileNotFoundError, NonFiniteError) as e:
        return _fail(1, e)
    if not isinstance(result, dict):  # the pipeline prints its own table
        print(result)
    return 0


def _fail(code: int, error: Exception) -> int:
    print(f"rlhf-jax: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
