"""The unlearn_fast ops on CPU, for the pure-torch reference and the C++ backend.

Codes, scales and dequantized values must equal the reference bit for bit (deterministic and
stochastic rounding). Everything is also checked against independent definitions written here:
the half-step error bound, unbiasedness of stochastic rounding over many seeds, a hand-written
nibble decoder, a dense quasi-Hessian and the BFGS recursion in float64. Floating-point results
that may differ in the last bits are compared with the dtype table in tests/tolerances.py.
"""
import math

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import ops, reference
from unlearn_fast.backends import kernel
from tolerances import TOLERANCE, assert_close

BACKENDS = ("reference", "cpp")
SIZES = (1, 255, 257, 4097, 1_000_003)
BLOCKSIZES = (32, 128, 1024, 4096)
HALF_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
QMAX = {8: 127, 4: 7}
F64 = torch.float64


def thin(n, options):
    """All options below 10^5 elements, the first one at the largest size: keeps the file fast."""
    return options if n < 100_000 else options[:1]


@pytest.fixture(params=BACKENDS)
def backend(request):
    # No skip when the extension is missing: `make test` builds it, so a missing cpp backend is a failure.
    if request.param == "cpp":
        assert uf.backends()["backends"]["cpp"] == "available", uf.backends()["backends"]["cpp"]
    with uf.use_backend(request.param):
        yield request.param


