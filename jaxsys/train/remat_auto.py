"""`model.remat=auto`: the cheapest remat policy whose compiled train step fits a memory budget.

Candidates in order of recompute (`AUTO_ORDER`): "none" recomputes nothing; "dots" only the
elementwise work (every matmul's output is saved, the attention's QKᵀ and PV too); "dots_no_batch"
also those two batched matmuls (only the weight matmuls' outputs are saved); "full" the whole
forward of each layer. Each saves a subset of the one before, so memory falls along the order
too. Measured (`experiments/remat.py`, gpt2-small shape, 4 layers, T = 1024, compiled FLOPs of
the step relative to none): dots 1.001, dots_no_batch 1.015, full 1.115 (docs/benchmarks.md).

Each candidate is compiled ahead of time (nothing runs) and its per-device peak read from
`memory_analysis()` as `jaxsys plan` counts it: arguments + outputs − aliased + temporaries.
The first that fits `train.memory_budget` GiB (0: the device's memory, `device_memory_bytes`)
wins; its compiled step is returned so training does not compile it again. None fits: a
`ConfigError` naming the smallest peak and the fix, before anything has run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.sharding import Mesh

from jaxsys.config import Config, ConfigError, apply_overrides
from jaxsys.config.checks import check_memory_platform
from jaxsys.train import state as state_lib
from jaxsys.train import step as step_lib

AUTO_ORDER = ("none", "dots", "dots_no_batch", "full")  # least recompute first


@dataclasses.dataclass(frozen=True)
class Tried:
    """One candidate policy: its compiled per-device peak and temporaries, in bytes."""

    policy: str
    peak: int
    temp: int


def peak_bytes(compiled: Any) -> int:
    """Per-device peak of a compiled program: arguments + outputs − aliased (donated) + temporaries."""
    ma = compiled.memory_analysis()
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
               + ma.temp_size_in_bytes)


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory one device offers, from its allocator's `bytes_limit` (None if it reports none)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def budget_bytes(cfg: Config, device: jax.Device) -> int:
    """`train.memory_budget` GiB in bytes, or the device's memory when it is 0."""
    if cfg.train.memory_budget:
        return int(cfg.train.memory_budget * 2**30)
    limit = device_memory_bytes(device)
    if limit is None:
        raise ConfigError(f"model.remat=auto: the {device.platform} device reports no memory size; pass "
                          "--memory-budget GiB (train.memory_budget).")
    return limit


def resolve(cfg: Config, mesh: Mesh, batch_keys: tuple[str, ...] = ("inputs", "targets"),
            log: Callable[[str], None] | None = None,
            compiler_options: dict[str, Any] | None = None) -> tuple[state_lib.Setup, Any, list[Tried]]:
    """For `model.remat=auto`: (setup and compiled train step of the first `AUTO_ORDER` policy whose
    peak fits the budget, every candidate tried). `log` gets one line naming the pick and the
    bytes of each tried. Raises `ConfigError` when none fits. Other policies: compiled as is.
    `compiler_options` go to every compile (`jaxsys plan`'s buffer dump)."""
    check_memory_platform(cfg, mesh.devices.flat[0].platform)
    if cfg.model.remat != "auto":
        s = state_lib.setup(cfg, mesh)
        compiled = step_lib.compile_train_step(s, batch_keys, compiler_options=compiler_options)
        return s, compiled, [Tried(cfg.model.remat, peak_bytes(compiled), _temp(compiled))]
    budget = budget_bytes(cfg, mesh.devices.flat[0])
    tried: list[Tried] = []
    for policy in AUTO_ORDER:
        s = state_lib.setup(apply_overrides(cfg, [f"model.remat={policy}"]), mesh)
        compiled = step_lib.compile_train_step(s, batch_keys, compiler_options=compiler_options)
        tried.append(Tried(policy, peak_bytes(compiled), _temp(compiled)))
        if tried[-1].peak <= budget:
            if log is not None:
                log(f"model.remat=auto: picked {policy} (peak {_mib(tried[-1].peak)} ≤ budget {_mib(budget)}; "
                    f"tried {describe(tried)})")
            return s, compiled, tried
    best = min(tried, key=lambda t: t.peak)
    raise ConfigError(f"model.remat=auto: no policy fits the budget of {_mib(budget)} ({budget:,} bytes) per "
                      f"device (smallest peak: {best.policy}, {_mib(best.peak)} ({best.peak:,} bytes); tried "
                      f"{describe(tried)}); raise --memory-budget, or cut train.batch_size / model.seq_len, "
                      "or add devices.")


def describe(tried: list[Tried]) -> str:
    """"none 12.3 MiB, dots 8.1 MiB, ...": each tried policy's peak."""
    return ", ".join(f"{t.policy} {_mib(t.peak)}" for t in tried)


def _temp(compiled: Any) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.3f} MiB"
