"""Triton kernels (kernels/codec.py, kernels/lbfgs.py) against the pure-torch reference.

Codes, scales and dequantized values must be bit-identical to unlearn_fast.reference; the float
results (axpy, Grams, B V, qn_step_) must agree within tests/tolerances.py. Runs compiled on a CUDA
GPU, or interpreted on CPU: `TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/triton -q`.
"""
import importlib

import pytest
import torch
import triton
import triton.language as tl

import unlearn_fast as uf
from tolerances import assert_close
from unlearn_fast import reference
from unlearn_fast import kernels as tk
from unlearn_fast.kernels import codec as tk_codec
from unlearn_fast.kernels import lbfgs as tk_lbfgs

backends_module = importlib.import_module("unlearn_fast.backends")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 255, 257, 4097, 70_001)
BLOCKSIZES = (32, 256, 4096)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("stochastic", (False, True))
def test_quantize_bit_identical_float32(n, blocksize, bits, stochastic):
    # Mixed magnitudes: block scales vary over 6 decades.
    x = _randn(n, seed=n + blocksize) * torch.logspace(-3, 3, n, device=DEVICE)
    codes, scales = tk.quantize_blockwise(x, blocksize, bits, stochastic, 1234)
    ref_codes, ref_scales = reference.quantize_blockwise(x, blocksize, bits, stochastic, 1234)
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("n", (257, 4097))
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("stochastic", (False, True))
def test_quantize_bit_identical_half_dtypes(dtype, n, bits, stochastic):
    x = _randn(n, seed=n, dtype=dtype, scale=5.0)
    got = tk.quantize_blockwise(x, 64, bits, stochastic, 99)
    want = reference.quantize_blockwise(x, 64, bits, stochastic, 99)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("seed", (0, 1, 2**31 - 1, 2**31, 2**32 + 5, -3, 2**62))
def test_stochastic_codes_follow_the_seed(seed):
    x = _randn(1000, seed=3)
    got = tk.quantize_blockwise(x, 128, 8, True, seed)
    want = reference.quantize_blockwise(x, 128, 8, True, seed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_round_half_up_on_exact_ties():
    # absmax 127 gives inv = 1 exactly, so v = x and every x = j + 0.5 is a tie: codes are floor(x + 0.5).
    ties = torch.arange(-126, 127, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), ties, torch.tensor([-127.0])]).to(DEVICE)
    codes, scales = tk.quantize_blockwise(x, 256, 8, False, 0)
    assert torch.equal(scales, torch.ones_like(scales))
    assert torch.equal(codes.to(torch.float32), torch.floor(x + 0.5))


