"""CUDA kernels (unlearn_fast._C "<op>_cuda") against the pure-torch reference.

Expected values are always computed by unlearn_fast.reference on CPU copies of the inputs: the
reference on CPU is the definition (on CUDA, torch rewrites some divisions as reciprocal products).
Codes, scales and dequantized values must match bit for bit; float results within tests/tolerances.py.
On a machine with a GPU the CUDA backend must be built: a missing one fails, it is not skipped.
"""
import importlib

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import reference
from tolerances import TOLERANCE, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# The module itself: the package attribute `backends` is the report function of the same name.
backends = importlib.import_module("unlearn_fast.backends")

SIZES = [1, 255, 257, 4097, 1_000_003]
CODEC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OUT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA = "cuda"


@pytest.fixture(autouse=True)
def cuda_backend():
    reason = backends._load("cuda")[2]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend is not: {reason}")
    with uf.use_backend("cuda"):
        yield


def _kernel(op):
    return backends.kernel(op, "cuda")


def _random(n, dtype, seed, offset=0):
    """n values on the GPU, optionally starting `offset` elements into a buffer (an unaligned view)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n + offset, generator=gen) * torch.exp(torch.randn(n + offset, generator=gen))
    return base.to(dtype).to(CUDA)[offset:]


def _ref_quantize(x, blocksize, bits, stochastic=False, seed=0):
    return reference.quantize_blockwise(x.cpu(), blocksize, bits, stochastic, seed)


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", CODEC_DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_quantize_matches_reference(n, dtype, bits, blocksize):
    x = _random(n, dtype, seed=n + bits)
    codes, scales = uf.quantize_blockwise(x, blocksize, bits)
    ref_codes, ref_scales = _ref_quantize(x, blocksize, bits)
    assert codes.device.type == CUDA
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("n", [257, 4097, 1_000_003])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", [0, 7, -3, 2**40 + 5])
def test_stochastic_codes_match_reference(n, bits, seed):
    x = _random(n, torch.float32, seed=n)
    codes, scales = uf.quantize_blockwise(x, 128, bits, stochastic=True, seed=seed)
    ref_codes, ref_scales = _ref_quantize(x, 128, bits, stochastic=True, seed=seed)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("offset", [1, 2, 3])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", CODEC_DTYPES)
def test_quantize_unaligned_input(offset, bits, dtype):
    # A view that starts mid-vector takes the scalar-access path of the kernel.
    x = _random(4097, dtype, seed=offset, offset=offset)
    assert x.data_ptr() % 16 != 0
    codes, scales = uf.quantize_blockwise(x, 64, bits)
    ref_codes, ref_scales = _ref_quantize(x, 64, bits)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("bits", [4, 8])
def test_round_to_nearest_error_at_most_half_step(bits):
    x = _random(1_000_003, torch.float32, seed=11)
    codes, scales = uf.quantize_blockwise(x, 256, bits)
    xhat = uf.dequantize_blockwise(codes, scales, 256, bits, x.numel())
    step = scales.repeat_interleave(256)[: x.numel()]
    # Half a step, plus float32 rounding (a few ulps of |v| <= 127 steps) in scale, inv, x * inv, code * scale.
    assert bool(((xhat - x).abs() <= step * (0.5 + 1e-4)).all())


def test_zero_block_and_extremes():
    x = torch.zeros(1000, device=CUDA)
    x[300:310] = torch.tensor([3.0e38, -3.0e38, 1e-30, -1e-30, 0.0, 1.0, -1.0, 5e-45, 2.0, -7.0], device=CUDA)
    for bits in (4, 8):
        codes, scales = uf.quantize_blockwise(x, 32, bits)
        ref_codes, ref_scales = _ref_quantize(x, 32, bits)
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("stochastic", [False, True])
def test_tiny_absmax_blocks_match_reference(stochastic):
    # absmax below ~1e-36: qmax / absmax overflows to inf; zeros then give NaN, which must become code 0.
    x = torch.zeros(64)
    x[:4] = torch.tensor([1e-39, -5e-40, 3e-38, -1e-45])
    for bits in (4, 8):
        codes, scales = uf.quantize_blockwise(x.to(CUDA), 32, bits, stochastic, 1)
        ref_codes, ref_scales = reference.quantize_blockwise(x, 32, bits, stochastic, 1)
        assert torch.equal(codes.cpu(), ref_codes) and torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises_naming_x(bad):
    x = _random(1000, torch.float32, seed=1)
    x[517] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf .*block 2"):
        uf.quantize_blockwise(x, 256, 8)
    # The kernel itself marks exactly that block: NaN scale, codes 0.
    codes, scales = _kernel("quantize_blockwise")(x, 256, 8, False, 0)
    assert torch.isnan(scales[2]) and bool(torch.isfinite(scales[[0, 1, 3]]).all())
    assert bool((codes[512:768] == 0).all())


# ----------------------------------------------------------------------------- dequantize, axpy
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_dequantize_matches_reference(n, bits, dtype):
    codes, scales = _ref_quantize(_random(n, torch.float32, seed=n), 64, bits)
    out = uf.dequantize_blockwise(codes.to(CUDA), scales.to(CUDA), 64, bits, n, dtype)
    assert out.dtype == dtype and out.shape == (n,)
    assert torch.equal(out.cpu(), reference.dequantize_blockwise(codes, scales, 64, bits, n, dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_axpy_matches_reference(n, bits, dtype):
    codes, scales = _ref_quantize(_random(n, torch.float32, seed=n + 1), 128, bits)
    y = _random(n, dtype, seed=n + 2)
    expected = y.cpu().clone()
    reference.dequantize_axpy_(expected, codes, scales, -0.37, 128, bits)
    result = uf.dequantize_axpy_(y, codes.to(CUDA), scales.to(CUDA), -0.37, 128, bits)
    assert result is y
    # Same float32 (float64) operations in the same order: bit-identical.
    assert torch.equal(y.cpu(), expected)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dequantize_and_axpy_unaligned(bits, dtype):
    n = 4097
    codes, scales = _ref_quantize(_random(n, torch.float32, seed=3), 32, bits)
    # Codes, scales and y all start one element into their buffers.
    codes_view = torch.cat([codes[:1], codes]).to(CUDA)[1:]
    scales_view = torch.cat([scales[:1], scales]).to(CUDA)[1:]
    out = uf.dequantize_blockwise(codes_view, scales_view, 32, bits, n, dtype)
    assert torch.equal(out.cpu(), reference.dequantize_blockwise(codes, scales, 32, bits, n, dtype))
    y = _random(n, dtype, seed=4, offset=1)
    expected = y.cpu().clone()
    reference.dequantize_axpy_(expected, codes, scales, 2.5, 32, bits)
    uf.dequantize_axpy_(y, codes_view, scales_view, 2.5, 32, bits)
    assert torch.equal(y.cpu(), expected)


def test_codec_device_mismatch_names_argument():
    codes, scales = _ref_quantize(_random(300, torch.float32, seed=5), 32, 8)
    with pytest.raises(ValueError, match="scales is on cpu"):
        uf.dequantize_blockwise(codes.to(CUDA), scales, 32, 8, 300)


# ----------------------------------------------------------------------------- L-BFGS
def _pairs(m, p, dtype, seed):
    """Curvature pairs with s'y > 0 (y = s scaled by positive factors plus a little noise)."""
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(m, p, generator=gen, dtype=torch.float64)
    Y = S * (0.5 + torch.rand(m, p, generator=gen, dtype=torch.float64)) + 0.01 * torch.randn(
        m, p, generator=gen, dtype=torch.float64
    )
    return S.to(dtype), Y.to(dtype)


