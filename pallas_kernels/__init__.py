"""Pallas kernels, importable without jaxsys.

- `pallas_kernels.flash_attention`: FlashAttention-2 forward and backward (causal with block
  skipping, GQA/MQA, segment ids, ragged lengths), compiled on GPU, interpreted elsewhere.
- `pallas_kernels.reference`: the plain-`jnp` attention it must equal.
"""
