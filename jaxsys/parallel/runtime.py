"""The JAX runtime before the first computation: simulated CPU devices and joining a
multi-process job. Importing this module does not import JAX (the CLI configures XLA first).

`jaxsys launch --processes N -- train ...` (`jaxsys.cli.launch`) starts N copies of `jaxsys
train` on this machine; each joins JAX's own runtime with `jax.distributed.initialize` here
(process 0 hosts the coordination service; CPU collectives go through gloo) and the mesh spans
every process's devices. The launcher tells each child who it is through three variables:

    JAXSYS_COORDINATOR=127.0.0.1:PORT   JAXSYS_NUM_PROCESSES=N   JAXSYS_PROCESS_ID=i

On a cluster nothing needs launching by us: `jaxsys train --distributed` (or
`JAXSYS_DISTRIBUTED=1`, or running under `srun` with several tasks) calls
`jax.distributed.initialize()` with no arguments, and JAX finds the coordinator, the process
count and this process's id from SLURM, Open MPI or Kubernetes (indexed Job / JobSet).
"""

from __future__ import annotations

import os
import sys

ENV_COORDINATOR = "JAXSYS_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSYS_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSYS_PROCESS_ID"
ENV_DISTRIBUTED = "JAXSYS_DISTRIBUTED"


def simulate_cpu_devices(n: int | None) -> None:
    """Ask XLA for `n` host (CPU) devices; call before jax is imported (None/0: leave as is)."""
    if not n:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    if "jax" in sys.modules:  # pragma: no cover - only when embedded after jax was imported
        import jax
        if len(jax.devices()) != n:
            raise SystemExit(f"--devices {n}: jax was already initialised with {len(jax.devices())} devices.")


def wants_distributed(flag: bool = False) -> bool:
    """Is this process one of several? (launcher env, `--distributed`, JAXSYS_DISTRIBUTED=1,
    or an `srun` step with more than one task)."""
    env = os.environ
    return (flag or ENV_PROCESS_ID in env or env.get(ENV_DISTRIBUTED, "") not in ("", "0")
            or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1)


def initialize(local_cpu_devices: int | None = None, flag: bool = False) -> bool:
    """Join the other processes with `jax.distributed.initialize` when `wants_distributed`.

    `local_cpu_devices`: simulated CPU devices of this process (`jax_num_cpu_devices`); must be
    called before any JAX computation. Returns True when initialised."""
    if not wants_distributed(flag):
        return False
    import jax
    if local_cpu_devices:
        jax.config.update("jax_num_cpu_devices", local_cpu_devices)
    env = os.environ
    if ENV_PROCESS_ID in env:
        missing = [k for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES) if k not in env]
        if missing:
            raise SystemExit(f"jaxsys: {ENV_PROCESS_ID} is set but {', '.join(missing)} is not; "
                             "set all three, or start the processes with `jaxsys launch`.")
        jax.distributed.initialize(coordinator_address=env[ENV_COORDINATOR],
                                   num_processes=int(env[ENV_NUM_PROCESSES]),
                                   process_id=int(env[ENV_PROCESS_ID]))
    else:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Open MPI, Kubernetes)
    return True