def _compact_factors(m, seed):
    """A sigma and a symmetric Minv: the products below are checked for any factors, not only BNS ones."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(2 * m, 2 * m, generator=gen, dtype=torch.float64)
    return torch.tensor(0.7, dtype=torch.float64), (A + A.T) / (4 * m)


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gram_matches_reference(p, dtype, m):
    S, Y = _pairs(m, p, dtype, seed=p + m)
    SS, SY = _kernel("lbfgs_gram")(S.to(CUDA), Y.to(CUDA))
    ref_SS, ref_SY = reference.lbfgs_gram(S, Y)
    assert SS.dtype == SY.dtype == torch.float64 and SS.shape == SY.shape == (m, m)
    scale = float(ref_SS.abs().max())
    assert_close(SS.cpu(), ref_SS, scale=scale)
    assert_close(SY.cpu(), ref_SY, scale=scale)
    assert torch.equal(SS, SS.T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compact_through_cuda_gram(dtype):
    S, Y = _pairs(4, 4097, dtype, seed=9)
    sigma, Minv = uf.lbfgs_compact(S.to(CUDA), Y.to(CUDA))
    ref_sigma, ref_Minv = reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)
    # Minv is an inverse: allow for its condition number on top of float64 rounding of the gram.
    torch.testing.assert_close(sigma.cpu(), ref_sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(Minv.cpu(), ref_Minv, rtol=1e-6, atol=1e-9 * float(ref_Minv.abs().max()))


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("pair_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [None, 3])
def test_matvec_matches_reference(p, pair_dtype, v_dtype, k):
    m = 3
    S, Y = _pairs(m, p, pair_dtype, seed=p)
    sigma, Minv = _compact_factors(m, seed=p)
    shape = (p,) if k is None else (p, k)
    V = torch.randn(shape, generator=torch.Generator().manual_seed(p), dtype=torch.float64).to(v_dtype)
    out = uf.lbfgs_matvec(S.to(CUDA), Y.to(CUDA), sigma.to(CUDA), Minv.to(CUDA), V.to(CUDA))
    expected = reference.lbfgs_matvec(S, Y, sigma, Minv, V)
    assert out.dtype == v_dtype and out.shape == V.shape
    assert_close(out.cpu(), expected, scale=float(expected.abs().max()))


def test_matvec_with_no_columns_returns_empty():
    S, Y = _pairs(3, 100, torch.float32, seed=1)
    sigma, Minv = _compact_factors(3, seed=1)
    V = torch.empty(100, 0)
    out = uf.lbfgs_matvec(S.to(CUDA), Y.to(CUDA), sigma.to(CUDA), Minv.to(CUDA), V.to(CUDA))
    assert out.shape == (100, 0) and out.device.type == "cuda"
    assert reference.lbfgs_matvec(S, Y, sigma, Minv, V).shape == (100, 0)


def test_matvec_float64_against_dense_B():
    m, p = 3, 300
    S, Y = _pairs(m, p, torch.float64, seed=21)
    sigma, Minv = reference.lbfgs_compact_from_gram(*reference.lbfgs_gram(S, Y), False, 1e-3)
    W = torch.cat([Y.T, sigma * S.T], 1)  # (p, 2m)
    B = sigma * torch.eye(p, dtype=torch.float64) - W @ Minv @ W.T
    V = torch.randn(p, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = uf.lbfgs_matvec(S.to(CUDA), Y.to(CUDA), sigma.to(CUDA), Minv.to(CUDA), V.to(CUDA)).cpu()
    torch.testing.assert_close(out, B @ V, rtol=1e-9, atol=1e-9 * float((B @ V).abs().max()))


def _qn_inputs(p, dtype, m, seed):
    gen = torch.Generator().manual_seed(seed)
    w, w_ref, g_ref, g_extra = (torch.randn(p, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
    S, Y = _pairs(m, p, dtype, seed)
    sigma, Minv = _compact_factors(m, seed)
    return w, w_ref, g_ref, g_extra, S, Y, sigma, Minv


QN_SCALARS = dict(eta=0.05, alpha=1.3, beta=0.3, lam=1e-3)


def _check_qn(cpu_args, quant=None):
    """Runs qn_step_ on CUDA copies and the reference on CPU; compares w and the step norm."""
    w, w_ref, g_ref, g_extra, S, Y, sigma, Minv = cpu_args
    extra = {} if quant is None else quant["kwargs"]
    S_in, Y_in = (S, Y) if quant is None else (quant["S"], quant["Y"])
    expected_w = w.clone()
    expected_norm = reference.qn_step_(
        expected_w, w_ref, g_ref, g_extra, S_in, Y_in, sigma, Minv, *QN_SCALARS.values(),
        extra.get("S_scales"), extra.get("Y_scales"), extra.get("blocksize", 256), extra.get("bits", 8),
    )
    w_gpu = w.to(CUDA, copy=True)
    cuda_extra = {k: (v.to(CUDA) if torch.is_tensor(v) else v) for k, v in extra.items()}
    norm = uf.qn_step_(
        w_gpu, w_ref.to(CUDA), g_ref.to(CUDA), g_extra.to(CUDA), S_in.to(CUDA), Y_in.to(CUDA), sigma.to(CUDA),
        Minv.to(CUDA), **QN_SCALARS, **cuda_extra,
    )
    assert norm.dtype == torch.float64 and norm.dim() == 0 and norm.device.type == CUDA
    rtol, _ = TOLERANCE[w.dtype]
    torch.testing.assert_close(norm.cpu(), expected_norm, rtol=rtol, atol=0)
    assert_close(w_gpu.cpu(), expected_w, scale=float(expected_w.abs().max()))
    assert not torch.equal(w_gpu.cpu(), w)  # it did update in place


@pytest.mark.parametrize("p", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [1, 4])
def test_qn_step_matches_reference(p, dtype, m):
    _check_qn(_qn_inputs(p, dtype, m, seed=p + m))


@pytest.mark.parametrize("p", [1, 257, 4097, 1_000_003])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("blocksize", [32, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qn_step_quantized_pairs_match_reference(p, bits, blocksize, dtype):
    args = _qn_inputs(p, dtype, 3, seed=p + bits)
    S, Y = args[4], args[5]
    S_rows = [reference.quantize_blockwise(row, blocksize, bits, False, 0) for row in S]
    Y_rows = [reference.quantize_blockwise(row, blocksize, bits, False, 0) for row in Y]
    quant = {
        "S": torch.stack([c for c, _ in S_rows]),
        "Y": torch.stack([c for c, _ in Y_rows]),
        "kwargs": {
            "S_scales": torch.stack([s for _, s in S_rows]),
            "Y_scales": torch.stack([s for _, s in Y_rows]),
            "blocksize": blocksize,
            "bits": bits,
        },
    }
    _check_qn(args, quant)


@pytest.mark.parametrize("m", [1, 4, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lbfgs_vector_path_matches_reference(m, dtype):
    # p % 4 == 0 on fresh (aligned) buffers: the 16-byte-load path of the tiled kernels, which the
    # SIZES above (all odd) never take; m = 5 and 17 cover partial 4-pair tiles and the m > 16 fallback.
    p = 4 * 12289
    S, Y = _pairs(m, p, dtype, seed=m)
    SS, SY = _kernel("lbfgs_gram")(S.to(CUDA), Y.to(CUDA))
    ref_SS, ref_SY = reference.lbfgs_gram(S, Y)
    scale = float(ref_SS.abs().max())
    assert_close(SS.cpu(), ref_SS, scale=scale)
    assert_close(SY.cpu(), ref_SY, scale=scale)
    assert torch.equal(SS, SS.T)
    args = _qn_inputs(p, dtype, m, seed=m)
    _check_qn(args)
    for bits in (8, 4):
        S_rows = [reference.quantize_blockwise(row, 32, bits, False, 0) for row in args[4]]
        Y_rows = [reference.quantize_blockwise(row, 32, bits, False, 0) for row in args[5]]
        quant = {
            "S": torch.stack([c for c, _ in S_rows]),
            "Y": torch.stack([c for c, _ in Y_rows]),
            "kwargs": {"S_scales": torch.stack([s for _, s in S_rows]), "Y_scales": torch.stack([s for _, s in Y_rows]),
                       "blocksize": 32, "bits": bits},
        }
        _check_qn(args, quant)


def test_qn_step_shape_mismatch_names_argument():
    w, w_ref, g_ref, g_extra, S, Y, sigma, Minv = (t.to(CUDA) for t in _qn_inputs(300, torch.float32, 2, seed=1))
    with pytest.raises(ValueError, match="g_extra shape"):
        uf.qn_step_(w, w_ref, g_ref, g_extra[:-1], S, Y, sigma, Minv, **QN_SCALARS)


# ----------------------------------------------------------------------------- opcheck
def _opcheck(op, args):
    torch.library.opcheck(getattr(torch.ops.unlearn_fast, op).default, args)


@pytest.mark.parametrize("bits", [4, 8])
def test_opcheck_codec(bits):
    x = _random(1000, torch.float32, seed=2)
    _opcheck("quantize_blockwise", (x, 64, bits, True, 3))
    codes, scales = uf.quantize_blockwise(x, 64, bits)
    _opcheck("dequantize_blockwise", (codes, scales, 64, bits, 1000, torch.bfloat16))
    _opcheck("dequantize_axpy_", (x.clone(), codes, scales, 0.5, 64, bits))


def test_opcheck_lbfgs():
    w, w_ref, g_ref, g_extra, S, Y, sigma, Minv = (t.to(CUDA) for t in _qn_inputs(1000, torch.float32, 2, seed=3))
    _opcheck("lbfgs_compact", (S, Y))
    _opcheck("lbfgs_matvec", (S, Y, sigma, Minv, torch.randn(1000, 2, device=CUDA)))
    _opcheck("qn_step_", (w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, 0.1, 1.0, 0.2, 1e-3))
    S_codes, S_scales = uf.quantize_rows(S, 128, 4)
    Y_codes, Y_scales = uf.quantize_rows(Y, 128, 4)
    _opcheck("qn_step_", (w, w_ref, g_ref, g_extra, S_codes, Y_codes, sigma, Minv, 0.1, 1.0, 0.2, 1e-3, S_scales, Y_scales, 128, 4))


# ----------------------------------------------------------------------------- one contract, overlapping memory (issue 14)
def test_codes_and_scales_must_be_flat():
    n = 1000
    x = _random(n, torch.float32, seed=5)
    codes, scales = uf.quantize_blockwise(x, 64, 8)
    want = reference.dequantize_blockwise(codes.cpu(), scales.cpu(), 64, 8, n, torch.float32)
    strided_codes = torch.stack([codes, codes], 1).reshape(-1)[::2]
    assert torch.equal(uf.dequantize_blockwise(strided_codes, scales, 64, 8, n).cpu(), want)
    y = _random(n, torch.float32, seed=6)
    y0 = y.clone()
    for c, s, message in ((codes.view(2, -1), scales, "codes must be 1-D"), (codes, scales.view(1, -1), "scales must be 1-D")):
        with pytest.raises(ValueError, match=message):
            uf.dequantize_blockwise(c, s, 64, 8, n)
        with pytest.raises(ValueError, match=message):
            uf.dequantize_axpy_(y, c, s, 0.5, 64, 8)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("overlap", ["full", "partial", "none"])
def test_axpy_reads_codes_sharing_memory_with_y_as_before_the_call(overlap):
    n, bs = 4096, 64
    buf = _random(3 * n, torch.float32, seed=7)
    y = buf[n // 4:n // 4 + n]  # starts n bytes in: room for codes before it
    start = {"full": n, "partial": n // 2, "none": 0}[overlap]  # bytes; "partial" straddles y's start
    codes = buf.view(torch.int8)[start:start + n]
    scales = (1e-3 + 1e-2 * torch.rand(n // bs, generator=torch.Generator().manual_seed(8))).to(CUDA)
    want = y.cpu()
    reference.dequantize_axpy_(want, codes.cpu(), scales.cpu(), 0.5, bs, 8)
    uf.dequantize_axpy_(y, codes, scales, 0.5, bs, 8)
    assert torch.equal(y.cpu(), want)


@pytest.mark.parametrize("overlap", ["full", "partial", "none"])
def test_qn_step_reads_inputs_sharing_memory_with_w_as_before_the_call(overlap):
    p, m = 3 * 4096 + 17, 3
    sigma, Minv = _compact_factors(m, seed=9)
    st = _random((6 + 2 * m) * p, torch.float32, seed=10)
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
    copies = [t.cpu() for t in (w, w_ref, g_ref, g_extra, S, Y)]
    want_norm = reference.qn_step_(*copies, sigma, Minv, *QN_SCALARS.values(), None, None, 256, 8)
    norm = uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma.to(CUDA), Minv.to(CUDA), **QN_SCALARS)
    assert_close(w.cpu(), copies[0], scale=float(copies[0].abs().max()))
    torch.testing.assert_close(norm.cpu(), want_norm, rtol=TOLERANCE[torch.float32][0], atol=0)
