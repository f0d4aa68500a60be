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
