"""Plain-PyTorch references: the specification every kernel is checked against.

Written like the math, not like a kernel; they run on the CPU and on the GPU.
"""
