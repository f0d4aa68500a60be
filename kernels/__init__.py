"""Triton kernels, one module per op family, each next to the reference it must match.

Installed as unlearn_fast.kernels. Functions are named after the ops and take the op's arguments.
"""
