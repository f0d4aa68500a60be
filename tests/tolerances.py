"""dtype -> (rtol, atol) for comparing a backend with the pure-torch reference (float64 math there)."""
import torch

TOLERANCE = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-3),
    torch.float16: (2e-3, 1e-4),
}


def assert_close(actual, expected, dtype=None, scale=1.0):
    """Compare with the tolerance of `dtype` (default: actual's), atol scaled by `scale` (e.g. |expected|max)."""
    rtol, atol = TOLERANCE[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol, atol=atol * scale)


def sum_magnitude(X, W, V):
    """max over outputs of sum_i |r_ia| |x_id| / n: the scale of the rounding error of the cancelling sums."""
    X, W, V = X.double(), W.double(), V.double()
    P = torch.softmax(X @ W.T, dim=1)
    Z = torch.einsum("nd,kcd->knc", X, V)
    R = P * Z - P * (P * Z).sum(-1, keepdim=True)
    return float((torch.einsum("knc,nd->kcd", R.abs(), X.abs()) / X.shape[0]).max())
