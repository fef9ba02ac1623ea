"""fp8 matmuls (`model.fp8=current`) under explicit data parallelism equal one device in fp8.

Each tensor's scale is its amax over the whole batch: inside the explicit sync's shard_map the
`amax` hook maxes over the batch axes (`jaxsys.parallel.zero`), so every device quantizes with
the scale one device would use. With each device's own amax instead (the pmax removed by hand,
2026-12-01) the loss differed from one device's by 1.0e-4, fifty times the tolerance."""

import pytest

from tests.equivalence.test_data_parallel import explicit_loss_and_grads
from tests.helpers import layout, max_abs_diff, one_device_reference, tiny_cfg


@pytest.mark.slow  # 51-71 s on the loaded 2-core machine (2026-12-01): two more compiles of the model's gradients
def test_fp8_data_parallel_equals_one_device():
    # (params, batch, loss, grads) at seed 0 on one device; the plain one is shared with
    # tests/equivalence/test_parallel.py (cached per worker).
    params, batch, ref_loss, ref_grads = one_device_reference("model.fp8=current")
    *_, plain_grads = one_device_reference()
    loss, grads = explicit_loss_and_grads(layout(tiny_cfg("mesh.data=8", "model.fp8=current")), params, batch)
    assert abs(loss - ref_loss) < 2e-6
    assert max_abs_diff(grads, ref_grads) < 2e-6
    assert max_abs_diff(plain_grads, ref_grads) > 1e-4  # fp8 really changed the gradients
