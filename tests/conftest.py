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


# Cases of parametrised grids that only `--runslow` runs, to keep the default suite within its
# 15-minute budget on 2 cores (their times measured in the full suite on 2026-12-01). Each
# concept keeps a case in the default run; the comment names it.
SLOW_CASES = frozenset({
    # the rule's distribution: test_speculative_rule.py::test_emitted_tokens_are_distributed_as_the_target
    "tests/inference/test_speculative.py::test_sampled_tokens_follow_the_target_distribution_exactly",
    # the closed-form minimum: zero0-data2-fsdp4 and zero3-fsdp4-tensor2 stay
    "tests/equivalence/test_data_parallel.py::test_wire_bytes_are_the_closed_form_minimum[data=8]",
    "tests/equivalence/test_data_parallel.py::test_wire_bytes_are_the_closed_form_minimum[zero2-fsdp=8]",
    # data=8: test_parallel.py; ZeRO 0 / 1: zero1-data2-fsdp2-tensor2-sp and the accum cases stay
    "tests/equivalence/test_data_parallel.py::test_loss_and_grads_equal_one_device[data=8]",
    "tests/equivalence/test_data_parallel.py::test_loss_and_grads_equal_one_device[zero0]",
    "tests/equivalence/test_data_parallel.py::test_loss_and_grads_equal_one_device[zero1-accum]",
    # parameters after steps under FSDP: test_zero.py::test_params_after_steps_equal_one_device
    "tests/equivalence/test_parallel.py::test_params_after_steps_equal_one_device[fsdp=8]",
    # their twins of the other family / the swapped mesh stay
    "tests/equivalence/test_parallel.py::test_loss_and_grads_equal_one_device[gpt2-data=8]",
    "tests/equivalence/test_parallel.py::test_loss_and_grads_equal_one_device[llama-data=4,fsdp=2]",
    "tests/equivalence/test_parallel.py::test_loss_and_grads_equal_one_device[gpt2-data=4,tensor=2]",
    # three kernel cases stay (fp32 segments, bf16 ragged cross, fp16 d128); the model on a mesh stays
    "tests/model/test_flash_attention.py::test_matches_float64_reference[fp32-causal-mha-d64-scale0.3]",
    "tests/model/test_flash_attention.py::test_matches_float64_reference[bf16-full-mha-d256-segments]",
    "tests/model/test_flash_attention.py::test_matches_float64_reference[fp32-full-gqa2-d128-ragged]",
    "tests/model/test_flash_attention.py::test_model_trains_with_pallas_like_xla[one-device]",
    # packed rows on a ring: tests/parallel/test_context_attention.py's packed ring cases
    "tests/equivalence/test_packing.py::test_packed_loss_and_grads_equal_one_device[model4-mesh4]",
    # the ring: context=8 and context4 x tensor2 stay; ulysses: its loss-and-gradient case stays
    "tests/equivalence/test_context_parallel.py::test_loss_and_grads_equal_one_device[gpt2-ring-mesh3-True]",
    "tests/equivalence/test_context_parallel.py::test_parameters_after_steps_equal_one_device[ulysses-mesh1]",
    # pipe x data x context: test_packing.py::test_packed_pipeline_equals_one_device (same layout, packed)
    "tests/equivalence/test_context_parallel.py::test_pipeline_with_context_equals_one_device[1f1b-all-gather-axes0]",
    # 1F1B: test_pipeline_composes_with_data_fsdp_and_tensor and the packed pipeline run it
    "tests/equivalence/test_pipeline.py::test_pipeline_equals_one_device[1f1b-4-4]",
    "tests/equivalence/test_pipeline.py::test_pipeline_composes_with_data_and_tensor_together[1f1b-axes0]",
    # the llama / GQA / scanned twins stay
    "tests/inference/test_decode.py::test_generator_runs_int8_weights[gpt2-unscanned]",
    "tests/inference/test_decode.py::test_cached_decoding_equals_full_recomputation_at_every_position[gpt2-unscanned]",
    "tests/inference/test_placement.py::test_generation_on_a_mesh_equals_one_device[gpt2-data4xtensor2-batch4]",
    # the full and dots policies stay
    "tests/model/test_model.py::test_remat_policies_keep_gradients[dots_no_batch]",
    # accumulation on a mesh: the accum cases of test_data_parallel.py
    "tests/train/test_optimizer.py::test_gradient_accumulation_equals_large_batch[mesh1]",
})


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords or item.nodeid in SLOW_CASES:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert len(jax.devices()) == 8, "tests need 8 simulated CPU devices (XLA_FLAGS set too late?)"