def test_zero_blocks_give_zero_scale_and_codes():
    x = torch.zeros(300, device=DEVICE)
    x[290] = -2.5  # blocks 0..8 of 32 are zero, block 9 is not
    for bits in (4, 8):
        got = tk.quantize_blockwise(x, 32, bits, False, 0)
        want = reference.quantize_blockwise(x, 32, bits, False, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (got[1][:9] == 0).all() and got[1][9] > 0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy sees inf * 0
@pytest.mark.parametrize("bits", (4, 8))
def test_nan_and_inf_blocks_get_nan_scale_and_zero_codes(bits):
    x = _randn(1000, seed=5)
    x[70] = float("nan")
    x[300] = float("inf")
    x[999] = -float("inf")
    codes, scales = tk.quantize_blockwise(x, 64, bits, False, 0)
    ref_codes, ref_scales = reference.quantize_blockwise(x, 64, bits, False, 0)
    assert torch.equal(codes, ref_codes)
    bad = torch.isnan(ref_scales)
    assert bad.nonzero().flatten().tolist() == [1, 4, 15]
    assert torch.equal(torch.isnan(scales), bad) and torch.equal(scales[~bad], ref_scales[~bad])
    decoded = reference.dequantize_blockwise(codes, torch.ones_like(scales), 64, bits, 1000, torch.float32)
    assert (decoded[64:128] == 0).all()


def test_nan_input_is_rejected_by_the_op_on_this_backend():
    x = _randn(100, seed=1)
    x[7] = float("nan")
    with uf.use_backend("triton"), pytest.raises(ValueError, match="NaN or Inf"):
        uf.quantize_blockwise(x, 32, 8)


def _uniform_kernel_factory():
    @triton.jit
    def uniform_kernel(out_ptr, base, seed_mixed, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        index = base + offs.to(tl.int64)
        tl.store(out_ptr + offs, tk_codec._uniform_from_counter(seed_mixed, index), mask=offs < n)

    return uniform_kernel


@pytest.mark.parametrize("base", (0, 2**32 - 100, 2**40 + 17, 2**62 + 3))
def test_counter_hash_matches_reference_beyond_32_bit_indices(base):
    # Tensors this large cannot be allocated in a test: check the hash of 64-bit indices directly.
    out = torch.empty(256, device=DEVICE)
    _uniform_kernel_factory()[(1,)](out, base, tk_codec._seed_mixed(77), 256, BLOCK=256)
    index = base + torch.arange(256, dtype=torch.int64)
    assert torch.equal(out.cpu(), reference.uniform_from_counter(77, index))


@pytest.mark.parametrize("bits", (4, 8))
def test_round_to_nearest_error_within_half_a_step(bits):
    x = _randn(4097, seed=11, scale=3.0)
    codes, scales = tk.quantize_blockwise(x, 128, bits, False, 0)
    x_hat = tk.dequantize_blockwise(codes, scales, 128, bits, 4097, torch.float32)
    step = scales.repeat_interleave(128)[:4097]
    # float32 product x * inv adds at most a few ulp of |v| <= qmax on top of the half step.
    assert ((x - x_hat).abs() <= step * (0.5 + 1e-5)).all()


def test_stochastic_rounding_is_unbiased():
    x = _randn(2048, seed=12)
    seeds = 48
    total = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(seeds):
        codes, scales = tk.quantize_blockwise(x, 256, 4, True, seed)
        total += tk.dequantize_blockwise(codes, scales, 256, 4, x.numel(), torch.float64)
    step = scales.repeat_interleave(256).to(torch.float64)
    # Per element the error is within one step with variance <= step^2 / 4; the mean over all
    # elements and seeds of error / step has standard deviation <= 0.5 / sqrt(seeds * n).
    err = (total / seeds - x.double()) / step
    bound = 5 * 0.5 / (seeds * x.numel()) ** 0.5
    assert abs(float(err.mean())) < bound
    assert float(err.abs().max()) <= 1.0


def test_codec_at_a_million_and_three_elements():
    # The one size above 2^20 (the interpreter is slow: one case, packed 4-bit, stochastic).
    n, bits = 1_000_003, 4
    x = _randn(n, seed=13, scale=2.0)
    codes, scales = tk.quantize_blockwise(x, 4096, bits, True, 5)
    ref_codes, ref_scales = reference.quantize_blockwise(x, 4096, bits, True, 5)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert torch.equal(
        tk.dequantize_blockwise(codes, scales, 4096, bits, n, torch.float32),
        reference.dequantize_blockwise(codes, scales, 4096, bits, n, torch.float32),
    )


# ----------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("blocksize", (32, 1024))
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16))
def test_dequantize_bit_identical(n, blocksize, bits, dtype):
    # Arbitrary bytes (every code, including -128 and nibble 0), not only what quantize emits.
    g = _gen(n * bits)
    if bits == 8:
        codes = torch.randint(-128, 128, (n,), generator=g, dtype=torch.int8)
    else:
        codes = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8)
    scales = torch.rand(-(-n // blocksize), generator=g) * 10 ** torch.randint(-4, 3, (-(-n // blocksize),), generator=g)
    codes, scales = codes.to(DEVICE), scales.to(DEVICE)
    got = tk.dequantize_blockwise(codes, scales, blocksize, bits, n, dtype)
    want = reference.dequantize_blockwise(codes, scales, blocksize, bits, n, dtype)
    assert got.dtype == dtype and got.shape == (n,)
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16))
def test_dequantize_axpy_within_tolerance(n, bits, dtype):
    blocksize = 64
    x = _randn(n, seed=n + 1)
    codes, scales = reference.quantize_blockwise(x, blocksize, bits, False, 0)
    y = _randn(n, seed=n + 2, dtype=dtype)
    expected = y.clone()
    alpha = -0.37
    tk.dequantize_axpy_(y, codes, scales, alpha, blocksize, bits)
    reference.dequantize_axpy_(expected, codes, scales, alpha, blocksize, bits)
    assert_close(y, expected, dtype)


def test_dequantize_axpy_keeps_float64_alpha():
    # Triton passes Python floats as float32; float64 y must see alpha at full precision.
    x = torch.ones(64, device=DEVICE)
    codes, scales = reference.quantize_blockwise(x, 64, 8, False, 0)
    y = torch.zeros(64, dtype=torch.float64, device=DEVICE)
    alpha = 1.0 + 2.0**-40
    tk.dequantize_axpy_(y, codes, scales, alpha, 64, 8)
    assert (y == alpha).all()


