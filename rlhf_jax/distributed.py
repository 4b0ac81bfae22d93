"""Multi-host start-up: ``jax.distributed.initialize`` from a config or the environment.

JAX's multi-controller runtime is the distributed engine: one process per host (TPU VM worker,
GPU node), each running the same program on its local devices, the mesh spanning all of them.
On TPU VMs and SLURM clusters ``jax.distributed.initialize()`` finds its peers by itself
(``auto=True``); elsewhere give the coordinator's address, the number of processes and this
process's id.  On CPU (tests, loopback runs) collectives go through gloo.
"""

from __future__ import annotations

import dataclasses

import jax

from rlhf_jax.errors import ConfigError, check


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """``auto``: let JAX detect the cluster (TPU pod slices, SLURM, Open MPI). Otherwise
    ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and ``process_id``."""

    auto: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if self.auto and any(v is not None for v in explicit):
            raise ConfigError("DistributedConfig: set either auto=true or the three explicit fields, not both")
        if not self.auto and any(v is None for v in explicit) and any(v is not None for v in explicit):
            raise ConfigError("DistributedConfig: coordinator_address, num_processes and process_id go together")
        check(self.num_processes is None or self.num_processes >= 1, self, "num_processes", ">= 1")
        check(self.process_id is None or 0 <= self.process_id < (self.num_processes or 1),
              self, "process_id", "in [0, num_processes)")

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def initialize(cfg: DistributedConfig) -> None:
    """Join the cluster (once per process, before any other JAX call); a no-op when disabled."""
    if not cfg.enabled:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # affects CPU devices only
    if cfg.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
