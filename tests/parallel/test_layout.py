"""Mesh construction and layout validation: bad layouts fail before compiling, clearly."""

import jax
import pytest

from jaxsys.config import ConfigError, MeshConfig
from jaxsys.model import hooks
from jaxsys.parallel.install import parallelize
from jaxsys.parallel.mesh import make_mesh, resolve_mesh_shape
from jaxsys.train.state import setup
from tests.helpers import tiny_cfg


def test_minus_one_takes_the_rest():
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=2), 8) == {"pipe": 1, "data": 4, "fsdp": 2, "expert": 1,
                                                                 "context": 1, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1), 8)["fsdp"] == 4
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    assert dict(mesh.shape) == {"pipe": 1, "data": 2, "fsdp": 4, "expert": 1, "context": 1, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=2, context=-1), 8)["context"] == 4
    assert resolve_mesh_shape(MeshConfig(data=-1, pipe=2), 8)["data"] == 4  # jaxsys.parallel.pipeline


@pytest.mark.parametrize("mesh,devices,message", [
    (MeshConfig(data=3, fsdp=1), 8, "has 3 devices but 8 are available"),
    (MeshConfig(data=-1, fsdp=3), 8, "needs a multiple of 3 devices, but there are 8"),
    (MeshConfig(data=-1, fsdp=-1), 8, "Only one mesh axis may be -1"),
    (MeshConfig(data=0), 8, "mesh.data=0 is invalid"),
])
def test_bad_meshes(mesh, devices, message):
    with pytest.raises(ConfigError, match=message):
        resolve_mesh_shape(mesh, devices)


@pytest.mark.parametrize("overrides,message", [
    # 16 sequences over data × fsdp = 8 with 4 microbatches: 4 per microbatch < 8 ways.
    (("mesh.data=8", "train.grad_accum=4"), "not divisible by data × fsdp × expert = 8 × 1 × 1 = 8"),
    # embed_dim 36 over fsdp=8: names the parameter, dimension and axis.
    (("mesh.data=1", "mesh.fsdp=8", "model.embed_dim=36", "model.num_heads=4"),
     r"dimension \d \('embed', size 36\) is not divisible by mesh axis fsdp=8"),
    (("mesh.data=2", "mesh.tensor=4", "model.num_heads=2", "model.embed_dim=32"),
     "model.num_heads=2 is not divisible by the tensor axis"),
    (("mesh.data=1", "mesh.tensor=8", "model.vocab_size=260", "model.num_heads=8"),
     "model.vocab_size=260 is not divisible by the tensor axis"),
])
def test_bad_layouts_rejected_before_compile(overrides, message):
    cfg = tiny_cfg(*overrides)
    mesh = make_mesh(cfg.mesh)
    with pytest.raises(ConfigError, match=message):
        setup(cfg, mesh)


def test_constrain_is_noop_outside_context_and_pins_inside():
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    x = jax.numpy.ones((8, 4, 2))
    assert hooks.constrain(x, ("batch", "seq", "embed")) is x

    @jax.jit
    def f(x):
        return hooks.constrain(x * 2, ("batch", "seq", "embed"))

    with parallelize(mesh):
        y = f(x)
    assert y.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
