"""Triton kernels of fastssl, installed as ``fastssl.kernels``. Never imports fastssl."""
