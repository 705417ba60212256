"""Triton kernels, one module per op family; the ops that launch them live in ``openvid_kernels``."""
