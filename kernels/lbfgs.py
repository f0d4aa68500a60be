"""Triton kernels for the compact L-BFGS ops: lbfgs_gram (for lbfgs_compact), lbfgs_matvec, qn_step_.

Each public function takes the arguments ops.py passes to a backend and returns what the matching
function of unlearn_fast/reference.py returns, within the dtype tolerance table. All math is float64
like the reference (a float32 x float32 product is exact in float64).

- Reductions (S S', S Y', Y V, S V, S v, Y v) hold the m curvature pairs as the rows of a (MP, TILE)
  tile, MP = m rounded up to a power of two (rows >= m masked). A bounded number of programs each
  loop over a contiguous chunk of columns and write one partial sum; torch adds the partials and does
  the tiny 2m x 2m work.
- Elementwise passes (the B V output, the qn_step_ update) loop over the m rows one at a time, so
  each input element is read once and registers stay few for any m.
"""
import os

import torch
import triton
import triton.language as tl

# Reductions use at most this many programs (each loops over its chunk), so partial-sum buffers
# stay small for any p (8192 x 2 MP^2 float64). 1024 programs left the last of ~3 waves on an H200
# a quarter full; 8192 make ~20 waves.
MAX_REDUCE_PROGRAMS = 8192
# Compiled kernels get register-sized tiles. The interpreter (TRITON_INTERPRET=1) runs every tile
# operation as a numpy call and pays per call, not per element, so it gets much larger tiles.
# Read at call time: tests shrink them to exercise multi-iteration chunks and many programs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
REDUCE_TILE_ELEMENTS = 1 << 16 if INTERPRETED else 2048  # float64 values in one reduction tile
UPDATE_TILE = 1 << 14 if INTERPRETED else 1024  # columns per program in the elementwise passes
MAX_K_BLOCK = 64 if INTERPRETED else 16  # columns of V per program in lbfgs_matvec
# float64 tiles with m rows: 8 warps keep ptxas at <= ~110 registers for m = 8 (sm_90, no spills).
NUM_WARPS = 8


def _pow2(n):
    return triton.next_power_of_2(max(1, n))


