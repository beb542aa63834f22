"""Triton kernels for NVIDIA GPUs: one kernel and its launcher per module, imported only where used."""
