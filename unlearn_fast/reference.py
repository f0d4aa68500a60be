"""Pure-PyTorch reference kernels: the definition of every unlearn_fast op.

Every device backend (C++ CPU, CUDA, Triton) must reproduce these results: bit for bit where the
math is exact (codes, scales, dequantized values), within the dtype tolerance table otherwise.
They run on any device torch supports and are the fallback when no compiled backend is present.

Arguments arrive validated (see ops.py); these functions only compute.
"""
import torch

QMAX = {8: 127, 4: 7}

# Counter-based hash for stochastic rounding: uniform u(seed, i) in [0, 1) from 32-bit integer
# mixing of the element's 64-bit index, so every backend draws the same numbers for a seed.
_MIX_A = 0x85EBCA6B
_MIX_B = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def _fmix32(h):
    """murmur3's 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * _MIX_A) & _MASK32
    h = h ^ (h >> 13)
    h = (h * _MIX_B) & _MASK32
    return h ^ (h >> 16)


def uniform_from_counter(seed: int, index: torch.Tensor) -> torch.Tensor:
    """u = fmix32(lo32(i) ^ fmix32(hi32(i) ^ seed32 * GOLDEN)) >> 8, scaled by 2^-24: float32 in [0, 1)."""
    seed_mixed = (seed & _MASK32) * _GOLDEN & _MASK32
    lo = index & _MASK32
    hi = index >> 32
    h = _fmix32(lo ^ _fmix32(hi ^ seed_mixed))
    return (h >> 8).to(torch.float32) * (2.0**-24)


def _blocks(x: torch.Tensor, blocksize: int):
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    return torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize), n


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in [-7, 7] -> bytes, element 2j in the low nibble of byte j (offset 8)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_full((1,), 8)])  # pad with code 0 (nibble 8), as every backend writes it
    u = u.view(-1, 2)
    return u[:, 0] | (u[:, 1] << 4)


def unpack_nibbles(codes: torch.Tensor, numel: int) -> torch.Tensor:
    lo = (codes & 0xF).to(torch.int16) - 8
    hi = (codes >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:numel]


def quantize_blockwise(x, blocksize, bits, stochastic, seed):
    qmax = QMAX[bits]
    blocks, n = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    finite = torch.isfinite(blocks).all(dim=1)
    # Tensor / tensor: CUDA turns division by a Python scalar into a multiply by its reciprocal.
    scales = absmax / torch.full_like(absmax, qmax)
    # Multiply by a per-block reciprocal (both divisions correctly rounded in every backend).
    # A tensor divisor, not `qmax / absmax`: Python's reflected division is reciprocal(absmax) * qmax.
    inv = torch.where(absmax > 0, torch.full_like(absmax, qmax) / absmax, torch.zeros_like(absmax))
    v = blocks * inv[:, None]
    if stochastic:
        index = torch.arange(blocks.numel(), device=x.device, dtype=torch.int64).view_as(blocks)
        q = torch.floor(v + uniform_from_counter(seed, index))
    else:
        q = torch.floor(v + 0.5)  # round half up; exact in float32 since |v| <= 127
    q = q.clamp(-qmax, qmax)
    q = torch.where(finite[:, None], q, torch.zeros_like(q))
    scales = torch.where(finite, scales, torch.full_like(scales, float("nan")))
    q = q.reshape(-1)[:n]
    codes = q.to(torch.int8) if bits == 8 else pack_nibbles(q)
    return codes, scales


def _decode(codes, scales, blocksize, bits, numel):
    """float32 dequantized values: code * scale of its block, one correctly rounded product."""
    q = codes.to(torch.float32) if bits == 8 else unpack_nibbles(codes, numel).to(torch.float32)
    block = torch.arange(numel, device=codes.device) // blocksize
    return q[:numel] * scales[block]


def dequantize_blockwise(codes, scales, blocksize, bits, numel, dtype):
    return _decode(codes, scales, blocksize, bits, numel).to(dtype)


def accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dequantize_axpy_(y, codes, scales, alpha, blocksize, bits):
    acc = accumulate_dtype(y.dtype)
    deq = _decode(codes, scales, blocksize, bits, y.numel()).to(acc)
    y.copy_((y.reshape(-1).to(acc) + alpha * deq).view_as(y))


def lbfgs_gram(S, Y):
    """(S S', S Y') in float64 for S, Y of shape (m, p): the only O(m^2 p) part of lbfgs_compact."""
    S64, Y64 = S.to(torch.float64), Y.to(torch.float64)
    return S64 @ S64.T, S64 @ Y64.T


def lbfgs_compact_from_gram(SS, SY, skip_bad_pairs, sigma_floor):
    """Compact L-BFGS (Byrd-Nocedal-Schnabel): B = sigma I - W Minv W', W = [Y, sigma S] (p x 2m).

    Shared by every backend (2m x 2m work). Pair i (row i of S and Y, oldest first) with s_i'y_i <= 0
    raises, or with skip_bad_pairs is removed by zeroing its rows and columns in Minv.
    sigma = s'y / s's of the newest kept pair, floored at sigma_floor.
    """
    m = SS.shape[0]
    sy = torch.diagonal(SY)
    keep = sy > 0
    if not bool(keep.all()) and not skip_bad_pairs:
        bad = torch.nonzero(~keep).reshape(-1).tolist()
        raise ValueError(
            f"lbfgs_compact: curvature pairs {bad} of (S, Y) have s'y <= 0 "
            f"(values {sy[~keep].tolist()}); pass skip_bad_pairs=True to drop them"
        )
    if not bool(keep.any()):
        raise ValueError("lbfgs_compact: no pair of (S, Y) has s'y > 0; cannot build the quasi-Hessian")
    last = int(torch.nonzero(keep)[-1])
    sigma = torch.clamp(SY[last, last] / SS[last, last], min=sigma_floor)
    L = torch.tril(SY, diagonal=-1)
    M = torch.cat([torch.cat([-torch.diag(sy), L.T], 1), torch.cat([L, sigma * SS], 1)], 0)
    idx = torch.nonzero(torch.cat([keep, keep])).reshape(-1)
    Minv = torch.zeros(2 * m, 2 * m, dtype=torch.float64, device=SS.device)
    Minv[idx[:, None], idx[None, :]] = torch.linalg.inv(M[idx[:, None], idx[None, :]])
    return sigma, Minv


def lbfgs_matvec(S, Y, sigma, Minv, V):
    m = S.shape[0]
    V64 = V.to(torch.float64)
    V2 = V64 if V.dim() == 2 else V64[:, None]
    S64, Y64 = S.to(torch.float64), Y.to(torch.float64)
    WtV = torch.cat([Y64 @ V2, sigma * (S64 @ V2)], 0)  # (2m, k)
    c = Minv @ WtV
    BV = sigma * V2 - Y64.T @ c[:m] - sigma * (S64.T @ c[m:])
    return (BV if V.dim() == 2 else BV[:, 0]).to(V.dtype)


def dequantize_rows(codes, scales, blocksize, bits, p):
    """(m, bytes_per_row) codes + (m, blocks_per_row) scales -> (m, p) float32; each row quantized alone."""
    return torch.stack([_decode(codes[i], scales[i], blocksize, bits, p) for i in range(codes.shape[0])])


def qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales, Y_scales, blocksize, bits):
    """w -= eta * (alpha (B (w - w_ref) + g_ref + lam w_ref) - beta (g_extra + lam w)); returns |eta g|."""
    if S_scales is not None:
        S = dequantize_rows(S, S_scales, blocksize, bits, w.numel())
        Y = dequantize_rows(Y, Y_scales, blocksize, bits, w.numel())
    f64 = torch.float64
    w64 = w.to(f64)
    wr = w_ref.to(f64)
    Bv = lbfgs_matvec(S, Y, sigma, Minv, w64 - wr)
    g = alpha * (Bv + g_ref.to(f64) + lam * wr) - beta * (g_extra.to(f64) + lam * w64)
    step = eta * g
    w.copy_(w64 - step)
    return torch.linalg.vector_norm(step).to(f64)


# ----------------------------------------------------------------------------- softmax_linear_hvp (issue 5)
def softmax_linear_hvp(X, W, V):
    """H V_j for the Hessian H of mean softmax cross-entropy of logits X W' with respect to W.

    With p_i = softmax(W x_i) and z_ij = V_j x_i (both (c,)), the directional derivative of the
    gradient (1/n) sum_i (p_i - e_{y_i}) x_i' along V_j is (1/n) sum_i (diag(p_i) - p_i p_i') z_ij x_i',
    so H V_j = R_j' X / n with R_j[i] = p_i * z_ij - p_i (p_i . z_ij). The labels drop out.
    Computed in float64 and cast back: this is the definition the fast backends are checked against.
    """
    f64 = torch.float64
    X64, W64, V64 = X.to(f64), W.to(f64), V.to(f64)
    P = torch.softmax(X64 @ W64.T, dim=1)  # (n, c)
    Z = torch.einsum("nd,kcd->knc", X64, V64)  # (k, n, c)
    PZ = P * Z
    R = PZ - P * PZ.sum(dim=-1, keepdim=True)
    return (torch.einsum("knc,nd->kcd", R, X64) / X.shape[0]).to(X.dtype)