def _reduce_tile(*dims):
    size = 1
    for d in dims:
        size *= d
    return max(16, REDUCE_TILE_ELEMENTS // size)


def _reduce_grid(p, tile):
    """(programs, chunk): programs * chunk >= p, chunk a multiple of tile."""
    programs = min(triton.cdiv(p, tile), MAX_REDUCE_PROGRAMS)
    chunk = triton.cdiv(triton.cdiv(p, programs), tile) * tile
    return programs, chunk


@triton.jit
def _load_pairs(ptr, scales_ptr, rows, cols, mask, row_stride, nblocks,
                QUANTIZED: tl.constexpr, PACKED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """float64 values at (rows, cols) (int64, broadcast together) of an (m, p) matrix of pairs.

    Plain: a float32/float64 matrix with rows row_stride apart. QUANTIZED: row-quantized codes
    (row_stride bytes per row; int8, or uint8 with two codes per byte when PACKED) and (m, nblocks)
    float32 scales, decoded as reference.dequantize_rows does (one float32 product).
    """
    if QUANTIZED:
        if PACKED:
            byte = tl.load(ptr + rows * row_stride + (cols >> 1), mask=mask, other=0).to(tl.int32)
            q = tl.where((cols & 1) == 0, byte & 0xF, byte >> 4) - 8
        else:
            q = tl.load(ptr + rows * row_stride + cols, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + rows * nblocks + cols // BLOCKSIZE, mask=mask, other=0.0)
        return (q.to(tl.float32) * scale).to(tl.float64)
    return tl.load(ptr + rows * row_stride + cols, mask=mask, other=0.0).to(tl.float64)


# ----------------------------------------------------------------------------- lbfgs_gram
@triton.jit
def _gram_kernel(S_ptr, Y_ptr, partial_ptr, m, p, chunk, MP: tl.constexpr, TILE: tl.constexpr):
    # Reference: unlearn_fast/reference.py lbfgs_gram. partial[pid] = (S S', S Y') over one chunk.
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, MP).to(tl.int64)
    stride = tl.cast(p, tl.int64)
    start = pid * chunk
    end = tl.minimum(start + chunk, stride)
    # Per-lane products accumulate elementwise over the chunk; the cross-lane sum runs once at the
    # end (a tl.sum per tile cost a block-wide reduction of 2 MP^2 values every iteration).
    ss = tl.zeros([MP, MP, TILE], dtype=tl.float64)
    sy = tl.zeros([MP, MP, TILE], dtype=tl.float64)
    for first in range(start, end, TILE):
        cols = first + tl.arange(0, TILE)
        mask = (rows[:, None] < m) & (cols[None, :] < end)
        S = _load_pairs(S_ptr, S_ptr, rows[:, None], cols[None, :], mask, stride, 0, False, False, 1)
        Y = _load_pairs(Y_ptr, Y_ptr, rows[:, None], cols[None, :], mask, stride, 0, False, False, 1)
        ss += S[:, None, :] * S[None, :, :]
        sy += S[:, None, :] * Y[None, :, :]
    out = partial_ptr + pid * 2 * MP * MP + rows[:, None] * MP + rows[None, :]
    tl.store(out, tl.sum(ss, axis=2))
    tl.store(out + MP * MP, tl.sum(sy, axis=2))


def lbfgs_gram(S, Y):
    """Triton twin of reference.lbfgs_gram: (S S', S Y') as float64 (m, m)."""
    m, p = S.shape
    mp = _pow2(m)
    # Two (MP, MP, TILE) float64 accumulators of 2 * REDUCE_TILE_ELEMENTS values: 32 per thread at 8 warps.
    tile = 2 * _reduce_tile(mp, mp)
    programs, chunk = _reduce_grid(p, tile)
    partial = torch.empty((programs, 2, mp, mp), dtype=torch.float64, device=S.device)
    _gram_kernel[(programs,)](S, Y, partial, m, p, chunk, MP=mp, TILE=tile, num_warps=NUM_WARPS)
    total = partial.sum(0)
    return total[0, :m, :m].contiguous(), total[1, :m, :m].contiguous()


# ----------------------------------------------------------------------------- lbfgs_matvec
@triton.jit
def _project_kernel(S_ptr, Y_ptr, V_ptr, partial_ptr, m, p, k, chunk,
                    MP: tl.constexpr, TILE: tl.constexpr, KB: tl.constexpr):
    # Reference: the Y64 @ V2 and S64 @ V2 products of unlearn_fast/reference.py lbfgs_matvec.
    # partial[pid, 0] = Y V and partial[pid, 1] = S V over one chunk of rows of V, columns of this kb.
    pid = tl.program_id(0).to(tl.int64)
    kcols = tl.program_id(1).to(tl.int64) * KB + tl.arange(0, KB)
    rows = tl.arange(0, MP).to(tl.int64)
    stride = tl.cast(p, tl.int64)
    width = tl.cast(k, tl.int64)
    start = pid * chunk
    end = tl.minimum(start + chunk, stride)
    yv = tl.zeros([MP, KB], dtype=tl.float64)
    sv = tl.zeros([MP, KB], dtype=tl.float64)
    for first in range(start, end, TILE):
        cols = first + tl.arange(0, TILE)
        mask = (rows[:, None] < m) & (cols[None, :] < end)
        S = _load_pairs(S_ptr, S_ptr, rows[:, None], cols[None, :], mask, stride, 0, False, False, 1)
        Y = _load_pairs(Y_ptr, Y_ptr, rows[:, None], cols[None, :], mask, stride, 0, False, False, 1)
        v_mask = (cols[:, None] < end) & (kcols[None, :] < width)
        V = tl.load(V_ptr + cols[:, None] * width + kcols[None, :], mask=v_mask, other=0.0).to(tl.float64)
        yv += tl.sum(Y[:, :, None] * V[None, :, :], axis=1)
        sv += tl.sum(S[:, :, None] * V[None, :, :], axis=1)
    out = partial_ptr + pid * 2 * MP * width + rows[:, None] * width + kcols[None, :]
    out_mask = kcols[None, :] < width
    tl.store(out, yv, mask=out_mask)
    tl.store(out + MP * width, sv, mask=out_mask)


@triton.jit
def _matvec_update_kernel(S_ptr, Y_ptr, V_ptr, coef_ptr, sigma_ptr, out_ptr, m, p, k,
                          TILE: tl.constexpr, KB: tl.constexpr):
    # Reference: BV = sigma V - Y' c[:m] - sigma S' c[m:] of unlearn_fast/reference.py lbfgs_matvec,
    # with coef = (c[:m], sigma c[m:]) as a (2, m, k) float64 tensor.
    cols = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    kcols = tl.program_id(1).to(tl.int64) * KB + tl.arange(0, KB)
    stride = tl.cast(p, tl.int64)
    width = tl.cast(k, tl.int64)
    col_mask = cols < stride
    k_mask = kcols < width
    mask = col_mask[:, None] & k_mask[None, :]
    offs = cols[:, None] * width + kcols[None, :]
    sigma = tl.load(sigma_ptr)
    bv = sigma * tl.load(V_ptr + offs, mask=mask, other=0.0).to(tl.float64)
    for i in range(m):
        s = _load_pairs(S_ptr, S_ptr, i, cols, col_mask, stride, 0, False, False, 1)
        y = _load_pairs(Y_ptr, Y_ptr, i, cols, col_mask, stride, 0, False, False, 1)
        a = tl.load(coef_ptr + i * width + kcols, mask=k_mask, other=0.0)
        b = tl.load(coef_ptr + (m + i) * width + kcols, mask=k_mask, other=0.0)
        bv -= y[:, None] * a[None, :] + s[:, None] * b[None, :]
    tl.store(out_ptr + offs, bv.to(out_ptr.dtype.element_ty), mask=mask)


def _compact_coefficients(YV, SV, sigma, Minv):
    """(a, b) with B v = sigma v - Y' a - S' b: c = Minv [Y v; sigma S v], a = c[:m], b = sigma c[m:]."""
    m = YV.shape[0]
    c = Minv @ torch.cat([YV, sigma * SV], 0)
    return c[:m], sigma * c[m:]


def lbfgs_matvec(S, Y, sigma, Minv, V):
    """Triton twin of reference.lbfgs_matvec: B V for V of shape (p,) or (p, k), in V's dtype."""
    m, p = S.shape
    V2 = V if V.dim() == 2 else V[:, None]
    k = V2.shape[1]
    out = torch.empty_like(V2)
    if k == 0:
        return out if V.dim() == 2 else out[:, 0]
    mp = _pow2(m)
    kb = min(_pow2(k), MAX_K_BLOCK)
    k_blocks = triton.cdiv(k, kb)
    tile = _reduce_tile(mp, kb)
    programs, chunk = _reduce_grid(p, tile)
    partial = torch.empty((programs, 2, mp, k), dtype=torch.float64, device=S.device)
    _project_kernel[(programs, k_blocks)](S, Y, V2, partial, m, p, k, chunk, MP=mp, TILE=tile, KB=kb, num_warps=NUM_WARPS)
    total = partial.sum(0)
    a, b = _compact_coefficients(total[0, :m], total[1, :m], sigma, Minv)
    coef = torch.cat([a, b], 0).contiguous()
    sigma_t = sigma.reshape(1).contiguous()
    update_tile = max(16, UPDATE_TILE // kb)
    grid = (triton.cdiv(p, update_tile), k_blocks)
    _matvec_update_kernel[grid](S, Y, V2, coef, sigma_t, out, m, p, k, TILE=update_tile, KB=kb, num_warps=NUM_WARPS)
    return out if V.dim() == 2 else out[:, 0]


# ----------------------------------------------------------------------------- qn_step_
@triton.jit
def _qn_project_kernel(w_ptr, w_ref_ptr, S_ptr, Y_ptr, S_scales_ptr, Y_scales_ptr, partial_ptr,
                       m, p, row_stride, nblocks, chunk,
                       MP: tl.constexpr, TILE: tl.constexpr,
                       QUANTIZED: tl.constexpr, PACKED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    # Reference: Y64 @ v and S64 @ v with v = w - w_ref, inside unlearn_fast/reference.py qn_step_.
    # partial[pid, 0] = Y v, partial[pid, 1] = S v over one chunk.
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, MP).to(tl.int64)
    stride = tl.cast(row_stride, tl.int64)
    nblocks = tl.cast(nblocks, tl.int64)
    start = pid * chunk
    end = tl.minimum(start + chunk, tl.cast(p, tl.int64))
    yv = tl.zeros([MP, TILE], dtype=tl.float64)  # summed over the columns once, after the loop (see _gram_kernel)
    sv = tl.zeros([MP, TILE], dtype=tl.float64)
    for first in range(start, end, TILE):
        cols = first + tl.arange(0, TILE)
        col_mask = cols < end
        v = (tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float64)
             - tl.load(w_ref_ptr + cols, mask=col_mask, other=0.0).to(tl.float64))
        mask = (rows[:, None] < m) & col_mask[None, :]
        S = _load_pairs(S_ptr, S_scales_ptr, rows[:, None], cols[None, :], mask, stride, nblocks, QUANTIZED, PACKED, BLOCKSIZE)
        Y = _load_pairs(Y_ptr, Y_scales_ptr, rows[:, None], cols[None, :], mask, stride, nblocks, QUANTIZED, PACKED, BLOCKSIZE)
        yv += Y * v[None, :]
        sv += S * v[None, :]
    tl.store(partial_ptr + pid * 2 * MP + rows, tl.sum(yv, axis=1))
    tl.store(partial_ptr + pid * 2 * MP + MP + rows, tl.sum(sv, axis=1))


@triton.jit
def _qn_update_kernel(w_ptr, w_ref_ptr, g_ref_ptr, g_extra_ptr, S_ptr, Y_ptr, S_scales_ptr, Y_scales_ptr,
                      coef_ptr, square_ptr, m, p, row_stride, nblocks,
                      TILE: tl.constexpr, QUANTIZED: tl.constexpr, PACKED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    # Reference: unlearn_fast/reference.py qn_step_. coef = [sigma, eta, alpha, beta, lam, a (m), b (m)]
    # with B v = sigma v - Y' a - S' b. Writes w -= eta g and square[pid] = sum (eta g)^2 here.
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = cols < tl.cast(p, tl.int64)
    stride = tl.cast(row_stride, tl.int64)
    nblocks = tl.cast(nblocks, tl.int64)
    sigma = tl.load(coef_ptr)
    eta = tl.load(coef_ptr + 1)
    alpha = tl.load(coef_ptr + 2)
    beta = tl.load(coef_ptr + 3)
    lam = tl.load(coef_ptr + 4)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float64)
    w_ref = tl.load(w_ref_ptr + cols, mask=mask, other=0.0).to(tl.float64)
    bv = sigma * (w - w_ref)
    for i in range(m):
        s = _load_pairs(S_ptr, S_scales_ptr, i, cols, mask, stride, nblocks, QUANTIZED, PACKED, BLOCKSIZE)
        y = _load_pairs(Y_ptr, Y_scales_ptr, i, cols, mask, stride, nblocks, QUANTIZED, PACKED, BLOCKSIZE)
        bv -= y * tl.load(coef_ptr + 5 + i) + s * tl.load(coef_ptr + 5 + m + i)
    g_ref = tl.load(g_ref_ptr + cols, mask=mask, other=0.0).to(tl.float64)
    g_extra = tl.load(g_extra_ptr + cols, mask=mask, other=0.0).to(tl.float64)
    g = alpha * (bv + g_ref + lam * w_ref) - beta * (g_extra + lam * w)
    step = tl.where(mask, eta * g, 0.0)
    tl.store(w_ptr + cols, (w - step).to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(square_ptr + pid, tl.sum(step * step, axis=0))


def qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales, Y_scales, blocksize, bits):
    """Triton twin of reference.qn_step_: w -= eta g in place; returns |eta g| as a 0-dim float64."""
    p = w.numel()
    m = S.shape[0]
    quantized = S_scales is not None
    row_stride = S.shape[1]  # elements (plain) or code bytes (quantized) per row
    nblocks = S_scales.shape[1] if quantized else 0
    S_scales = S_scales if quantized else S  # unused placeholders when plain
    Y_scales = Y_scales if quantized else Y
    flags = dict(QUANTIZED=quantized, PACKED=quantized and bits == 4, BLOCKSIZE=blocksize if quantized else 1)

    mp = _pow2(m)
    tile = _reduce_tile(mp)
    programs, chunk = _reduce_grid(p, tile)
    partial = torch.empty((programs, 2, mp), dtype=torch.float64, device=w.device)
    _qn_project_kernel[(programs,)](
        w, w_ref, S, Y, S_scales, Y_scales, partial, m, p, row_stride, nblocks, chunk, MP=mp, TILE=tile,
        num_warps=NUM_WARPS, **flags,
    )
    total = partial.sum(0)
    a, b = _compact_coefficients(total[0, :m], total[1, :m], sigma, Minv)
    scalars = torch.tensor([eta, alpha, beta, lam], dtype=torch.float64, device=w.device)
    coef = torch.cat([sigma.reshape(1), scalars, a, b])

    grid = (triton.cdiv(p, UPDATE_TILE),)
    square = torch.empty(grid[0], dtype=torch.float64, device=w.device)
    _qn_update_kernel[grid](
        w, w_ref, g_ref, g_extra, S, Y, S_scales, Y_scales, coef, square, m, p, row_stride, nblocks,
        TILE=UPDATE_TILE, num_warps=NUM_WARPS, **flags,
    )
    return square.sum().sqrt()
