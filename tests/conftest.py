"""Test setup: 8 simulated CPU devices, configured before jax is imported anywhere."""

import os
import shutil
import tempfile

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
# The suite's time is almost all XLA:CPU compiles of tiny programs, mostly LLVM's: without its
# optimisations they compile ~45% faster (measured on tests/model/test_model.py: 47 s -> 26 s)
# and run slower, which tiny models do not notice. HLO passes (and so the collectives the planner tests
# count) are unaffected. Subprocesses (CLI, launcher) inherit it through `tests.helpers.subprocess_env`
# (which drops only the device count). Set XLA_FLAGS yourself to
# override.
if not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
    _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache per test run, shared by the xdist workers (children of the
# controller, which removes it at the end) and the jaxsys processes the CLI tests start: the
# same tiny programs are compiled in many tests and processes. Measured on tests/cli/
# test_bad_inputs.py + test_run_outputs.py, cold cache: 92 -> 61 s. JAX_COMPILATION_CACHE_DIR
# set by you wins (and is kept).
_CACHE_OWNER = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
_CACHE = os.path.join(tempfile.gettempdir(), f"jaxsys-test-compile-cache-{_CACHE_OWNER}")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_unconfigure(config):
    if "PYTEST_XDIST_WORKER" not in os.environ and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert len(jax.devices()) == 8, "tests need 8 simulated CPU devices (XLA_FLAGS set too late?)"
