"""Parallelism, applied to the model from outside: meshes, rules, strategies, the runtime.

- `runtime`: simulated CPU devices and `jax.distributed` (imports no JAX at import time);
- `mesh`: mesh axes and sizes, `make_mesh`, the one `layout_name`;
- `rules`: the logical-axis rules tables (parameters, gradients, optimizer state per ZeRO stage;
  activations, with sequence parallelism);
- `manual`: nested `shard_map`, constraints inside manual regions, shared collective helpers;
- `tensor`: Megatron tensor and sequence parallelism, vocabulary-parallel embedding and loss;
- `zero`: data parallelism and ZeRO 0-3 with the gradient collectives written out (manual over
  data × fsdp × context);
- `context`: context parallelism (the sequence over `context`): the zigzag layout, all-gather
  and Ulysses attention, `check_context`; `ring_attention`: the ring and its ring backward;
- `pipeline/`: schedules, their compiled programs, the executor;
- `install`: `parallelize(mesh, rules)`, which installs the parallel versions of the model's hooks;
- `layout`: `check_layout`, every mesh-dependent check before a compile.

Imports `jaxsys.config`, `jaxsys.model` and `jaxsys.data`; never the layers above.
"""
