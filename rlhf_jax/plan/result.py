"""A plan's rows and its text table."""

from __future__ import annotations

import dataclasses

from rlhf_jax.model import ModelConfig
from rlhf_jax.plan.config import GiB, PHASES, PlanConfig


@dataclasses.dataclass(frozen=True)
class Row:
    """One buffer kind: ``bytes`` per device, the ``phase`` it lives in, ``source`` ``"exact"``
    or ``"analytic"``, and what it holds (``detail``)."""

    name: str
    phase: str
    bytes: int
    source: str
    detail: str


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """``compiled.memory_analysis()`` of the train step, per device, extrapolated to
    ``n_layers`` from the compiled layer counts ``layers`` (see the module docstring)."""

    program: str
    backend: str
    devices: int
    layers: tuple[int, ...]
    n_layers: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Live at once: arguments + outputs − donated (aliased) bytes + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory of ``config`` on its mesh (see the module docstring)."""

    config: PlanConfig
    model: ModelConfig
    mesh_shape: tuple[int, int, int]
    n_params: int
    rows: tuple[Row, ...]
    fallbacks: tuple[str, ...]
    compiled: CompiledMemory | None = None

    def phase_bytes(self, phase: str) -> int:
        return sum(r.bytes for r in self.rows if r.phase == phase)

    @property
    def peak_phase(self) -> str:
        return max(PHASES[1:], key=self.phase_bytes)

    @property
    def total_bytes(self) -> int:
        """``state`` + the largest of the other phases."""
        return self.phase_bytes("state") + self.phase_bytes(self.peak_phase)

    @property
    def usable_bytes(self) -> int:
        return int(self.config.device_memory_gib * self.config.headroom * GiB)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable_bytes

    def row_bytes(self, name: str) -> int:
        """Bytes of the rows whose name starts with ``name`` (0 if none)."""
        return sum(r.bytes for r in self.rows if r.name.startswith(name))

    def table(self) -> str:
        """The plan as a text table, per device, in GiB (2³⁰ bytes), or MiB for plans under 1 GiB."""
        c, m = self.config, self.model
        unit, size = ("GiB", GiB) if self.total_bytes >= GiB else ("MiB", 2**20)
        source = c.hf_config or f"{m.arch} d_model {m.d_model}, {m.n_layers} layers"
        labels = [f"{r.name} ({r.detail})" for r in self.rows]
        width = max([56, *(len(label) + 2 for label in labels)])
        lines = [
            f"rlhf-jax plan: stage {c.stage}, {source}, {self.n_params / 1e9:.2f}B parameters",
            f"  {c.devices} devices × {c.device_memory_gib:g} GiB, mesh data×fsdp×tensor = "
            f"{'×'.join(map(str, self.mesh_shape))}, compute {c.compute_dtype}, "
            f"remat {'dots' if m.remat_mode == 'dots' else c.remat}, "
            f"{self._shape_text()}",
            "",
            f"  {'per device':<{width}}{'phase':<12}{unit:>8}  source",
        ]
        for r, label in zip(self.rows, labels):
            lines.append(f"  {label:<{width}}{r.phase:<12}{r.bytes / size:>8.2f}  {r.source}")
        total = f"total = state + largest phase ({self.peak_phase})"
        usable = f"usable: {c.headroom:g} × {c.device_memory_gib:g} GiB"
        lines += [
            f"  {total:<{width + 12}}{self.total_bytes / size:>8.2f}",
            f"  {usable:<{width + 12}}{self.usable_bytes / size:>8.2f}",
        ]
        if self.fallbacks:
            lines.append(f"  note: {len(self.fallbacks)} parameter dims not divisible by their mesh axes are "
                         f"replicated ({', '.join(self.fallbacks[:3])}{', ...' if len(self.fallbacks) > 3 else ''})")
        free = 1 - self.total_bytes / self.usable_bytes
        verdict = (f"fits: {self.total_bytes / size:.2f} of {self.usable_bytes / size:.2f} {unit} usable "
                   f"({free:.0%} free)" if self.fits else
                   f"does NOT fit: {self.total_bytes / size:.2f} {unit} needed, {self.usable_bytes / size:.2f} usable")
        lines.append(f"verdict: {verdict}")
        if self.compiled is not None:
            k = self.compiled
            how = (f"compiled with {k.layers[0]} and {k.layers[1]} layers, extrapolated to {k.n_layers}"
                   if len(k.layers) == 2 else f"compiled with all {k.n_layers} layers")
            lines += [
                "",
                f"compiled: {k.program}, XLA {k.backend} on {k.devices} devices ({how}); {unit} per device:",
                f"  arguments {k.argument_bytes / size:.2f}  outputs {k.output_bytes / size:.2f}  "
                f"aliased {k.alias_bytes / size:.2f}  temp {k.temp_bytes / size:.2f}  "
                f"peak {k.peak_bytes / size:.2f}",
            ]
            if k.backend == "cpu":
                lines.append("  (CPU temporaries run several times a GPU's or TPU's: bfloat16 computed in "
                             "float32, less fusion; compile='local' on the target gives its own)")
        return "\n".join(lines)

    def _shape_text(self) -> str:
        c = self.config
        if c.stage == "sft":
            return f"batch {c.batch_size} × {c.seq_len} tokens"
        if c.stage in ("rm", "dpo"):
            return f"batch {c.batch_size} prompts × {c.k_responses} responses × {c.seq_len} tokens"
        ptx = f", ptx {c.ptx_batch_size} × {c.seq_len}" if c.ptx_batch_size else ""
        group = f" × {c.group_size} samples" if c.stage == "grpo" else ""
        return (f"rollout {c.batch_size}{group} × ({c.prompt_len} + {c.max_new_tokens}) tokens in "
                f"{c.ppo_minibatches} minibatches{ptx}, frozen {c.frozen_dtype}")
