"""Triton kernels for the blockwise codec: quantize_blockwise, dequantize_blockwise, dequantize_axpy_.

Each public function takes the arguments ops.py passes to a backend and returns what the matching
function of unlearn_fast/reference.py returns; codes, scales and dequantized values are bit-identical
to it. Notes that hold for every kernel here:
- offsets are int64 (pid.to(tl.int64)), so tensors beyond 2^31 elements index correctly;
- quantize launches with enable_fp_fusion=False: the reference rounds x * inv before adding 0.5 (or
  u), and a fused multiply-add would round once and change some codes;
- both divisions use tl.math.div_rn (correctly rounded, like torch); plain `/` on fp32 compiles to
  an approximate division on NVIDIA GPUs.
"""
import torch
import triton
import triton.language as tl

from unlearn_fast import reference

# Elements per program: several small quantization blocks share one program, so a program always
# moves a few KiB however small blocksize is.
QUANT_TILE = 4096
DEQUANT_TILE = 2048
# Compiled jit code may read only constexpr globals. At every launch Triton checks with == that each
# global a kernel read is unchanged, so a NaN global (never equal to itself) fails every launch: the
# NaN scale is made from its bits instead.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
QUIET_NAN_BITS = tl.constexpr(0x7FC00000)


def _seed_mixed(seed):
    """reference.uniform_from_counter's seed term, seed32 * GOLDEN mod 2^32, computed on the host.

    Returned as the int32 with the same bits (the kernel casts it to uint32): Triton types a Python
    int in [2^31, 2^32) as uint32, and the interpreter then mixes it with 64-bit numpy values.
    """
    mixed = (seed & reference._MASK32) * reference._GOLDEN & reference._MASK32
    return mixed - (1 << 32) if mixed >= 1 << 31 else mixed


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32 (wrapping multiplies); mirrors reference._fmix32."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _uniform_from_counter(seed_mixed, index):
    """reference.uniform_from_counter for int64 element indices: float32 in [0, 1)."""
    lo = index.to(tl.uint32)  # truncation keeps the low 32 bits
    hi = (index >> 32).to(tl.uint32)
    h = _fmix32(lo ^ _fmix32(hi ^ tl.cast(seed_mixed, tl.uint32)))
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _round_to_codes(x, inv, finite, index, seed_mixed, QMAX: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Codes (int32) of a (rows, cols) tile: floor(x * inv + 0.5 or + u), clamped, 0 in bad blocks."""
    v = x * inv[:, None]
    if STOCHASTIC:
        q = tl.floor(v + _uniform_from_counter(seed_mixed, index))
    else:
        q = tl.floor(v + 0.5)
    # NaN (0 * inf when qmax / absmax overflows, absmax below ~1e-36) is code 0, as the reference's
    # cast gives; compiled tl.maximum would return -QMAX for it.
    q = tl.where(q == q, q, 0.0)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    q = tl.where(finite[:, None], q, 0.0)
    return q.to(tl.int32)


@triton.jit
def _quantize_kernel(
    x_ptr, codes_ptr, scales_ptr, numel, nblocks, seed_mixed,
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, QMAX: tl.constexpr,
    PACKED: tl.constexpr, STOCHASTIC: tl.constexpr,
):
    # Reference: unlearn_fast/reference.py quantize_blockwise (and pack_nibbles for PACKED).
    # One program quantizes ROWS consecutive blocks; a tile row is one block.
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    if PACKED:
        # Even and odd elements as two (ROWS, BLOCKSIZE/2) tiles: byte j holds elements 2j and 2j+1.
        col = tl.arange(0, BLOCKSIZE // 2)
        even = block[:, None] * BLOCKSIZE + 2 * col[None, :]
        odd = even + 1
        x_even = tl.load(x_ptr + even, mask=even < numel, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + odd, mask=odd < numel, other=0.0).to(tl.float32)
        absmax = tl.maximum(tl.max(tl.abs(x_even), axis=1), tl.max(tl.abs(x_odd), axis=1))
        # |x| <= FLT_MAX is false for NaN and Inf.
        ok = (tl.abs(x_even) <= FLT_MAX) & (tl.abs(x_odd) <= FLT_MAX)
    else:
        col = tl.arange(0, BLOCKSIZE)
        offs = block[:, None] * BLOCKSIZE + col[None, :]
        x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)
        absmax = tl.max(tl.abs(x), axis=1)
        ok = tl.abs(x) <= FLT_MAX
    finite = tl.min(ok.to(tl.int32), axis=1) == 1

    qmax = tl.full([ROWS], QMAX, tl.float32)
    positive = absmax > 0
    scale = tl.math.div_rn(absmax, qmax)
    inv = tl.where(positive, tl.math.div_rn(qmax, tl.where(positive, absmax, 1.0)), 0.0)
    scale = tl.where(finite, scale, tl.full([ROWS], QUIET_NAN_BITS, tl.int32).to(tl.float32, bitcast=True))
    tl.store(scales_ptr + block, scale, mask=block < nblocks)

    if PACKED:
        q_even = _round_to_codes(x_even, inv, finite, even, seed_mixed, QMAX, STOCHASTIC)
        q_odd = _round_to_codes(x_odd, inv, finite, odd, seed_mixed, QMAX, STOCHASTIC)
        byte = (q_even + 8) | ((q_odd + 8) << 4)
        byte_offs = block[:, None] * (BLOCKSIZE // 2) + col[None, :]
        tl.store(codes_ptr + byte_offs, byte.to(tl.uint8), mask=even < numel)
    else:
        q = _round_to_codes(x, inv, finite, offs, seed_mixed, QMAX, STOCHASTIC)
        tl.store(codes_ptr + offs, q.to(tl.int8), mask=offs < numel)


def quantize_blockwise(x, blocksize, bits, stochastic, seed):
    """Triton twin of reference.quantize_blockwise: (codes, scales), bit-identical."""
    flat = x.reshape(-1)
    numel = flat.numel()
    nblocks = -(-numel // blocksize)
    if bits == 8:
        codes = torch.empty(numel, dtype=torch.int8, device=x.device)
    else:
        codes = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = max(1, QUANT_TILE // blocksize)
    grid = (triton.cdiv(nblocks, rows),)
    _quantize_kernel[grid](
        flat, codes, scales, numel, nblocks, _seed_mixed(seed),
        BLOCKSIZE=blocksize, ROWS=rows, QMAX=reference.QMAX[bits], PACKED=bits == 4,
        STOCHASTIC=bool(stochastic), num_warps=8, enable_fp_fusion=False,
    )
    return codes, scales


@triton.jit
def _store_rounded(ptr, offs, value, mask, BF16: tl.constexpr):
    """Store float32/float64 `value` in ptr's dtype, rounding to nearest even like torch's .to()."""
    if BF16:
        # float32 -> bfloat16 round-to-nearest-even by hand: the interpreter's own conversion
        # truncates, so this keeps interpreted and compiled results bit-identical to torch.
        bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(ptr + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode(codes_ptr, scales_ptr, offs, mask, BLOCKSIZE: tl.constexpr, PACKED: tl.constexpr):
    """float32 code * scale for element offsets offs (int64); mirrors reference._decode."""
    if PACKED:
        byte = tl.load(codes_ptr + (offs >> 1), mask=mask, other=0).to(tl.int32)
        q = tl.where((offs & 1) == 0, byte & 0xF, byte >> 4) - 8
    else:
        q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + offs // BLOCKSIZE, mask=mask, other=0.0)
    return q.to(tl.float32) * scale


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, out_ptr, numel,
                       BLOCKSIZE: tl.constexpr, PACKED: tl.constexpr, TILE: tl.constexpr, BF16: tl.constexpr):
    # Reference: unlearn_fast/reference.py dequantize_blockwise.
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < numel
    value = _decode(codes_ptr, scales_ptr, offs, mask, BLOCKSIZE, PACKED)
    _store_rounded(out_ptr, offs, value, mask, BF16)


def dequantize_blockwise(codes, scales, blocksize, bits, numel, dtype):
    """Triton twin of reference.dequantize_blockwise: flat (numel,) tensor of dtype, bit-identical."""
    out = torch.empty(numel, dtype=dtype, device=codes.device)
    grid = (triton.cdiv(numel, DEQUANT_TILE),)
    _dequantize_kernel[grid](
        codes, scales, out, numel,
        BLOCKSIZE=blocksize, PACKED=bits == 4, TILE=DEQUANT_TILE, BF16=dtype == torch.bfloat16, num_warps=8,
    )
    return out


@triton.jit
def _dequantize_axpy_kernel(y_ptr, codes_ptr, scales_ptr, alpha_ptr, numel,
                            BLOCKSIZE: tl.constexpr, PACKED: tl.constexpr, TILE: tl.constexpr, BF16: tl.constexpr):
    # Reference: unlearn_fast/reference.py dequantize_axpy_. alpha_ptr's dtype is the math dtype
    # (float64 for float64 y, float32 otherwise).
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < numel
    alpha = tl.load(alpha_ptr)
    acc_ty = alpha_ptr.dtype.element_ty
    value = _decode(codes_ptr, scales_ptr, offs, mask, BLOCKSIZE, PACKED).to(acc_ty)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    _store_rounded(y_ptr, offs, y + alpha * value, mask, BF16)


def dequantize_axpy_(y, codes, scales, alpha, blocksize, bits):
    """Triton twin of reference.dequantize_axpy_: y += alpha * dequantize(codes, scales), in place."""
    # Triton passes Python floats as float32; a one-element tensor carries alpha at full precision.
    alpha_t = torch.full((1,), alpha, dtype=reference.accumulate_dtype(y.dtype), device=y.device)
    numel = y.numel()
    grid = (triton.cdiv(numel, DEQUANT_TILE),)
    _dequantize_axpy_kernel[grid](
        y, codes, scales, alpha_t, numel,
        BLOCKSIZE=blocksize, PACKED=bits == 4, TILE=DEQUANT_TILE, BF16=y.dtype == torch.bfloat16, num_warps=8,
    )
