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

from jaxsys.config import ConfigError  # imports no jax

ENV_COORDINATOR = "JAXSYS_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSYS_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSYS_PROCESS_ID"
ENV_DISTRIBUTED = "JAXSYS_DISTRIBUTED"


def simulate_cpu_devices(n: int | None) -> None:
    """Ask XLA for `n` ≥ 1 host (CPU) devices; call before jax is imported (None: leave as is)."""
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--devices must be a whole number ≥ 1, got {n!r}.")
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    if "jax" in sys.modules:  # pragma: no cover - only when embedded after jax was imported
        import jax
        if len(jax.devices()) != n:
            raise SystemExit(f"--devices {n}: jax was already initialised with {len(jax.devices())} devices.")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS has no affinity masks
        return os.cpu_count() or 1


def default_cpu_devices(cfg, cores: int | None = None) -> int | None:
    """How many simulated CPU devices `jaxsys train` asks for when `--devices` is not given:
    one per core, so each core runs its own data-parallel replica instead of every small op
    being split over all cores by XLA's thread pool (the main job: 1.4× faster on 2 cores,
    docs/benchmarks.md). None (leave XLA's default of one device) when the user already chose
    (`XLA_FLAGS` has a device count), when the mesh names any axis but `data`, or when no count
    above 1 divides each accumulation microbatch (`train.batch_size / train.grad_accum`).
    Harmless on a GPU machine: the flag only shapes the CPU platform."""
    if "host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    m = cfg.mesh
    if m.data != -1 or any(a != 1 for a in (m.fsdp, m.tensor, m.pipe, m.context, m.expert)):
        return None
    micro = cfg.train.batch_size // max(cfg.train.grad_accum, 1)
    n = max((d for d in range(1, (cores or cpu_cores()) + 1) if micro % d == 0), default=1)
    return n if n > 1 else None


ENV_COMPILE_CACHE = "JAXSYS_COMPILE_CACHE"


def compile_cache_dir() -> str | None:
    """Where `jaxsys train` keeps JAX's persistent compilation cache: `$JAXSYS_COMPILE_CACHE`,
    else `~/.cache/jaxsys/xla` (`$XDG_CACHE_HOME` respected); None when that variable is `off`
    (or `0`, or empty), or when `JAX_COMPILATION_CACHE_DIR` is set (JAX's own settings rule)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    value = os.environ.get(ENV_COMPILE_CACHE)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "false", "no") else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxsys", "xla")


def enable_compile_cache(path: str | None, min_compile_seconds: float = 0.5) -> None:
    """Turn on JAX's persistent compilation cache in `path` (None: leave it off), so a second run
    of the same program loads its executables instead of compiling them. Every program that
    took ≥ `min_compile_seconds` to compile is kept; JAX keys entries by the program, its shardings, the
    backend and the jax/jaxlib versions, so a stale entry is never loaded."""
    if path is None:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)


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
            raise ConfigError(f"{ENV_PROCESS_ID} is set but {', '.join(missing)} is not; "
                              "set all three, or start the processes with `jaxsys launch`.")
        try:
            num, pid = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except ValueError:
            raise ConfigError(f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
                              f"{env[ENV_PROCESS_ID]!r} must be whole numbers.") from None
        if not 0 <= pid < num:
            raise ConfigError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num}).")
        jax.distributed.initialize(coordinator_address=env[ENV_COORDINATOR], num_processes=num,
                                   process_id=pid)
        return True
    try:
        jax.distributed.initialize()  # cluster auto-detection (SLURM, Open MPI, Kubernetes)
    except (ValueError, RuntimeError) as e:  # e.g. "coordinator_address should be defined."
        raise ConfigError(
            f"--distributed: no cluster found to join ({str(e).splitlines()[0].rstrip('.')}). Under SLURM, "
            f"Open MPI or a Kubernetes indexed Job it is detected; elsewhere set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or on one machine use `jaxsys launch "
            "--processes N -- train ...`.") from None
    return True
