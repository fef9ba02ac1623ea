"""Parallel versions of the model's hooks, installed from outside the model.

`parallelize(mesh, rules)` is the one switch between the single-device model and the model laid
out on a mesh (as torchtitan's `parallelize` applies its strategies to a plain model): inside
the block, every hook of `jaxsys.model.hooks` is the version for `mesh` under the activation
`rules`:

    constrain, use_weight   sharding constraints by `rules` (`manual.constrain_to`)
    column_matmul, row_matmul, embed_lookup, cross_entropy
                            Megatron tensor / sequence parallelism (`jaxsys.parallel.tensor`)
    attention               the Pallas kernel under `shard_map` (GSPMD cannot split a pallas_call);
                            with mesh.context > 1, `jaxsys.parallel.context` (all-gather, ring, Ulysses)
    stored_shape            unchanged; `jaxsys.parallel.zero` swaps it (and use_weight) for the
                            ZeRO-3 gather inside its manual region
    experts                 with mesh.expert > 1, the all-to-all dispatch and combine of
                            `jaxsys.parallel.expert`; else the plain version (XLA partitions it)

The pipeline executor traces its stages with the plain hooks (`hooks.installed(hooks.Hooks())`):
inside its shard_map the layout follows from the inputs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import jax
from jax.sharding import Mesh

from jaxsys.config import ContextParallelConfig

from jaxsys.model import attention as attention_lib
from jaxsys.model import hooks
from jaxsys.parallel import expert as expert_lib
from jaxsys.parallel import tensor
from jaxsys.parallel import context as context_lib
from jaxsys.parallel.manual import constrain_to, dividing_spec, shard_map
from jaxsys.parallel.rules import ACTIVATION_RULES, Rules


def sharded_attention(mesh: Mesh, rules: Rules, q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array,
                      *, impl: str, causal: bool = True, segment_ids: jax.Array | None = None) -> jax.Array:
    """`attention_lib.attention` on a mesh. XLA and cuDNN attention are partitioned by GSPMD;
    the Pallas kernel runs inside `jax.shard_map`: batch split as the rules split `batch` (data
    × fsdp), heads as they split `heads` / `kv_heads` (tensor), the whole sequence on every
    device. Query head h of a shard still reads K/V head h // G of that shard, because heads are
    split in contiguous blocks of whole groups. `segment_ids` [B, T] (packed documents) are
    split as the batch."""
    if impl != "pallas":
        return attention_lib.attention(q_BTHE, k_BSKE, v_BSKE, impl=impl, causal=causal, segment_ids=segment_ids)
    q_spec = dividing_spec(("batch", None, "heads", "head_dim"), q_BTHE.shape, mesh, rules)
    kv_spec = dividing_spec(("batch", None, "kv_heads", "head_dim"), k_BSKE.shape, mesh, rules)
    args, specs = (q_BTHE, k_BSKE, v_BSKE), (q_spec, kv_spec, kv_spec)
    if segment_ids is not None:
        args, specs = (*args, segment_ids), (*specs, dividing_spec(("batch", None), segment_ids.shape, mesh, rules))

    def kernel(q, k, v, seg=None):
        return attention_lib.pallas_attention(q, k, v, causal=causal, segment_ids=seg)

    return shard_map(kernel, mesh, mesh.axis_names, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def parallel_hooks(mesh: Mesh, rules: Rules = ACTIVATION_RULES,
                   context: ContextParallelConfig | None = None) -> hooks.Hooks:
    """The model's hooks for `mesh` under the activation `rules`; on a mesh whose `context`
    axis is > 1, attention is context-parallel as `context` says (default: ring, zigzag); on one
    whose `expert` axis is > 1 the MoE experts are expert-parallel."""
    constrain = functools.partial(constrain_to, mesh, rules)
    attention = functools.partial(sharded_attention, mesh, rules)
    if dict(mesh.shape).get("context", 1) > 1:
        attention = functools.partial(context_lib.context_attention, mesh, rules,
                                      context or ContextParallelConfig())
    plain = hooks.Hooks()
    experts = expert_lib.experts_hook(mesh, rules, plain.experts) if expert_lib.used(mesh) else plain.experts
    return hooks.Hooks(
        experts=experts,
        constrain=constrain,
        use_weight=constrain,  # stored by PARAM_RULES, used by the activation rules
        column_matmul=functools.partial(tensor.column_parallel, mesh, rules),
        row_matmul=functools.partial(tensor.row_parallel, mesh, rules),
        embed_lookup=functools.partial(tensor.embed_lookup, mesh, rules),
        attention=attention,
        cross_entropy=functools.partial(tensor.cross_entropy, mesh, rules),
        tiled_cross_entropy=functools.partial(tensor.tiled_cross_entropy, mesh, rules),
    )


@contextlib.contextmanager
def parallelize(mesh: Mesh, rules: Rules = ACTIVATION_RULES,
                context: ContextParallelConfig | None = None) -> Iterator[hooks.Hooks]:
    """Trace the model laid out on `mesh` inside this block (see the module docstring)."""
    with hooks.installed(parallel_hooks(mesh, rules, context)) as installed:
        yield installed
