"""Triton kernel for softmax_linear_hvp: H V_j = X' R_j / n, R_j = P * Z_j - P (P * Z_j) 1 1', Z_j = X V_j'.

Two passes (see unlearn_fast/reference.py for the math):
1. rows: each program takes BLOCK_N rows of X, forms their logits X W' and softmax P once, then for every
   direction j the products Z_j = X V_j' and R_j (already divided by n), written to R laid out (n, k c).
2. outer: each program owns a (BLOCK_KC, BLOCK_D) tile of the (k c, d) output and accumulates R' X
   over all n rows, so no atomics are needed and the result is deterministic.
Products accumulate in the input dtype's accumulator (float32 for float32 with IEEE-exact inputs, i.e.
no TF32; float64 for float64). The class count c is held in one tile (BLOCK_C = next power of two >= 16).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter pays per tile operation, not per element: give it large tiles.
ROWS_BLOCK_N = 16384 if INTERPRETED else 32
OUTER_BLOCK_N = 16384 if INTERPRETED else 32
BLOCK_D = 64 if INTERPRETED else 32
BLOCK_KC = 64 if INTERPRETED else 32
MAX_CLASSES = 256  # one (BLOCK_N, BLOCK_C) tile per program must fit its registers


def _pow2(n, floor=16):
    return max(floor, triton.next_power_of_2(n))


@triton.jit
def _rows_times(x_ptr, m_ptr, rows, row_mask, cols, col_mask, n_cols_d,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """(BLOCK_N, BLOCK_C) = X[rows] @ M[cols]' for M (c, d) at m_ptr, summed over d in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for d0 in range(0, n_cols_d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < n_cols_d
        x = tl.load(x_ptr + rows[:, None] * n_cols_d + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        m = tl.load(m_ptr + cols[None, :] * n_cols_d + ds[:, None], mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        acc += tl.dot(x, m, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _rows_kernel(x_ptr, w_ptr, v_ptr, r_ptr, inv_n_ptr, n, d, c, k,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    inv_n = tl.load(inv_n_ptr)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)  # int64: W and V offsets (cols * d, j c d) may pass 2^31
    col_mask = cols < c
    logits = _rows_times(x_ptr, w_ptr, rows, row_mask, cols, col_mask, d, BLOCK_N, BLOCK_C, BLOCK_D, ACC)
    logits = tl.where(col_mask[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    e = tl.where(col_mask[None, :], e, 0.0)
    p = e / tl.sum(e, axis=1)[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    for j in range(0, k):
        z = _rows_times(x_ptr, v_ptr + j * c * tl.cast(d, tl.int64), rows, row_mask, cols, col_mask, d, BLOCK_N, BLOCK_C, BLOCK_D, ACC)
        pz = p * z
        r = (pz - p * tl.sum(pz, axis=1)[:, None]) * inv_n
        tl.store(r_ptr + rows[:, None] * (k * c) + j * c + cols[None, :], r, mask=out_mask)


@triton.jit
def _outer_kernel(r_ptr, x_ptr, out_ptr, n, d, kc,
                  BLOCK_N: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """out[kc_tile, d_tile] = sum over rows of R[rows, kc_tile]' X[rows, d_tile]."""
    kcs = tl.program_id(0).to(tl.int64) * BLOCK_KC + tl.arange(0, BLOCK_KC)
    ds = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    kc_mask, d_mask = kcs < kc, ds < d
    acc = tl.zeros((BLOCK_KC, BLOCK_D), dtype=ACC)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < n
        rt = tl.load(r_ptr + rows[None, :] * kc + kcs[:, None], mask=kc_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * d + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.dot(rt, x, input_precision="ieee", out_dtype=ACC)
    tl.store(out_ptr + kcs[:, None] * d + ds[None, :], acc, mask=kc_mask[:, None] & d_mask[None, :])


def softmax_linear_hvp(X, W, V):
    """Backend function: arguments validated and contiguous (unlearn_fast/ops.py); returns (k, c, d)."""
    n, d = X.shape
    c, k = W.shape[0], V.shape[0]
    if c > MAX_CLASSES:
        raise ValueError(f"softmax_linear_hvp (triton): at most {MAX_CLASSES} classes per call, got c = {c}")
    acc = tl.float64 if X.dtype == torch.float64 else tl.float32
    block_c = _pow2(c)
    # Tiles no wider than the data (but >= 16, tl.dot's minimum): narrow d or k c waste no work.
    block_d, block_kc = min(BLOCK_D, _pow2(d)), min(BLOCK_KC, _pow2(k * c))
    R = torch.empty(n, k * c, dtype=X.dtype, device=X.device)
    # Triton passes Python floats as float32; a one-element tensor carries 1 / n in X's dtype.
    inv_n = torch.full((1,), 1.0 / n, dtype=X.dtype, device=X.device)
    _rows_kernel[(triton.cdiv(n, ROWS_BLOCK_N),)](
        X, W, V, R, inv_n, n, d, c, k, BLOCK_N=ROWS_BLOCK_N, BLOCK_C=block_c, BLOCK_D=block_d, ACC=acc
    )
    out = torch.empty(k * c, d, dtype=X.dtype, device=X.device)
    grid = (triton.cdiv(k * c, block_kc), triton.cdiv(d, block_d))
    _outer_kernel[grid](R, X, out, n, d, k * c, BLOCK_N=OUTER_BLOCK_N, BLOCK_KC=block_kc, BLOCK_D=block_d, ACC=acc)
    return out.view(k, c, d)
