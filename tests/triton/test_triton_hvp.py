"""Triton softmax_linear_hvp (kernels/softmax_linear_hvp.py) against the pure-torch reference and autograd.

Runs compiled on a CUDA GPU, or interpreted on CPU: `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton -q`.
"""
import pytest
import torch
import torch.nn.functional as F

from tolerances import assert_close, sum_magnitude
from unlearn_fast import ops, reference
from unlearn_fast.backends import use_backend
import importlib

tk_hvp = importlib.import_module("unlearn_fast.kernels.softmax_linear_hvp")  # the module, not the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(1, 1, 1, 1), (255, 7, 3, 2), (257, 33, 10, 5), (4097, 5, 2, 3), (1_000_003, 2, 2, 1), (40, 70, 17, 3)]


def random_slh(n, d, c, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(c, d, generator=g, dtype=torch.float64) / d**0.5
    V = torch.randn(k, c, d, generator=g, dtype=torch.float64)
    return (t.to(dtype).to(DEVICE) for t in (X, W, V))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
def test_triton_softmax_linear_hvp_matches_reference(dtype, size):
    X, W, V = random_slh(*size, dtype, seed=sum(size))
    expected = reference.softmax_linear_hvp(X.double(), W.double(), V.double())
    with use_backend("triton"):
        out = ops.softmax_linear_hvp(X, W, V)
    assert out.shape == V.shape and out.dtype == dtype
    assert_close(out, expected, dtype, scale=sum_magnitude(X, W, V) * X.shape[0] ** 0.5 + 1.0)


def test_triton_softmax_linear_hvp_matches_autograd_hessian():
    X, W, V = random_slh(9, 4, 3, 5, torch.float64, seed=1)
    y = torch.zeros(9, dtype=torch.long, device=DEVICE)
    H = torch.autograd.functional.hessian(lambda w: F.cross_entropy(X @ w.view_as(W).T, y), W.reshape(-1))
    assert_close(tk_hvp.softmax_linear_hvp(X, W, V), (V.reshape(5, -1) @ H).view_as(V))


def test_triton_softmax_linear_hvp_opcheck():
    X, W, V = random_slh(33, 5, 4, 3, torch.float32, seed=2)
    with use_backend("triton"):
        torch.library.opcheck(torch.ops.unlearn_fast.softmax_linear_hvp, (X, W, V))


def test_triton_softmax_linear_hvp_rejects_too_many_classes():
    X, W, V = random_slh(4, 3, tk_hvp.MAX_CLASSES + 1, 1, torch.float32)
    with pytest.raises(ValueError, match="classes"):
        tk_hvp.softmax_linear_hvp(X, W, V)
