"""Where generation's arrays live on a mesh: heads over `tensor`, requests over `data`.

Generation uses the model's own parallel hooks (`parallel.install.parallelize`, the same
Megatron column/row matmuls as training) with parameters stored by the parameter rules without
ZeRO (inference keeps whole weights per tensor shard), and KV caches split like the keys they
hold: batch over `data`, K heads over `tensor`. A dimension that does not divide its mesh axes
(a batch of 1 over data=2, an int8 scale's size-1 axes) stays whole. Only `data` and `tensor`
may exceed 1: `fsdp` and `pipe` are training layouts.

Shapes (`jaxsys.model.axes`): L layers, B batch, K key/value heads, S cache slots, E head size.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from jaxsys.config import ConfigError, ModelConfig
from jaxsys.inference.quantize import QuantizedWeight
from jaxsys.model import kv_cache
from jaxsys.model.transformer import abstract_params
from jaxsys.parallel.install import dividing_spec
from jaxsys.parallel.rules import ACTIVATION_RULES, PARAM_RULES

_INFERENCE_PARAM_RULES = tuple((k, None if v == "fsdp" else v) for k, v in PARAM_RULES)
_CACHE_BKSE = ("batch", "kv_heads", None, "head_dim")


def check_mesh(cfg: ModelConfig, mesh: Mesh) -> None:
    """`ConfigError` for a mesh generation cannot use with this model, naming the fix."""
    others = {a: n for a, n in mesh.shape.items() if a not in ("data", "tensor") and n > 1}
    if others:
        raise ConfigError(f"Generation splits over data and tensor only; this mesh has {others}: "
                          "use a mesh with fsdp=1 and pipe=1.")
    c = cfg.resolved()
    t = mesh.shape.get("tensor", 1)
    if c.num_heads % t or c.num_kv_heads % t:
        raise ConfigError(f"tensor={t} must divide model.num_heads={c.num_heads} and the KV heads "
                          f"{c.num_kv_heads} (the cache is split by KV head); choose a tensor size that divides both.")


def _place(x: Any, logical: tuple[str | None, ...], mesh: Mesh, rules: Any) -> Any:
    spec = dividing_spec(logical, x.shape, mesh, rules)
    return jax.device_put(x, NamedSharding(mesh, spec))


def place_params(params: Any, cfg: ModelConfig, mesh: Mesh) -> Any:
    """`params` (float or `quantize.QuantizedWeight` leaves) on `mesh` by the parameter rules."""
    _, logical = abstract_params(cfg)

    def one(spec: Any, leaf: Any) -> Any:
        names = tuple(spec)
        if isinstance(leaf, QuantizedWeight):  # int8: values and scales alike
            return leaf.replace(values=_place(leaf.values, names, mesh, _INFERENCE_PARAM_RULES),
                                scale=_place(leaf.scale, names, mesh, _INFERENCE_PARAM_RULES))
        return _place(leaf, names, mesh, _INFERENCE_PARAM_RULES)

    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    return jax.tree_util.tree_map(one, logical, params, is_leaf=is_spec)


def place_caches(caches: Any, mesh: Mesh, stacked: bool) -> Any:
    """KV caches on `mesh`: batch over data, K heads over tensor, scales alike. `stacked`: the
    caches carry a leading L axis (`scan_layers`), else they are a tuple of layers."""
    lead = (None,) if stacked else ()

    def layer(c: kv_cache.LayerCache) -> kv_cache.LayerCache:
        put = lambda x, names: None if x is None else _place(x, (*lead, *names), mesh, ACTIVATION_RULES)  # noqa: E731
        return kv_cache.LayerCache(put(c.k_BKSE, _CACHE_BKSE), put(c.v_BKSE, _CACHE_BKSE),
                                   put(c.k_scale_BKS, _CACHE_BKSE[:3]), put(c.v_scale_BKS, _CACHE_BKSE[:3]))
    return layer(caches) if stacked else tuple(layer(c) for c in caches)
