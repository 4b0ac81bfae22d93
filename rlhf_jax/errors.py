"""Every exception ``rlhf_jax`` raises on purpose, and the one config check.

A leaf module: it imports nothing, so the pure core (model, generation, ppo, ...) and the edges
(configs, data, checkpoints, the CLI) all raise from here.  The CLI maps each type to an exit
code (``rlhf_jax.cli``: 2 for bad input, 1 for a failure while running).

Every config dataclass checks itself in ``__post_init__`` with ``check``, so each bad value gives
one message shape, ``ModelConfig.n_heads must be a positive int, got 0``, and one type,
``ConfigError`` (a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigError", "check", "DataError", "CheckpointError", "NonFiniteError", "WorkdirError",
           "GGUFError", "ChatTemplateError", "PlanError", "DeviceMemoryError", "FetchError"]


class ConfigError(ValueError):
    """A config value, key, file or override is invalid; the message names which one."""


def check(ok: object, config: object, field: str, rule: str) -> None:
    """Raise ``ConfigError("<Class>.<field> must be <rule>, got <value>")`` unless ``ok``.

    ``config`` is the dataclass being checked (its class name and the field's value go into the
    message); ``rule`` says what the field must be, e.g. ``"an int >= 1"``."""
    if not ok:
        raise ConfigError(f"{type(config).__name__}.{field} must be {rule}, got {getattr(config, field)!r}")


class DataError(ValueError):
    """A malformed data line; the message names the file, the line number and the field."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or read back intact; the message names the directory (or
    step) and the reason in one line."""


class NonFiniteError(FloatingPointError):
    """A metric is NaN or infinite; raised before anything is saved."""


class WorkdirError(ValueError):
    """The workdir cannot be used as asked (held by another process, or it holds a run of a
    different config or input); the message is one line that says how to proceed."""


class GGUFError(ValueError):
    """A GGUF file that cannot be read or loaded; the message names the file and the problem."""


class ChatTemplateError(ValueError):
    """A bad message list or a chat template that fails to compile or raises while rendering."""


class PlanError(RuntimeError):
    """The plan does not fit the device; the message says by how much and what would fit.

    ``suggestions``: ``(overrides, GiB per device)`` pairs, each a list of ``--set`` overrides
    that make the plan fit (checked by re-planning analytically)."""

    def __init__(self, message: str, suggestions: Sequence[tuple[tuple[str, ...], float]] = ()):
        super().__init__(message)
        self.suggestions = tuple(suggestions)


class DeviceMemoryError(RuntimeError):
    """A stage ran out of device memory; the message names the stage, the step, the batch shape,
    the memory plan's estimate and what to change (``train.memory.MemoryGuard``)."""


class FetchError(RuntimeError):
    """``pip download`` failed (no network, no registry) or the wheel is not what we expect."""
