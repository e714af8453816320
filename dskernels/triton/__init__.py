"""Triton kernels. Compiled on a GPU; under TRITON_INTERPRET=1 they run on the CPU (CI)."""
