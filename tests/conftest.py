"""Test setup: 8 simulated CPU devices, configured before jax is imported anywhere."""

import os

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

import jax  # noqa: E402
import pytest  # noqa: E402


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
