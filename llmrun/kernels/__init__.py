"""Kernels handed to the decoders: the interface and its self-check, the CPU C kernels, the CUDA Triton
kernels, the matmuls' row check, and the choice of a set per device (choose.py)."""