# ----------------------------------------------------------------------------- L-BFGS
def _pairs(m, p, dtype, seed):
    """Curvature pairs of a positive diagonal Hessian plus noise: s'y > 0, well conditioned."""
    S = _randn(m, p, seed=seed, dtype=torch.float64)
    curvature = 0.5 + torch.rand(p, generator=_gen(seed + 1), dtype=torch.float64).to(DEVICE)
    Y = S * curvature + 0.05 * _randn(m, p, seed=seed + 2, dtype=torch.float64)
    return S.to(dtype), Y.to(dtype)


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("m", (1, 3, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_lbfgs_gram(p, m, dtype):
    S, Y = _pairs(m, p, dtype, seed=p + m)
    SS, SY = tk.lbfgs_gram(S, Y)
    want_SS, want_SY = reference.lbfgs_gram(S, Y)
    assert SS.dtype == torch.float64 and SS.shape == (m, m)
    # Products of float32 values are exact in float64: only the summation order differs.
    assert_close(SS, want_SS, torch.float64, scale=p)
    assert_close(SY, want_SY, torch.float64, scale=p)


def test_lbfgs_compact_through_the_op():
    S, Y = _pairs(4, 4097, torch.float64, seed=8)
    with uf.use_backend("triton"):
        sigma, Minv = uf.lbfgs_compact(S, Y)
    with uf.use_backend("reference"):
        want_sigma, want_Minv = uf.lbfgs_compact(S, Y)
    assert_close(sigma, want_sigma)
    assert_close(Minv, want_Minv, scale=float(want_Minv.abs().max()))


def _compact(S, Y):
    return reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)


# V of shape (p,) (k None) or (p, k); wide V only up to p = 4097 (the interpreter is slow there).
MATVEC_SHAPES = [(p, k) for p in SIZES for k in (None, 1, 5)] + [(p, 33) for p in (1, 257, 4097)]


@pytest.mark.parametrize("p,k", MATVEC_SHAPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_lbfgs_matvec(p, k, dtype):
    m = 3
    S, Y = _pairs(m, p, dtype, seed=p)
    sigma, Minv = _compact(S, Y)
    V = _randn(p, seed=p + 9, dtype=dtype) if k is None else _randn(p, k, seed=p + 9, dtype=dtype)
    got = tk.lbfgs_matvec(S, Y, sigma, Minv, V)
    want = reference.lbfgs_matvec(S, Y, sigma, Minv, V)
    assert got.shape == V.shape and got.dtype == dtype
    assert_close(got, want, dtype, scale=float(want.abs().max()))


def test_lbfgs_matvec_against_dense_B_float64():
    # Independent of reference.lbfgs_matvec: build B = sigma I - W Minv W' explicitly.
    m, p = 4, 257
    S, Y = _pairs(m, p, torch.float64, seed=21)
    sigma, Minv = _compact(S, Y)
    W = torch.cat([Y.T, sigma * S.T], 1)
    B = sigma * torch.eye(p, dtype=torch.float64, device=DEVICE) - W @ Minv @ W.T
    V = _randn(p, 6, seed=22, dtype=torch.float64)
    assert_close(tk.lbfgs_matvec(S, Y, sigma, Minv, V), B @ V, scale=float((B @ V).abs().max()))
    # B satisfies the secant equation for the newest pair: B s_m = y_m.
    assert_close(tk.lbfgs_matvec(S, Y, sigma, Minv, S[-1]), Y[-1], scale=float(Y[-1].abs().max()))


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("m", (1, 5))
def test_qn_step_plain(p, dtype, m):
    _check_qn_step(p, dtype, m, quantized=None)


@pytest.mark.parametrize("p", (1, 257, 4097, 70_001))
@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("blocksize", (32, 256))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_qn_step_quantized_pairs(p, bits, blocksize, dtype):
    _check_qn_step(p, dtype, 3, quantized=(blocksize, bits))


def _check_qn_step(p, dtype, m, quantized):
    S, Y = _pairs(m, p, torch.float32 if quantized else dtype, seed=p + m)
    sigma, Minv = _compact(S.double(), Y.double())
    S_scales = Y_scales = None
    blocksize, bits = quantized or (256, 8)
    if quantized:
        S, S_scales = uf.quantize_rows(S, blocksize, bits)
        Y, Y_scales = uf.quantize_rows(Y, blocksize, bits)
    w_ref = _randn(p, seed=1, dtype=dtype)
    w = w_ref + 0.1 * _randn(p, seed=2, dtype=dtype)
    g_ref, g_extra = _randn(p, seed=3, dtype=dtype), _randn(p, seed=4, dtype=dtype)
    scalars = (0.05, 1.25, 0.25, 1e-2)  # eta, alpha, beta, lam
    w_expected = w.clone()
    norm = tk.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *scalars, S_scales, Y_scales, blocksize, bits)
    want = reference.qn_step_(w_expected, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *scalars, S_scales, Y_scales, blocksize, bits)
    assert norm.dtype == torch.float64 and norm.dim() == 0
    assert_close(w, w_expected, dtype, scale=float(w_expected.abs().max()))
    assert_close(norm, want, dtype)


def test_reductions_with_many_programs_and_chunk_loops(monkeypatch):
    # Shrink the tiles and cap the programs so each program loops over several tiles of its chunk
    # and the elementwise passes use many programs: the layout a GPU run uses for large p.
    monkeypatch.setattr(tk_lbfgs, "MAX_REDUCE_PROGRAMS", 3)
    monkeypatch.setattr(tk_lbfgs, "REDUCE_TILE_ELEMENTS", 64)
    monkeypatch.setattr(tk_lbfgs, "UPDATE_TILE", 128)
    monkeypatch.setattr(tk_lbfgs, "MAX_K_BLOCK", 4)
    p, m = 1025, 3
    S, Y = _pairs(m, p, torch.float32, seed=31)
    for got, want in zip(tk.lbfgs_gram(S, Y), reference.lbfgs_gram(S, Y)):
        assert_close(got, want, torch.float64, scale=p)
    sigma, Minv = _compact(S.double(), Y.double())
    V = _randn(p, 9, seed=32)  # 3 blocks of 4 columns of V
    want = reference.lbfgs_matvec(S, Y, sigma, Minv, V)
    assert_close(tk.lbfgs_matvec(S, Y, sigma, Minv, V), want, scale=float(want.abs().max()))
    _check_qn_step(p, torch.float32, m, quantized=(32, 4))


# ----------------------------------------------------------------------------- the ops on this backend
def test_the_ops_dispatch_to_triton_when_forced():
    with uf.use_backend("triton"):
        for op in ("quantize_blockwise", "dequantize_blockwise", "dequantize_axpy_", "lbfgs_gram", "lbfgs_matvec", "qn_step_"):
            assert backends_module.kernel(op, DEVICE) is getattr(tk, op)


def _opcheck_cases():
    x = _randn(300, seed=41)
    codes8, scales8 = reference.quantize_blockwise(x, 64, 8, False, 0)
    codes4, scales4 = reference.quantize_blockwise(x, 32, 4, False, 0)
    S, Y = _pairs(3, 300, torch.float64, seed=42)
    sigma, Minv = _compact(S, Y)
    w = _randn(300, seed=43, dtype=torch.float64)
    vectors = [_randn(300, seed=44 + i, dtype=torch.float64) for i in range(3)]
    Sq, Sq_scales = uf.quantize_rows(S.float(), 32, 4)
    Yq, Yq_scales = uf.quantize_rows(Y.float(), 32, 4)
    ops = torch.ops.unlearn_fast
    return [
        (ops.quantize_blockwise.default, (x, 64, 8, False, 0)),
        (ops.quantize_blockwise.default, (x.to(torch.bfloat16), 32, 4, True, 7)),
        (ops.dequantize_blockwise.default, (codes8, scales8, 64, 8, 300, torch.float32)),
        (ops.dequantize_blockwise.default, (codes4, scales4, 32, 4, 300, torch.float16)),
        (ops.dequantize_axpy_.default, (torch.zeros(300, device=DEVICE), codes8, scales8, 0.5, 64, 8)),
        (ops.dequantize_axpy_.default, (torch.zeros(300, dtype=torch.float64, device=DEVICE), codes4, scales4, 2.0, 32, 4)),
        (ops.lbfgs_compact.default, (S, Y, False, 1e-3)),
        (ops.lbfgs_matvec.default, (S, Y, sigma, Minv, _randn(300, 4, seed=45, dtype=torch.float64))),
        (ops.qn_step_.default, (w, *vectors, S, Y, sigma, Minv, 0.1, 1.0, 0.5, 0.01, None, None, 256, 8)),
        (ops.qn_step_.default, (w.clone(), *vectors, Sq, Yq, sigma, Minv, 0.1, 1.0, 0.5, 0.01, Sq_scales, Yq_scales, 32, 4)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_opcheck_with_triton_forced(case):
    op, args = _opcheck_cases()[case]
    with uf.use_backend("triton"):
        torch.library.opcheck(op, args)


def test_bad_input_is_rejected_before_the_kernel():
    x = _randn(100, seed=1)
    with uf.use_backend("triton"):
        with pytest.raises(ValueError, match="blocksize"):
            uf.quantize_blockwise(x, 48, 8)
        with pytest.raises(ValueError, match="bits"):
            uf.quantize_blockwise(x, 64, 3)



# ----------------------------------------------------------------------------- one contract, overlapping memory (issue 14)
def test_codes_and_scales_must_be_flat_with_triton_forced():
    n = 1000
    x = _randn(n, seed=51)
    codes, scales = reference.quantize_blockwise(x, 64, 8, False, 0)
    want = reference.dequantize_blockwise(codes, scales, 64, 8, n, torch.float32)
    strided_codes = torch.stack([codes, codes], 1).reshape(-1)[::2]
    with uf.use_backend("triton"):
        assert torch.equal(uf.dequantize_blockwise(strided_codes, scales, 64, 8, n), want)
        y = _randn(n, seed=52)
        y0 = y.clone()
        for c, s, message in ((codes.view(2, -1), scales, "codes must be 1-D"), (codes, scales.view(1, -1), "scales must be 1-D")):
            with pytest.raises(ValueError, match=message):
                uf.dequantize_blockwise(c, s, 64, 8, n)
            with pytest.raises(ValueError, match=message):
                uf.dequantize_axpy_(y, c, s, 0.5, 64, 8)
        assert torch.equal(y, y0)


@pytest.mark.parametrize("overlap", ("full", "partial", "none"))
def test_axpy_reads_codes_sharing_memory_with_y_as_before_the_call(overlap):
    n, bs = 4096, 64
    buf = _randn(3 * n, seed=53)
    y = buf[n // 4:n // 4 + n]  # starts n bytes in: room for codes before it
    start = {"full": n, "partial": n // 2, "none": 0}[overlap]  # bytes; "partial" straddles y's start
    codes = buf.view(torch.int8)[start:start + n]
    scales = 1e-3 + 1e-2 * torch.rand(n // bs, generator=_gen(54)).to(DEVICE)
    want = y.clone()
    reference.dequantize_axpy_(want, codes.clone(), scales, 0.5, bs, 8)
    with uf.use_backend("triton"):
        uf.dequantize_axpy_(y, codes, scales, 0.5, bs, 8)
    assert_close(y, want, torch.float32, scale=float(want.abs().max()))


@pytest.mark.parametrize("overlap", ("full", "partial", "none"))
def test_qn_step_reads_inputs_sharing_memory_with_w_as_before_the_call(overlap):
    p, m = 3 * 4096 + 17, 3
    S0, Y0 = _pairs(m, p, torch.float32, seed=55)
    sigma, Minv = _compact(S0.double(), Y0.double())
    st = _randn((6 + 2 * m) * p, seed=56)
    if overlap == "full":  # w_ref and g_extra are w, and w is row 1 of S
        S = st[:m * p].view(m, p)
        w = S[1]
        w_ref = g_extra = w
        g_ref, Y = st[m * p:(m + 1) * p], st[(m + 1) * p:(2 * m + 1) * p].view(m, p)
    else:
        # w starts at element p; "partial": w_ref, g_ref and S start before w and run into it.
        at = [p, 2 * p, 3 * p, 0, 4 * p, (4 + m) * p] if overlap == "none" else [p, p // 3, p // 2 + 1, 2 * p - 7, 2 * p // 3, p + 3]
        w, w_ref, g_ref, g_extra = (st[a:a + p] for a in at[:4])
        S, Y = (st[a:a + m * p].view(m, p) for a in at[4:])
    scalars = (0.05, 1.25, 0.25, 1e-2)
    copies = [t.clone() for t in (w, w_ref, g_ref, g_extra, S, Y)]
    want_norm = reference.qn_step_(*copies, sigma, Minv, *scalars, None, None, 256, 8)
    with uf.use_backend("triton"):
        norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *scalars)
    assert_close(w, copies[0], torch.float32, scale=float(copies[0].abs().max()))
    assert_close(norm, want_norm, torch.float32)
