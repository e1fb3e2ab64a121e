"""Triton GPU kernels, installed as `rlhf_fast.kernels` (never as a top-level `kernels`).

Each module holds one op's kernel and its launcher; `rlhf_fast.ops` imports them lazily and
owns argument checking and autograd. On a machine without a GPU they run on CPU tensors under
the Triton interpreter (`TRITON_INTERPRET=1`), which is how the tests exercise them.
"""
