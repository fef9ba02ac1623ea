"""The model: a decoder-only transformer as a pure function of a parameter pytree.

- `axes`: the glossary of dimension letters and the logical axis names;
- `hooks`: the points where parallel strategies plug in (plain versions here);
- `attention`: the attention implementations (xla, cudnn, pallas), unsharded;
- `layers`: norm, RoPE, attention, MLP, block;
- `fp8`: fp8 matmuls with current scaling (`model.fp8=current`) for the dense layers;
- `transformer`: the `Transformer` (embed -> blocks -> head), `block_fn`, `moe_block_fn`, `abstract_params`;
- `loss`: the mean next-token cross-entropy; `flops`, `params`: counting.

Imports only `jaxsys.config` (and `pallas_kernels` for the flash-attention kernel).
"""