def randn(n, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    # Mixed magnitudes, so blocks get different scales.
    x = torch.randn(n, generator=g) * (scale * torch.exp(torch.randn(n, generator=g)))
    return x.to(dtype)


def unpack_codes(codes, bits, numel):
    """Signed codes from the stored layout, written independently of reference.unpack_nibbles."""
    if bits == 8:
        return codes.to(torch.int64)
    values = torch.empty(2 * codes.numel(), dtype=torch.int64)
    values[0::2] = (codes & 0x0F).to(torch.int64) - 8  # element 2j: low nibble
    values[1::2] = (codes >> 4).to(torch.int64) - 8
    return values[:numel]


def dequantize_f64(codes, scales, blocksize, bits, numel):
    q = unpack_codes(codes, bits, numel).to(F64)
    return q * scales.to(F64).repeat_interleave(blocksize)[:numel]


# ----------------------------------------------------------------------------- quantize_blockwise
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", HALF_FLOATS)
@pytest.mark.parametrize("bits", (4, 8))
def test_quantize_codes_equal_reference(n, dtype, bits):
    x = randn(n, dtype, seed=n)
    for blocksize in thin(n, BLOCKSIZES):
        for stochastic in (False, True):
            expected = reference.quantize_blockwise(x, blocksize, bits, stochastic, 7)
            with uf.use_backend("cpp"):
                codes, scales = uf.quantize_blockwise(x, blocksize, bits, stochastic, 7)
            assert torch.equal(codes, expected[0]), (blocksize, stochastic)
            assert torch.equal(scales, expected[1]), (blocksize, stochastic)


@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_quantize_into_marks_exactly_the_blocks_holding_a_non_finite_value(bad):
    # the CPU encoder's absmax runs over four interleaved quarters of a block plus a tail (len % 4): a NaN or Inf in
    # any of them, in a full block or in the short last one, gives that block a NaN scale and zero codes (the
    # reference's finite mask), and the other blocks the reference's codes and scales
    from unlearn_fast import _C

    blocksize, n = 64, 3 * 64 + 39  # the last block: 39 values, quarters of 9 and a tail of 3
    for at in (0, 15, 16, 40, 63, 64 + 33, 128 + 48, 192 + 8, 192 + 35, 192 + 36, 192 + 38):
        x = randn(n, torch.float32, seed=at)
        x[at] = bad
        x[130] = 1e-30  # a tiny value beside the others changes nothing (absmax is the block's largest)
        codes_ref, scales_ref = reference.quantize_blockwise(x, blocksize, 8, False, 0)
        codes, scales = torch.empty_like(codes_ref), torch.empty_like(scales_ref)
        _C.quantize_blockwise_into_cpu(x, codes, scales, blocksize, 8)
        block = at // blocksize
        assert torch.isnan(scales[block]) and torch.isnan(scales_ref[block]), at
        assert (codes[block * blocksize : (block + 1) * blocksize] == 0).all(), at
        assert torch.equal(codes, codes_ref), at
        others = torch.arange(scales.numel()) != block
        assert torch.equal(scales[others], scales_ref[others]), at


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
def test_quantize_into_given_buffers_equals_reference(n, bits):
    # the recorder's CPU helper (not a registry op): writes the reference's codes and scales into slices of larger
    # buffers, leaves the rest alone, and refuses outputs of the wrong size or overlapping x
    from unlearn_fast import _C

    x = randn(n, torch.float32, seed=n)
    for blocksize in thin(n, BLOCKSIZES):
        codes_ref, scales_ref = reference.quantize_blockwise(x, blocksize, bits, False, 0)
        codes = torch.full((codes_ref.numel() + 6,), 5, dtype=codes_ref.dtype)
        scales = torch.full((scales_ref.numel() + 3,), -1.0)
        _C.quantize_blockwise_into_cpu(x, codes[2:-4], scales[1:-2], blocksize, bits)
        assert torch.equal(codes[2:-4], codes_ref) and torch.equal(scales[1:-2], scales_ref), blocksize
        assert (codes[:2] == 5).all() and (codes[-4:] == 5).all() and (scales[:1] == -1).all() and (scales[-2:] == -1).all()
    with pytest.raises(RuntimeError, match="codes has the wrong number"):
        _C.quantize_blockwise_into_cpu(x, codes_ref[:-1] if codes_ref.numel() > 1 else codes_ref[:0], scales_ref.clone(), 32, bits)
    buffer = torch.zeros(n)  # codes written over x's own bytes
    overlapping = buffer.view(torch.int8 if bits == 8 else torch.uint8)[: n if bits == 8 else (n + 1) // 2]
    with pytest.raises(RuntimeError, match="must not overlap x"):
        _C.quantize_blockwise_into_cpu(buffer, overlapping, torch.zeros(-(-n // 32)), 32, bits)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
def test_quantize_error_within_half_step(backend, n, bits):
    qmax = QMAX[bits]
    for dtype in thin(n, HALF_FLOATS):
        x = randn(n, dtype, seed=n + 1)
        x64 = x.to(F64)
        for blocksize in (32, 4096):
            codes, scales = uf.quantize_blockwise(x, blocksize, bits)
            nblocks = -(-n // blocksize)
            assert codes.dtype == ops.CODE_DTYPE[bits] and codes.numel() == (n if bits == 8 else (n + 1) // 2)
            assert scales.dtype == torch.float32 and scales.numel() == nblocks
            padded = torch.nn.functional.pad(x64.abs(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
            torch.testing.assert_close(scales.to(F64), padded.amax(1) / qmax, rtol=1e-6, atol=0)
            q = unpack_codes(codes, bits, n)
            assert int(q.abs().max()) <= qmax
            step = scales.to(F64).repeat_interleave(blocksize)[:n]
            error = (q.to(F64) * step - x64).abs()
            # Half a step, plus float32 rounding of x * (qmax / absmax) (|v| <= qmax).
            assert bool((error <= step * (0.5 + 1e-4)).all()), float((error / step).max())


def test_quantize_4bit_layout_and_partial_block(backend):
    x = torch.tensor([7.0, -7.0, 3.0, 0.0, -1.0])  # one block, absmax 7: scale 1, codes = x
    codes, scales = uf.quantize_blockwise(x, 32, 4)
    assert scales.tolist() == [1.0]
    # Byte j = (code[2j] + 8) | (code[2j+1] + 8) << 4; the odd tail's pad nibble holds code 0.
    assert codes.tolist() == [15 | (1 << 4), 11 | (8 << 4), 7 | (8 << 4)]
    codes8, _ = uf.quantize_blockwise(torch.arange(-127.0, 128.0), 256, 8)
    assert torch.equal(codes8, torch.arange(-127, 128, dtype=torch.int8))


def test_quantize_rounds_half_up_and_handles_zero_blocks(backend):
    x = torch.zeros(96)
    x[32:64] = torch.tensor([127.0] + [0.5, -0.5, 1.5, -1.5, 2.4] + [0.0] * 26)
    codes, scales = uf.quantize_blockwise(x, 32, 8)
    assert scales.tolist() == [0.0, 1.0, 0.0]
    assert codes[32:38].tolist() == [127, 1, 0, 2, -1, 2]  # floor(v + 0.5)
    assert not bool(codes[:32].any()) and not bool(codes[64:].any())


@pytest.mark.parametrize("stochastic", (False, True))
def test_quantize_tiny_blocks_equal_reference(stochastic):
    # absmax below ~1e-36: qmax / absmax overflows to inf, so v is +-inf (or NaN for zeros).
    x = torch.zeros(64)
    x[:4] = torch.tensor([1e-39, -5e-40, 3e-38, -1e-45])
    for bits in (4, 8):
        expected = reference.quantize_blockwise(x, 32, bits, stochastic, 1)
        with uf.use_backend("cpp"):
            codes, scales = uf.quantize_blockwise(x, 32, bits, stochastic, 1)
        assert torch.equal(codes, expected[0]) and torch.equal(scales, expected[1])


@pytest.mark.parametrize("bits", (4, 8))
def test_stochastic_rounding_is_unbiased(backend, bits):
    n, seeds = 2048, 400
    x = randn(n, seed=3)
    total = torch.zeros(n, dtype=F64)
    total_sq = torch.zeros(n, dtype=F64)
    for seed in range(seeds):
        codes, scales = uf.quantize_blockwise(x, 128, bits, stochastic=True, seed=seed)
        error = dequantize_f64(codes, scales, 128, bits, n) - x.to(F64)
        total += error
        total_sq += error**2
    step = scales.to(F64).repeat_interleave(128)[:n]  # scales do not depend on the seed
    mean = total / seeds
    # Each draw errs by less than a step, so the mean over `seeds` draws has std <= step / (2 sqrt(seeds)).
    assert bool((mean.abs() <= 5 * step / (2 * math.sqrt(seeds))).all())
    assert abs(float((mean / step).mean())) <= 5 / (2 * math.sqrt(seeds * n))
    # Round-to-nearest would pass neither bound: its error is a fixed offset of up to step / 2.
    assert float((total_sq / seeds).mean()) <= float((step**2).mean()) / 4


def test_stochastic_rounding_is_deterministic_for_a_seed(backend):
    x = randn(10_000, seed=4)
    first = uf.quantize_blockwise(x, 256, 8, stochastic=True, seed=11)
    again = uf.quantize_blockwise(x, 256, 8, stochastic=True, seed=11)
    other = uf.quantize_blockwise(x, 256, 8, stochastic=True, seed=12)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_counter_hash_known_values():
    # The documented hash, rewritten here with Python integers: any backend change to it is caught.
    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    index = torch.tensor([0, 1, 2**32 + 5, 2**40 + 3])
    seed = 123
    expected = [
        (fmix((i & 0xFFFFFFFF) ^ fmix((i >> 32) ^ ((seed * 0x9E3779B9) & 0xFFFFFFFF))) >> 8) / 2**24
        for i in index.tolist()
    ]
    assert reference.uniform_from_counter(seed, index).tolist() == expected


# ----------------------------------------------------------------------------- dequantize_blockwise
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
def test_dequantize_equals_reference_and_independent_decode(backend, n, bits):
    x = randn(n, seed=n + 2)
    for blocksize in thin(n, (32, 256, 4096)):
        codes, scales = reference.quantize_blockwise(x, blocksize, bits, False, 0)
        exact32 = dequantize_f64(codes, scales, blocksize, bits, n).to(torch.float32)  # code * scale is exact in f64
        for dtype in FLOATS:
            out = uf.dequantize_blockwise(codes, scales, blocksize, bits, n, dtype)
            assert out.dtype == dtype and out.shape == (n,)
            assert torch.equal(out, reference.dequantize_blockwise(codes, scales, blocksize, bits, n, dtype))
            assert torch.equal(out, exact32.to(dtype))


def test_cpp_large_outputs_reuse_cached_blocks_correctly():
    # Outputs of 8 MiB and more come from a cache of freed blocks (csrc/cpu/codec.cpp): a reused
    # block must hold the new result only, and releasing the cache frees exactly what it held.
    n = (1 << 21) + 3  # float32 output just over 8 MiB
    uf.release_output_cache()
    with uf.use_backend("cpp"):
        first = uf.quantize_blockwise(randn(n, seed=1), 256, 8)
        second = reference.quantize_blockwise(randn(n, seed=2), 256, 8, False, 0)
        out = uf.dequantize_blockwise(*first, 256, 8, n, torch.float32)
        out_ptr = out.data_ptr()
        del out  # its block goes back to the cache ...
        again = uf.dequantize_blockwise(*second, 256, 8, n, torch.float32)
        assert again.data_ptr() == out_ptr  # ... and serves the next output of the same size
        assert torch.equal(again, dequantize_f64(*second, 256, 8, n).to(torch.float32))
        del again
    block = ((4 * n + (2 << 20) - 1) // (2 << 20)) * (2 << 20)  # rounded up to 2 MiB
    assert uf.release_output_cache() == block
    assert uf.release_output_cache() == 0


# ----------------------------------------------------------------------------- dequantize_axpy_
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
def test_axpy_equals_reference(backend, n, bits):
    x = randn(n, seed=n + 3)
    for blocksize in thin(n, (32, 1024)):
        codes, scales = reference.quantize_blockwise(x, blocksize, bits, True, 5)
        # The op's dequantized value is the float32 product code * scale (correctly rounded).
        deq = dequantize_f64(codes, scales, blocksize, bits, n).to(torch.float32).to(F64)
        for dtype in thin(n, FLOATS):
            y0 = randn(n, dtype, seed=9)
            y = y0.clone()
            out = uf.dequantize_axpy_(y, codes, scales, -0.37, blocksize, bits)
            assert out is y
            expected = y0.clone()
            reference.dequantize_axpy_(expected, codes, scales, -0.37, blocksize, bits)
            assert torch.equal(y, expected)
            # Independent float64 check within the dtype's tolerance.
            assert_close(y, y0.to(F64) - 0.37 * deq, dtype=dtype, scale=float(deq.abs().max()) + 1)


# ----------------------------------------------------------------------------- L-BFGS
def curvature_pairs(m, p, dtype=F64, seed=0):
    """Pairs from a random SPD quadratic's gradients: s'y > 0, well conditioned."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(m, p, generator=g, dtype=F64)
    diag = 0.5 + torch.rand(p, generator=g, dtype=F64)  # Hessian diag(0.5..1.5)
    Y = S * diag + 0.01 * torch.randn(m, p, generator=g, dtype=F64)
    return S.to(dtype), Y.to(dtype)


def dense_b(S, Y, sigma, Minv):
    S, Y = S.to(F64), Y.to(F64)
    W = torch.cat([Y.T, sigma * S.T], 1)  # (p, 2m)
    return sigma * torch.eye(S.shape[1], dtype=F64) - W @ Minv @ W.T


def bfgs_recursion(S, Y, sigma):
    """B_{k+1} = B_k - B_k s s' B_k / s'B_k s + y y' / y's from B_0 = sigma I, oldest pair first."""
    S, Y = S.to(F64), Y.to(F64)
    B = float(sigma) * torch.eye(S.shape[1], dtype=F64)
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)
    return B


@pytest.mark.parametrize("dtype", (torch.float32, F64))
def test_lbfgs_gram_and_compact(backend, dtype):
    for p in SIZES:
        m = min(4, p)
        S, Y = curvature_pairs(m, p, dtype, seed=p)
        SS, SY = kernel("lbfgs_gram", "cpu")(S, Y)  # the forced backend's kernel
        S64, Y64 = S.to(F64), Y.to(F64)
        scale = float(S64.norm() * Y64.norm())
        assert_close(SS, S64 @ S64.T, dtype=F64, scale=scale)
        assert_close(SY, S64 @ Y64.T, dtype=F64, scale=scale)
        sigma, Minv = uf.lbfgs_compact(S, Y)
        ref_sigma, ref_Minv = reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)
        assert_close(sigma, ref_sigma, dtype=F64)
        assert_close(Minv, ref_Minv, dtype=F64, scale=float(ref_Minv.abs().max()))


@pytest.mark.parametrize("dtype", (torch.float32, F64))
def test_lbfgs_matvec_equals_reference(backend, dtype):
    for p in SIZES:
        m = min(3, p)
        S, Y = curvature_pairs(m, p, dtype, seed=p + 1)
        sigma, Minv = uf.lbfgs_compact(S, Y)
        for V in (randn(p, dtype, seed=1), randn(p * 3, dtype, seed=2).view(p, 3)):
            BV = uf.lbfgs_matvec(S, Y, sigma, Minv, V)
            assert BV.shape == V.shape and BV.dtype == V.dtype
            expected = reference.lbfgs_matvec(S, Y, sigma, Minv, V)
            assert_close(BV, expected, scale=float(expected.abs().max()))


def test_lbfgs_matvec_against_dense_b_and_bfgs_recursion(backend):
    p, m = 40, 5
    S, Y = curvature_pairs(m, p, seed=7)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    B = dense_b(S, Y, sigma, Minv)
    B_recursion = bfgs_recursion(S, Y, sigma)
    assert_close(B, B_recursion, dtype=F64, scale=10.0)
    V = randn(p * 4, F64, seed=5).view(p, 4)
    assert_close(uf.lbfgs_matvec(S, Y, sigma, Minv, V), B_recursion @ V, dtype=F64, scale=10.0)
    assert_close(uf.lbfgs_matvec(S, Y, sigma, Minv, V[:, 0]), B_recursion @ V[:, 0], dtype=F64, scale=10.0)
    # Secant equation of the newest pair; sigma is its s'y / s's.
    assert_close(uf.lbfgs_matvec(S, Y, sigma, Minv, S[-1]), Y[-1], dtype=F64, scale=10.0)
    assert_close(sigma, (S[-1] @ Y[-1]) / (S[-1] @ S[-1]), dtype=F64)


def test_lbfgs_skip_bad_pairs(backend):
    p = 300
    S, Y = curvature_pairs(4, p, seed=8)
    Y[1] = -Y[1]  # s'y < 0
    with pytest.raises(ValueError, match=r"pairs \[1\].*skip_bad_pairs"):
        uf.lbfgs_compact(S, Y)
    sigma, Minv = uf.lbfgs_compact(S, Y, skip_bad_pairs=True)
    keep = torch.tensor([0, 2, 3])
    sigma_kept, Minv_kept = uf.lbfgs_compact(S[keep], Y[keep])
    assert_close(sigma, sigma_kept, dtype=F64)
    V = randn(p, F64, seed=3)
    assert_close(
        uf.lbfgs_matvec(S, Y, sigma, Minv, V),
        bfgs_recursion(S[keep], Y[keep], sigma_kept) @ V,
        dtype=F64,
        scale=10.0,
    )
    Y[:] = -Y.abs() * S.sign()
    with pytest.raises(ValueError, match="no pair"):
        uf.lbfgs_compact(S, Y, skip_bad_pairs=True)


# ----------------------------------------------------------------------------- qn_step_
def qn_inputs(p, m, dtype, seed=0):
    S, Y = curvature_pairs(m, p, dtype, seed=seed)
    w = randn(p, dtype, seed=seed + 1)
    w_ref = (w.to(F64) + 0.1 * randn(p, F64, seed=seed + 2)).to(dtype)
    g_ref, g_extra = randn(p, dtype, seed=seed + 3), randn(p, dtype, seed=seed + 4)
    return w, w_ref, g_ref, g_extra, S, Y


COEFFS = dict(eta=0.05, alpha=1.3, beta=0.3, lam=1e-2)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", (torch.float32, F64))
def test_qn_step_equals_reference(backend, n, dtype):
    m = min(3, n)
    w0, w_ref, g_ref, g_extra, S, Y = qn_inputs(n, m, dtype, seed=n)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    w = w0.clone()
    norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, **COEFFS)
    expected_w = w0.clone()
    expected_norm = reference.qn_step_(expected_w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *COEFFS.values(), None, None, 256, 8)
    assert norm.dtype == F64 and norm.dim() == 0
    assert_close(w, expected_w, scale=float(expected_w.abs().max()))
    assert_close(norm, expected_norm, dtype=dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
def test_qn_step_quantized_pairs_equals_reference(backend, n, bits):
    m = min(3, n) if n < 100_000 else 2
    for dtype, blocksize in thin(n, ((torch.float32, 64), (F64, 4096))):
        w0, w_ref, g_ref, g_extra, S, Y = qn_inputs(n, m, dtype, seed=n + 5)
        S_codes, S_scales = uf.quantize_rows(S.float(), blocksize, bits)
        Y_codes, Y_scales = uf.quantize_rows(Y.float(), blocksize, bits)
        S_hat = reference.dequantize_rows(S_codes, S_scales, blocksize, bits, n)
        Y_hat = reference.dequantize_rows(Y_codes, Y_scales, blocksize, bits, n)
        sigma, Minv = uf.lbfgs_compact(S_hat, Y_hat, skip_bad_pairs=True)
        w = w0.clone()
        norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S_codes, Y_codes, sigma, Minv, **COEFFS,
                           S_scales=S_scales, Y_scales=Y_scales, blocksize=blocksize, bits=bits)
        # The same step with the dequantized pairs given densely.
        expected_w = w0.clone()
        expected_norm = reference.qn_step_(expected_w, w_ref, g_ref, g_extra, S_hat.to(dtype), Y_hat.to(dtype),
                                           sigma, Minv, *COEFFS.values(), None, None, 256, 8)
        assert_close(w, expected_w, scale=float(expected_w.abs().max()))
        assert_close(norm, expected_norm, dtype=dtype)


def test_qn_step_against_dense_formula(backend):
    p, m = 50, 4
    w0, w_ref, g_ref, g_extra, S, Y = qn_inputs(p, m, F64, seed=21)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    B = bfgs_recursion(S, Y, sigma)
    eta, alpha, beta, lam = COEFFS.values()
    g = alpha * (B @ (w0 - w_ref) + g_ref + lam * w_ref) - beta * (g_extra + lam * w0)
    w = w0.clone()
    norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam)
    assert_close(w, w0 - eta * g, dtype=F64, scale=10.0)
    assert_close(norm, torch.linalg.vector_norm(eta * g), dtype=F64)


# ----------------------------------------------------------------------------- opcheck and compile
def op_samples():
    x = randn(1000, seed=1)
    codes, scales = reference.quantize_blockwise(x, 64, 8, False, 0)
    codes4, scales4 = reference.quantize_blockwise(x, 64, 4, False, 0)
    w, w_ref, g_ref, g_extra, S, Y = qn_inputs(1000, 3, torch.float32, seed=2)
    sigma, Minv = reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)
    Sc, Ss = uf.quantize_rows(S, 128, 4)
    Yc, Ys = uf.quantize_rows(Y, 128, 4)
    return [
        ("quantize_blockwise", (x, 64, 8, False, 0)),
        ("quantize_blockwise", (x.to(torch.bfloat16), 128, 4, True, 3)),
        ("dequantize_blockwise", (codes, scales, 64, 8, 1000, torch.float32)),
        ("dequantize_blockwise", (codes4, scales4, 64, 4, 1000, torch.float16)),
        ("dequantize_axpy_", (randn(1000, seed=5), codes, scales, 0.5, 64, 8)),
        ("lbfgs_compact", (S, Y, False, 1e-3)),
        ("lbfgs_matvec", (S, Y, sigma, Minv, randn(1000 * 2, seed=6).view(1000, 2))),
        ("qn_step_", (w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, 0.1, 1.0, 0.2, 0.01)),
        ("qn_step_", (w, w_ref, g_ref, g_extra, Sc, Yc, sigma, Minv, 0.1, 1.0, 0.2, 0.01, Ss, Ys, 128, 4)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(backend, index):
    name, args = op_samples()[index]
    torch.library.opcheck(getattr(torch.ops.unlearn_fast, name).default, args)


def _requiring_grad(args):
    return tuple(a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.dtype.is_floating_point else a
                 for a in args)


@pytest.mark.parametrize("index", range(9))
def test_ops_refuse_to_differentiate(backend, index):
    """No op has a derivative: backward through a functional op raises, and the in-place ops refuse
    tensors that require grad, rather than leaving gradients silently wrong."""
    name, args = op_samples()[index]
    op = getattr(torch.ops.unlearn_fast, name)
    if name.endswith("_"):
        with pytest.raises(ValueError, match="requires grad, and this in-place op has no derivative"):
            op(*_requiring_grad(args))
        with torch.no_grad():
            op(*_requiring_grad(args))  # without grad mode they are plain tensors
        return
    out = op(*_requiring_grad(args))
    floats = [t for t in (out if isinstance(out, tuple) else (out,)) if t.dtype.is_floating_point]
    with pytest.raises(RuntimeError, match=f"unlearn_fast::{name} has no derivative"):
        sum(t.sum() for t in floats).backward()


def test_softmax_linear_hvp_refuses_to_differentiate(backend):
    g = torch.Generator().manual_seed(0)
    X, W, V = torch.randn(50, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = torch.ops.unlearn_fast.softmax_linear_hvp(*_requiring_grad((X, W, V)))
    with pytest.raises(RuntimeError, match="softmax_linear_hvp has no derivative"):
        out.sum().backward()


def test_ops_under_torch_compile_fullgraph(backend):
    def replay(x, y, S, Y, V, w, w_ref, g_ref, g_extra):
        codes, scales = torch.ops.unlearn_fast.quantize_blockwise(x * 2.0, 128, 8, True, 1)
        x_hat = torch.ops.unlearn_fast.dequantize_blockwise(codes, scales, 128, 8, x.numel(), torch.float32)
        y = y.clone()
        torch.ops.unlearn_fast.dequantize_axpy_(y, codes, scales, 0.5, 128, 8)
        sigma, Minv = torch.ops.unlearn_fast.lbfgs_compact(S, Y)
        BV = torch.ops.unlearn_fast.lbfgs_matvec(S, Y, sigma, Minv, V)
        w = w.clone()
        norm = torch.ops.unlearn_fast.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, 0.1, 1.0, 0.2, 0.01)
        return x_hat + 1.0, y, BV * 2.0, w, norm

    w, w_ref, g_ref, g_extra, S, Y = qn_inputs(3000, 3, torch.float32, seed=4)
    args = (randn(3000, seed=1), randn(3000, seed=2), S, Y, randn(3000, seed=3), w, w_ref, g_ref, g_extra)
    torch._dynamo.reset()
    compiled = torch.compile(replay, fullgraph=True)
    for actual, expected in zip(compiled(*args), replay(*args)):
        assert_close(actual, expected, scale=float(expected.abs().max()))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_quantize(backend):
    x = randn(100)
    cases = [
        (dict(x=x.to(torch.int32)), "x must be float32"),
        (dict(x=x.to(F64)), "x must be float32"),
        (dict(x=torch.empty(0)), "x is empty"),
        (dict(x=x, blocksize=48), "blocksize must be a power of two"),
        (dict(x=x, blocksize=16), "blocksize"),
        (dict(x=x, blocksize=8192), "blocksize"),
        (dict(x=x, bits=3), "bits must be 4 or 8"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            uf.quantize_blockwise(**kwargs)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x_bad = x.clone()
        x_bad[70] = bad
        with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first in block 1, elements 64\.\.99\)"):
            uf.quantize_blockwise(x_bad, 64, 8)


def test_non_contiguous_inputs_are_handled(backend):
    x = randn(2000, seed=1)
    strided = x[::2]
    assert not strided.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(uf.quantize_blockwise(strided, 64), uf.quantize_blockwise(strided.clone(), 64)))
    S, Y = curvature_pairs(3, 1000, torch.float32)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    V = randn(2000, seed=2).view(1000, 2)
    assert torch.equal(uf.lbfgs_matvec(S, Y, sigma, Minv, V[:, 0]), uf.lbfgs_matvec(S, Y, sigma, Minv, V[:, 0].clone()))
    # In-place outputs must be contiguous: said plainly rather than silently copied.
    codes, scales = uf.quantize_blockwise(x[:1000], 64)
    with pytest.raises(ValueError, match="y must be contiguous"):
        uf.dequantize_axpy_(x[::2], codes, scales, 1.0, 64, 8)


def test_bad_input_dequantize_and_axpy(backend):
    x = randn(1000)
    codes, scales = uf.quantize_blockwise(x, 64, 8)
    dq = uf.dequantize_blockwise
    cases = [
        (lambda: dq(codes.to(torch.uint8), scales, 64, 8, 1000), "codes must be torch.int8"),
        (lambda: dq(codes, scales.to(F64), 64, 8, 1000), "scales must be float32"),
        (lambda: dq(codes, scales, 64, 8, 999), "codes has 1000 elements"),
        (lambda: dq(codes[:999], scales[:15], 64, 4, 1000), "codes must be torch.uint8"),
        (lambda: dq(codes, scales[:10], 64, 8, 1000), "scales has 10 elements"),
        (lambda: dq(codes, scales, 64, 8, 0), "numel must be positive"),
        (lambda: dq(codes, scales, 64, 8, 1000, torch.int32), "dtype must be one of"),
        (lambda: dq(codes, scales, 96, 8, 1000), "blocksize"),
        (lambda: dq(codes, scales, 64, 2, 1000), "bits"),
        (lambda: dq(codes, scales.to("meta"), 64, 8, 1000), "scales is on meta"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    y = randn(1000, seed=2)
    y0 = y.clone()
    axpy_cases = [
        (lambda: uf.dequantize_axpy_(y.to(torch.int32), codes, scales, 1.0, 64, 8), "y must be one of"),
        (lambda: uf.dequantize_axpy_(torch.empty(0), codes, scales, 1.0, 64, 8), "y is empty"),
        (lambda: uf.dequantize_axpy_(y, codes[:999], scales, 1.0, 64, 8), "codes has 999 elements"),
        (lambda: uf.dequantize_axpy_(y, codes, scales[:3], 1.0, 64, 8), "scales has 3 elements"),
        (lambda: uf.dequantize_axpy_(y, codes, scales, 1.0, 128, 8), "scales has 16 elements"),
        (lambda: uf.dequantize_axpy_(y, codes, scales, 1.0, 64, 4), "codes must be torch.uint8"),
        (lambda: uf.dequantize_axpy_(y, codes.to("meta"), scales, 1.0, 64, 8), "codes is on meta"),
    ]
    for call, message in axpy_cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert torch.equal(y, y0)


def test_bad_input_lbfgs(backend):
    S, Y = curvature_pairs(3, 100)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    V = randn(100, F64)
    cases = [
        (lambda: uf.lbfgs_compact(S[0], Y[0]), r"S must be \(m, p\)"),
        (lambda: uf.lbfgs_compact(S, Y[:2]), "Y shape"),
        (lambda: uf.lbfgs_compact(S.to(torch.int64), Y.to(torch.int64)), "S must be float32 or float64"),
        (lambda: uf.lbfgs_compact(S, Y.float()), "Y dtype"),
        (lambda: uf.lbfgs_compact(S[:0], Y[:0]), "at least one curvature pair"),
        (lambda: uf.lbfgs_compact(S, Y.to("meta")), "Y is on meta"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, V[:99]), "V has 99 rows"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, V.view(1, 100, 1)), "V must be"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, V.to(torch.int64)), "V must be float32 or float64"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma.float(), Minv, V), "sigma must be"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma, Minv[:4, :4], V), "Minv must be"),
        (lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, torch.empty(0, dtype=F64)), "V has 0 rows"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_bad_input_qn_step_leaves_w_unchanged(backend):
    p = 300
    w, w_ref, g_ref, g_extra, S, Y = qn_inputs(p, 3, torch.float32)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    Sc, Ss = uf.quantize_rows(S, 64, 8)
    Yc, Ys = uf.quantize_rows(Y, 64, 8)
    w0 = w.clone()
    c = tuple(COEFFS.values())

    def step(**changes):
        args = dict(w=w, w_ref=w_ref, g_ref=g_ref, g_extra=g_extra, S=S, Y=Y, sigma=sigma, Minv=Minv)
        extra = {k: v for k, v in changes.items() if k not in args}  # S_scales, Y_scales, blocksize, bits
        args.update({k: v for k, v in changes.items() if k in args})
        return lambda: uf.qn_step_(*args.values(), *c, **extra)

    quantized = dict(S=Sc, Y=Yc, S_scales=Ss, Y_scales=Ys, blocksize=64, bits=8)
    cases = [
        (step(w_ref=w_ref[:-1]), "w_ref shape"),
        (step(g_ref=g_ref.double()), "g_ref dtype"),
        (step(g_extra=g_extra.to("meta")), "g_extra is on meta"),
        (step(S=S.double(), Y=Y.double()), "S dtype"),
        (step(S=S[:, :-1], Y=Y[:, :-1]), "S has 299 columns"),
        (step(Y=Y[:2]), "Y shape"),
        (step(Minv=Minv[:2]), "Minv must be"),
        (step(w=torch.empty(0)), "w must be a non-empty"),
        (step(w=w.to(torch.float16)), "w must be float32 or float64"),
        (lambda: uf.qn_step_(torch.randn(600)[::2], w_ref, g_ref, g_extra, S, Y, sigma, Minv, *c), "w must be contiguous"),
        (step(**{**quantized, "Y_scales": None}), "give both S_scales and Y_scales"),
        (step(**{**quantized, "bits": 5}), "bits must be 4 or 8"),
        (step(**{**quantized, "blocksize": 100}), "blocksize must be a power of two"),
        (step(**{**quantized, "bits": 4}), "quantized S must be torch.uint8"),
        (step(**{**quantized, "S_scales": Ss[:, :2]}), "S_scales must be float32 of shape"),
        (step(**{**quantized, "Y": Yc[:, :-1], "S": Sc[:, :-1]}), "quantized S rows hold 299 bytes"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
        assert torch.equal(w, w0)


def test_cpp_kernels_reject_bad_input_without_crashing():
    from unlearn_fast import _C  # direct calls bypass ops.py's checks
    x = randn(100)
    codes, scales = reference.quantize_blockwise(x, 64, 8, False, 0)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        _C.quantize_blockwise_cpu(x, 64, 3, False, 0)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        _C.quantize_blockwise_cpu(torch.randn(200)[::2], 64, 8, False, 0)
    with pytest.raises(RuntimeError, match="codes has the wrong number"):
        _C.dequantize_blockwise_cpu(codes[:50], scales, 64, 8, 100, torch.float32)
    with pytest.raises(RuntimeError, match="S and Y must be"):
        _C.lbfgs_gram_cpu(torch.randn(2, 5), torch.randn(2, 6))
    S, Y = curvature_pairs(2, 10)
    sigma, Minv = reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)
    with pytest.raises(RuntimeError, match="Minv must be"):
        _C.lbfgs_matvec_cpu(S, Y, sigma, Minv[:2, :2].contiguous(), torch.randn(10, dtype=F64))


# ----------------------------------------------------------------------------- one contract for every backend (issue 14)
def test_codes_and_scales_must_be_flat_on_every_backend(backend):
    # Flat codes/scales, as quantize_blockwise returns them, are the only accepted layout; the checks
    # live in ops.py, so a backend that reads raw memory cannot accept what the reference refuses.
    n = 1000
    x = randn(n, seed=11)
    for bits in (8, 4):
        codes, scales = reference.quantize_blockwise(x, 64, bits, False, 0)
        expected = reference.dequantize_blockwise(codes, scales, 64, bits, n, torch.float32)
        # Accepted: flat, contiguous or strided (a strided stream is copied before the kernel).
        strided_codes = torch.stack([codes, codes], 1).reshape(-1)[::2]
        strided_scales = torch.stack([scales, scales], 1).reshape(-1)[::2]
        assert not strided_codes.is_contiguous() and not strided_scales.is_contiguous()
        for c, s in ((codes, scales), (strided_codes, strided_scales)):
            assert torch.equal(uf.dequantize_blockwise(c, s, 64, bits, n), expected)
            y = randn(n, seed=12)
            y_expected = y.clone()
            reference.dequantize_axpy_(y_expected, codes, scales, 0.5, 64, bits)
            assert torch.equal(uf.dequantize_axpy_(y, c, s, 0.5, 64, bits), y_expected)
        # Refused, naming the argument, before anything is written.
        y = randn(n, seed=13)
        y0 = y.clone()
        half = codes.numel() // 2
        refused = [
            (codes.view(2, half), scales, "codes must be 1-D"),
            (codes.view(1, -1), scales, "codes must be 1-D"),
            (codes, scales.view(-1, 1), "scales must be 1-D"),
            (codes, scales.view(1, -1), "scales must be 1-D"),
        ]
        for c, s, message in refused:
            with pytest.raises(ValueError, match=message):
                uf.dequantize_blockwise(c, s, 64, bits, n)
            with pytest.raises(ValueError, match=message):
                uf.dequantize_axpy_(y, c, s, 0.5, 64, bits)
            assert torch.equal(y, y0)


# ----------------------------------------------------------------------------- in-place ops and overlapping inputs
# The in-place ops are defined as the reference run on copies of the inputs: every input is read as
# it was before the call, whatever memory it shares with the output (ops.py copies such inputs).
OVERLAPS = ("full", "partial", "none")


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("bits", (8, 4))
@pytest.mark.parametrize("ydtype", (torch.float32, torch.float16))
def test_axpy_with_inputs_sharing_memory_with_y(backend, overlap, bits, ydtype):
    n, bs = 4096, 64
    nb = n // bs
    code_dtype, nbytes = (torch.int8, n) if bits == 8 else (torch.uint8, n // 2)
    buf = randn(4 * n, seed=21).to(ydtype)  # one storage holding y, the codes and the scales
    item = buf.element_size()
    y_at = nbytes  # bytes; room for codes before y
    y = buf[y_at // item:y_at // item + n]
    y_bytes = n * item
    # Codes: y's own first bytes ("full"), straddling y's start so that the blocks written first are
    # read last ("partial"), or right before y ("none").
    start = {"full": y_at, "partial": y_at - nbytes // 2, "none": 0}[overlap]
    codes = buf.view(code_dtype)[start:start + nbytes]
    floats = buf.view(torch.float32)
    if ydtype == torch.float32 and overlap != "none":
        first = (y_at + y_bytes) // 4 - nb // 2  # scales straddle y's end: half of them are y's own values
    else:  # float16 bits make no sane float32 scales: scales after y, same storage
        first = (y_at + y_bytes) // 4
        floats[first:first + nb] = 1e-3 + 1e-2 * torch.rand(nb, generator=torch.Generator().manual_seed(3))
    scales = floats[first:first + nb]
    raw = buf.view(torch.int8)
    y_expected, before = y.clone(), raw.clone()
    reference.dequantize_axpy_(y_expected, codes.clone(), scales.clone(), 0.5, bs, bits)
    uf.dequantize_axpy_(y, codes, scales, 0.5, bs, bits)
    assert torch.equal(y, y_expected), f"{int((y != y_expected).sum())} of {n} elements differ"
    # Nothing outside y was written (compared as bytes: scales may read as NaN in float16).
    assert torch.equal(raw[:y_at], before[:y_at]) and torch.equal(raw[y_at + y_bytes:], before[y_at + y_bytes:])


def qn_views(st, p, m, overlap, quantized):
    """w, w_ref, g_ref, g_extra, S, Y as views into the one flat storage `st`; w starts at element p.

    none: disjoint, adjacent views. partial: w_ref, g_ref and S start before w and run into it (so
    they lag the tiles written), g_extra and Y start inside w. full: w_ref and g_extra are w itself
    and w is row 1 of S. Quantized S, Y are int8 views of the same bytes: inside w's bytes (full),
    straddling w's start (partial), or after every other view (none).
    """
    if overlap == "full":
        S = st[:m * p].view(m, p)
        w = S[1]
        w_ref = g_extra = w
        g_ref = st[m * p:(m + 1) * p]
        Y = st[(m + 1) * p:(2 * m + 1) * p].view(m, p)
    else:
        at = [p, 2 * p, 3 * p, 0, 4 * p, (4 + m) * p] if overlap == "none" else [p, p // 3, p // 2 + 1, 2 * p - 7, 2 * p // 3, p + 3]
        w, w_ref, g_ref, g_extra = (st[a:a + p] for a in at[:4])
        S, Y = (st[a:a + m * p].view(m, p) for a in at[4:])
    if quantized:
        item = st.element_size()
        start = {"full": p * item, "partial": p * item - m * p // 2, "none": (4 + 2 * m) * p * item}[overlap]
        raw = st.view(torch.int8)
        S = raw[start:start + m * p].view(m, p)
        Y = raw[start + m * p:start + 2 * m * p].view(m, p)
    return w, w_ref, g_ref, g_extra, S, Y


@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("quantized", (False, True), ids=("dense", "int8"))
def test_qn_step_with_inputs_sharing_memory_with_w(backend, overlap, dtype, quantized):
    p, m, bs = 3 * 4096 + 17, 3, 64  # several of the C++ kernel's 4096-element tiles
    sigma, Minv = uf.lbfgs_compact(*curvature_pairs(m, p, dtype, seed=5))
    st = randn((6 + 2 * m) * p, F64, seed=6).to(dtype)
    w, w_ref, g_ref, g_extra, S, Y = qn_views(st, p, m, overlap, quantized)
    scales = {}
    if quantized:
        gen = torch.Generator().manual_seed(7)
        scales = dict(S_scales=1e-3 + 1e-2 * torch.rand(m, -(-p // bs), generator=gen),
                      Y_scales=1e-3 + 1e-2 * torch.rand(m, -(-p // bs), generator=gen), blocksize=bs, bits=8)
    copies = [t.clone() for t in (w, w_ref, g_ref, g_extra, S, Y)]
    expected_norm = reference.qn_step_(*copies, sigma, Minv, *COEFFS.values(), scales.get("S_scales"),
                                       scales.get("Y_scales"), bs, 8)
    raw = st.view(torch.int8)
    w_at = w.data_ptr() - st.data_ptr()
    w_end = w_at + w.numel() * w.element_size()
    before = raw.clone()
    norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, **COEFFS, **scales)
    assert_close(w, copies[0], scale=float(copies[0].abs().max()))
    assert_close(norm, expected_norm, dtype=dtype)
    assert torch.equal(raw[:w_at], before[:w_at]) and torch.equal(raw[w_end:], before[w_end:])  # only w was written


def test_overlap_detection_copies_only_what_shares_memory():
    buf = torch.zeros(100)
    y = buf[10:20]
    assert ops._overlaps(y, buf[19:30]) and ops._overlaps(y, buf[:11]) and ops._overlaps(y, buf)
    assert not ops._overlaps(y, buf[20:30]) and not ops._overlaps(y, buf[:10]) and not ops._overlaps(y, torch.zeros(10))
    assert ops._overlaps(y, buf.view(torch.int8)[79:90]) and not ops._overlaps(y, buf.view(torch.int8)[80:90])
    assert not ops._overlaps(y, buf[:0])
    assert ops._unaliased(y, buf[20:30]).data_ptr() == buf[20:].data_ptr()  # disjoint: no copy


# ----------------------------------------------------------------------------- threads (issue 14)
def test_cpu_kernels_run_on_torch_threads():
    # The kernels must use the threads torch.set_num_threads gives them (they ran serially when the
    # extension was compiled without OpenMP). Counted, not timed.
    from unlearn_fast import _C
    assert _C.parallel_runtime() == "openmp"
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert _C.threads_used(64) == threads
            assert _C.threads_used(1) == 1
            assert _C.threads_used(64, grain=32) == min(threads, 2)
    finally:
        torch.set_num_threads(before)


def test_cpp_results_do_not_depend_on_the_thread_count():
    # Work is split into fixed chunks and reductions are summed in chunk order, so 1 and 3 threads
    # give the same bits (p spans many 32k-element chunks, split unevenly between threads).
    p, m = 300_007, 4
    w0, w_ref, g_ref, g_extra, S, Y = qn_inputs(p, m, torch.float32, seed=9)
    x = randn(p, seed=10)
    V = randn(2 * p, seed=11).view(p, 2)

    def run_all():
        with uf.use_backend("cpp"):
            codes, scales = uf.quantize_blockwise(x, 256, 8, True, 3)
            deq = uf.dequantize_blockwise(codes, scales, 256, 8, p)
            y = uf.dequantize_axpy_(x.clone(), codes, scales, 0.5, 256, 8)
            sigma, Minv = uf.lbfgs_compact(S, Y)
            BV = uf.lbfgs_matvec(S, Y, sigma, Minv, V)
            w = w0.clone()
            norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, **COEFFS)
            Sc, Ss = uf.quantize_rows(S, 256, 4)
            Yc, Ys = uf.quantize_rows(Y, 256, 4)
            wq = w0.clone()
            normq = uf.qn_step_(wq, w_ref, g_ref, g_extra, Sc, Yc, sigma, Minv, **COEFFS, S_scales=Ss, Y_scales=Ys,
                                blocksize=256, bits=4)
        return codes, scales, deq, y, sigma, Minv, BV, w, norm, wq, normq

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all()
        torch.set_num_threads(3)
        three = run_all()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, three):
        assert torch.equal(a, b)
