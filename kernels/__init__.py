"""Triton kernels, one module per op family, each next to the reference it must match.

Installed as unlearn_fast.kernels. Functions are named after the ops and take the op's arguments
(see unlearn_fast/backends.py). They run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
"""
from .codec import dequantize_axpy_, dequantize_blockwise, quantize_blockwise
from .lbfgs import lbfgs_gram, lbfgs_matvec, qn_step_
from .softmax_linear_hvp import softmax_linear_hvp
