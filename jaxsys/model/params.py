"""Facts about a parameter tree: its size, and the one way jaxsys names a parameter in messages."""

from __future__ import annotations

from typing import Any

import jax


def count_params(params: Any) -> int:
    """Number of scalars in a tree of arrays (or of `jax.ShapeDtypeStruct`s)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def path_str(path: tuple) -> str:
    """A pytree key path as dotted names, e.g. ``params.layers.attn.wq`` (dict keys, dataclass
    fields and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    return ".".join(parts)
