"""Triton kernels of the mage ops. Imported lazily by the registry (importing triton takes ~1 s)."""
