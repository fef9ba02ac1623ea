"""What `jaxsys train` sets up before JAX starts: without `--devices`, one simulated CPU device
per core where the batch and the mesh allow it (`jaxsys.parallel.runtime.default_cpu_devices`),
else XLA's default; and JAX's persistent compilation cache (`compile_cache_dir`)."""

import subprocess
import sys

import pytest

from jaxsys.config import apply_overrides
from jaxsys.config.presets import get_preset
from jaxsys.parallel.runtime import compile_cache_dir, default_cpu_devices
from tests.helpers import subprocess_env


@pytest.fixture
def no_device_flag(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")


def cfg(*overrides):
    return apply_overrides(get_preset("shakespeare"), list(overrides))  # batch 16, data-parallel mesh


@pytest.mark.parametrize("cores, overrides, expected", [
    (2, [], 2),                                              # the main job on 2 cores
    (1, [], None),                                           # one core: XLA's default
    (8, [], 8),
    (6, [], 4),                                              # the largest count ≤ 6 dividing 16
    (4, ["train.batch_size=6"], 3),
    (4, ["train.batch_size=16", "train.grad_accum=4"], 4),   # microbatches of 4 rows
    (4, ["train.batch_size=16", "train.grad_accum=16"], None),
    (4, ["train.batch_size=7"], None),                       # prime: nothing above 1 divides it
    (4, ["mesh.fsdp=2"], None),                              # the user laid out the mesh
    (4, ["mesh.data=2"], None),
])
def test_one_device_per_core_where_it_divides(no_device_flag, cores, overrides, expected):
    assert default_cpu_devices(cfg(*overrides), cores=cores) == expected


def test_a_device_count_already_in_xla_flags_is_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert default_cpu_devices(cfg(), cores=8) is None


def test_compile_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAXSYS_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "jaxsys" / "xla")
    monkeypatch.setenv("JAXSYS_COMPILE_CACHE", "/somewhere")
    assert compile_cache_dir() == "/somewhere"
    for off in ("off", "0", ""):
        monkeypatch.setenv("JAXSYS_COMPILE_CACHE", off)
        assert compile_cache_dir() is None
    monkeypatch.setenv("JAXSYS_COMPILE_CACHE", "/somewhere")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own setting rules
    assert compile_cache_dir() is None


_PROGRAM = """
import sys
from jaxsys.parallel.runtime import compile_cache_dir, enable_compile_cache
enable_compile_cache(compile_cache_dir(), min_compile_seconds=0)
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).sum()))
"""


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    env = subprocess_env()
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAXSYS_COMPILE_CACHE"] = str(tmp_path / "cache")

    def run():
        out = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, check=True)
        return out.stdout, sorted(p.name for p in (tmp_path / "cache").iterdir())
    first_out, first_files = run()
    second_out, second_files = run()
    assert first_files and second_files == first_files  # written once, then only read
    assert first_out == second_out
