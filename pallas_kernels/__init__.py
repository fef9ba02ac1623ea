"""Pallas kernels, importable without jaxsys.

The flash-attention kernel (`pallas_kernels.flash_attention`) is a separate deliverable; until
it lands, `model.attention=pallas` raises a clear error.
"""
