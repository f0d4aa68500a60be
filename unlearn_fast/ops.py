"""The unlearn_fast torch ops: schemas, argument checks, fake (meta) kernels and public wrappers.

This is the one place where ops are declared. Each op is `torch.ops.unlearn_fast.<name>`, visible to
torch.compile and checked by torch.library.opcheck. The CPU and CUDA dispatch keys route to
`backends.kernel(name, device)` (C++, CUDA, Triton or the pure-torch reference); any other device
runs the reference. Argument errors are ValueError naming the argument; they are raised before any
output is written, so nothing in place is half-updated. Because every check lives here, every
backend accepts exactly the same inputs (e.g. codes and scales must be 1-D). The in-place ops read
their inputs as they were before the call: an input sharing memory with the output is copied first.
"""
import torch

from . import backends, reference

LIB = torch.library.Library("unlearn_fast", "DEF")

SCHEMAS = {
    "quantize_blockwise": "(Tensor x, int blocksize=256, int bits=8, bool stochastic=False, int seed=0) -> (Tensor, Tensor)",
    "dequantize_blockwise": "(Tensor codes, Tensor scales, int blocksize, int bits, int numel, ScalarType dtype) -> Tensor",
    "dequantize_axpy_": "(Tensor(a!) y, Tensor codes, Tensor scales, float alpha, int blocksize, int bits) -> ()",
    "lbfgs_compact": "(Tensor S, Tensor Y, bool skip_bad_pairs=False, float sigma_floor=0.001) -> (Tensor, Tensor)",
    "lbfgs_matvec": "(Tensor S, Tensor Y, Tensor sigma, Tensor Minv, Tensor V) -> Tensor",
    "qn_step_": (
        "(Tensor(a!) w, Tensor w_ref, Tensor g_ref, Tensor g_extra, Tensor S, Tensor Y, Tensor sigma, "
        "Tensor Minv, float eta, float alpha, float beta, float lam, Tensor? S_scales=None, "
        "Tensor? Y_scales=None, int blocksize=256, int bits=8) -> Tensor"
    ),
}
for _name, _schema in SCHEMAS.items():
    LIB.define(_name + _schema)

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CODE_DTYPE = {8: torch.int8, 4: torch.uint8}


# ----------------------------------------------------------------------------- argument checks
def _require(ok, message):
    if not ok:
        raise ValueError(message)


def _check_codec(op, blocksize, bits):
    _require(bits in (4, 8), f"{op}: bits must be 4 or 8, got {bits}")
    _require(
        32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0,
        f"{op}: blocksize must be a power of two in [32, 4096], got {blocksize}",
    )


def code_bytes(numel, bits):
    return numel if bits == 8 else (numel + 1) // 2


def num_blocks(numel, blocksize):
    return -(-numel // blocksize)


def _check_codes(op, codes, scales, blocksize, bits, numel, device):
    _check_codec(op, blocksize, bits)
    # One contract for every backend: flat code and scale streams, as quantize_blockwise returns them
    # (a kernel reading raw memory would take any shape, the reference would not).
    _require(codes.dim() == 1, f"{op}: codes must be 1-D (flat, as quantize_blockwise returns it), got shape {tuple(codes.shape)}")
    _require(scales.dim() == 1, f"{op}: scales must be 1-D (one per block), got shape {tuple(scales.shape)}")
    _require(
        codes.dtype == CODE_DTYPE[bits],
        f"{op}: codes must be {CODE_DTYPE[bits]} for bits={bits}, got {codes.dtype}",
    )
    _require(scales.dtype == torch.float32, f"{op}: scales must be float32, got {scales.dtype}")
    _require(
        codes.numel() == code_bytes(numel, bits),
        f"{op}: codes has {codes.numel()} elements, expected {code_bytes(numel, bits)} for {numel} values at {bits} bits",
    )
    _require(
        scales.numel() == num_blocks(numel, blocksize),
        f"{op}: scales has {scales.numel()} elements, expected {num_blocks(numel, blocksize)} blocks of {blocksize}",
    )
    _same_device(op, device, codes=codes, scales=scales)


def _same_device(op, device, **tensors):
    for name, t in tensors.items():
        _require(t.device == device, f"{op}: {name} is on {t.device}, expected {device} like the other inputs")


def _check_pairs(op, S, Y, p=None):
    _require(S.dim() == 2, f"{op}: S must be (m, p), one curvature pair per row; got shape {tuple(S.shape)}")
    _require(S.shape == Y.shape, f"{op}: Y shape {tuple(Y.shape)} differs from S shape {tuple(S.shape)}")
    _require(S.shape[0] >= 1, f"{op}: S must hold at least one curvature pair")
    _require(S.dtype in (torch.float32, torch.float64), f"{op}: S must be float32 or float64, got {S.dtype}")
    _require(Y.dtype == S.dtype, f"{op}: Y dtype {Y.dtype} differs from S dtype {S.dtype}")
    if p is not None:
        _require(S.shape[1] == p, f"{op}: S has {S.shape[1]} columns, expected p = {p}")
    _same_device(op, S.device, Y=Y)


def _check_compact(op, S, sigma, Minv):
    m = S.shape[0]
    _require(sigma.dim() == 0 and sigma.dtype == torch.float64, f"{op}: sigma must be a 0-dim float64 tensor from lbfgs_compact")
    _require(
        Minv.shape == (2 * m, 2 * m) and Minv.dtype == torch.float64,
        f"{op}: Minv must be a ({2 * m}, {2 * m}) float64 tensor from lbfgs_compact, got {tuple(Minv.shape)} {Minv.dtype}",
    )
    _same_device(op, S.device, sigma=sigma, Minv=Minv)


def check_quantize(x, blocksize, bits):
    _check_codec("quantize_blockwise", blocksize, bits)
    _require(
        x.dtype in (torch.float32, torch.bfloat16, torch.float16),
        f"quantize_blockwise: x must be float32, bfloat16 or float16, got {x.dtype}",
    )
    _require(x.numel() > 0, "quantize_blockwise: x is empty")


def check_dequantize(codes, scales, blocksize, bits, numel, dtype):
    _require(numel > 0, f"dequantize_blockwise: numel must be positive, got {numel}")
    _require(dtype in FLOATS, f"dequantize_blockwise: dtype must be one of {FLOATS}, got {dtype}")
    _check_codes("dequantize_blockwise", codes, scales, blocksize, bits, numel, codes.device)


def check_axpy(y, codes, scales, blocksize, bits):
    _require(y.dtype in FLOATS, f"dequantize_axpy_: y must be one of {FLOATS}, got {y.dtype}")
    _require(y.numel() > 0, "dequantize_axpy_: y is empty")
    _require(y.is_contiguous(), "dequantize_axpy_: y must be contiguous (it is updated in place)")
    _check_codes("dequantize_axpy_", codes, scales, blocksize, bits, y.numel(), y.device)


def check_matvec(S, Y, sigma, Minv, V):
    _check_pairs("lbfgs_matvec", S, Y)
    _check_compact("lbfgs_matvec", S, sigma, Minv)
    _require(V.dim() in (1, 2), f"lbfgs_matvec: V must be (p,) or (p, k), got shape {tuple(V.shape)}")
    _require(V.shape[0] == S.shape[1], f"lbfgs_matvec: V has {V.shape[0]} rows, S has p = {S.shape[1]} columns")
    _require(V.dtype in (torch.float32, torch.float64), f"lbfgs_matvec: V must be float32 or float64, got {V.dtype}")
    _same_device("lbfgs_matvec", S.device, V=V)


def check_qn_step(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, S_scales, Y_scales, blocksize, bits):
    op = "qn_step_"
    _require(w.dim() == 1 and w.numel() > 0, f"{op}: w must be a non-empty flat (p,) tensor, got shape {tuple(w.shape)}")
    _require(w.dtype in (torch.float32, torch.float64), f"{op}: w must be float32 or float64, got {w.dtype}")
    _require(w.is_contiguous(), f"{op}: w must be contiguous (it is updated in place)")
    for name, t in (("w_ref", w_ref), ("g_ref", g_ref), ("g_extra", g_extra)):
        _require(t.shape == w.shape, f"{op}: {name} shape {tuple(t.shape)} differs from w shape {tuple(w.shape)}")
        _require(t.dtype == w.dtype, f"{op}: {name} dtype {t.dtype} differs from w dtype {w.dtype}")
    _same_device(op, w.device, w_ref=w_ref, g_ref=g_ref, g_extra=g_extra, S=S, Y=Y)
    p = w.numel()
    if S_scales is None and Y_scales is None:
        _check_pairs(op, S, Y, p)
        _require(S.dtype == w.dtype, f"{op}: S dtype {S.dtype} differs from w dtype {w.dtype}")
    else:
        _require(S_scales is not None and Y_scales is not None, f"{op}: give both S_scales and Y_scales, or neither")
        _check_codec(op, blocksize, bits)
        _require(S.dim() == 2 and S.shape == Y.shape, f"{op}: quantized S and Y must be (m, bytes_per_row) of one shape")
        _require(S.shape[0] >= 1, f"{op}: S must hold at least one curvature pair")
        for name, codes, scales in (("S", S, S_scales), ("Y", Y, Y_scales)):
            _require(codes.dtype == CODE_DTYPE[bits], f"{op}: quantized {name} must be {CODE_DTYPE[bits]}, got {codes.dtype}")
            _require(
                codes.shape[1] == code_bytes(p, bits),
                f"{op}: quantized {name} rows hold {codes.shape[1]} bytes, expected {code_bytes(p, bits)} for p = {p}",
            )
            expected = (codes.shape[0], num_blocks(p, blocksize))
            _require(
                scales.dtype == torch.float32 and tuple(scales.shape) == expected,
                f"{op}: {name}_scales must be float32 of shape {expected}, got {scales.dtype} {tuple(scales.shape)}",
            )
            _same_device(op, w.device, **{f"{name}_scales": scales})
    _check_compact(op, S, sigma, Minv)


# ----------------------------------------------------------------------------- fake kernels
@torch.library.register_fake("unlearn_fast::quantize_blockwise")
def _(x, blocksize=256, bits=8, stochastic=False, seed=0):
    check_quantize(x, blocksize, bits)
    n = x.numel()
    return x.new_empty(code_bytes(n, bits), dtype=CODE_DTYPE[bits]), x.new_empty(num_blocks(n, blocksize), dtype=torch.float32)


@torch.library.register_fake("unlearn_fast::dequantize_blockwise")
def _(codes, scales, blocksize, bits, numel, dtype):
    check_dequantize(codes, scales, blocksize, bits, numel, dtype)
    return codes.new_empty(numel, dtype=dtype)


@torch.library.register_fake("unlearn_fast::dequantize_axpy_")
def _(y, codes, scales, alpha, blocksize, bits):
    check_axpy(y, codes, scales, blocksize, bits)


@torch.library.register_fake("unlearn_fast::lbfgs_compact")
def _(S, Y, skip_bad_pairs=False, sigma_floor=1e-3):
    _check_pairs("lbfgs_compact", S, Y)
    m = S.shape[0]
    return S.new_empty((), dtype=torch.float64), S.new_empty((2 * m, 2 * m), dtype=torch.float64)


@torch.library.register_fake("unlearn_fast::lbfgs_matvec")
def _(S, Y, sigma, Minv, V):
    check_matvec(S, Y, sigma, Minv, V)
    return torch.empty_like(V)


@torch.library.register_fake("unlearn_fast::qn_step_")
def _(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales=None, Y_scales=None, blocksize=256, bits=8):
    check_qn_step(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, S_scales, Y_scales, blocksize, bits)
    return w.new_empty((), dtype=torch.float64)


# ----------------------------------------------------------------------------- device kernels
def _contig(t):
    return None if t is None else t.contiguous()


def _quantize(x, blocksize=256, bits=8, stochastic=False, seed=0):
    check_quantize(x, blocksize, bits)
    codes, scales = backends.kernel("quantize_blockwise", x.device.type)(x.contiguous(), blocksize, bits, stochastic, seed)
    bad = ~torch.isfinite(scales)
    if bool(bad.any()):
        block = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"quantize_blockwise: x contains NaN or Inf (first in block {block}, elements "
            f"{block * blocksize}..{min((block + 1) * blocksize, x.numel()) - 1})"
        )
    return codes, scales


def _dequantize(codes, scales, blocksize, bits, numel, dtype):
    check_dequantize(codes, scales, blocksize, bits, numel, dtype)
    fn = backends.kernel("dequantize_blockwise", codes.device.type)
    return fn(codes.contiguous(), scales.contiguous(), blocksize, bits, numel, dtype)


def _require_no_grad(op, **tensors):
    """The in-place ops write through raw pointers, which autograd cannot see."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            _require(t is None or not t.requires_grad,
                     f"{op}: {name} requires grad, and this in-place op has no derivative; detach it or call under torch.no_grad()")


def _byte_range(t):
    """[first, last) byte addresses t can touch (a superset for strided views); None when empty."""
    if t.numel() == 0:
        return None
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _overlaps(out, t):
    if t is None or t.device != out.device or t.device.type == "meta":
        return False
    a, b = _byte_range(out), _byte_range(t)
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


def _unaliased(out, t):
    """t itself, or a copy when it shares memory with the in-place output `out`.

    The in-place ops are defined as the reference run on copies of their inputs: every input is read
    as it was before the call. A kernel that writes `out` while streaming an input that overlaps it
    would read values it has already overwritten, so such an input is copied first (for every
    backend, here, so none can differ). Conservative: a strided view whose address range merely
    interleaves with `out` is copied too.
    """
    return t.clone(memory_format=torch.contiguous_format) if _overlaps(out, t) else t


def _axpy(y, codes, scales, alpha, blocksize, bits):
    check_axpy(y, codes, scales, blocksize, bits)
    _require_no_grad("dequantize_axpy_", y=y, scales=scales)
    codes, scales = (_unaliased(y, t).contiguous() for t in (codes, scales))
    backends.kernel("dequantize_axpy_", y.device.type)(y, codes, scales, alpha, blocksize, bits)


def _compact(S, Y, skip_bad_pairs=False, sigma_floor=1e-3):
    _check_pairs("lbfgs_compact", S, Y)
    SS, SY = backends.kernel("lbfgs_gram", S.device.type)(S.contiguous(), Y.contiguous())
    return reference.lbfgs_compact_from_gram(SS, SY, skip_bad_pairs, sigma_floor)


def _matvec(S, Y, sigma, Minv, V):
    check_matvec(S, Y, sigma, Minv, V)
    fn = backends.kernel("lbfgs_matvec", S.device.type)
    return fn(S.contiguous(), Y.contiguous(), sigma, Minv.contiguous(), V.contiguous())


def _qn_step(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales=None, Y_scales=None, blocksize=256, bits=8):
    check_qn_step(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, S_scales, Y_scales, blocksize, bits)
    _require_no_grad("qn_step_", w=w, w_ref=w_ref, g_ref=g_ref, g_extra=g_extra, S=S, Y=Y, sigma=sigma, Minv=Minv,
                     S_scales=S_scales, Y_scales=Y_scales)
    fn = backends.kernel("qn_step_", w.device.type)
    w_ref, g_ref, g_extra, S, Y, sigma, Minv, S_scales, Y_scales = (
        _contig(None if t is None else _unaliased(w, t)) for t in (w_ref, g_ref, g_extra, S, Y, sigma, Minv, S_scales, Y_scales)
    )
    return fn(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales, Y_scales, blocksize, bits)


IMPLS = {
    "quantize_blockwise": _quantize,
    "dequantize_blockwise": _dequantize,
    "dequantize_axpy_": _axpy,
    "lbfgs_compact": _compact,
    "lbfgs_matvec": _matvec,
    "qn_step_": _qn_step,
}
for _name, _impl in IMPLS.items():
    # CompositeExplicitAutograd covers CPU, CUDA and every other device; backends.kernel picks per device.
    LIB.impl(_name, _impl, "CompositeExplicitAutograd")


def _declare_no_derivative(name):
    """No op is differentiable: the forward runs below autograd and backward raises. Left to autograd, a
    C++ kernel's inner ATen calls would be recorded and its raw-pointer writes not: wrong gradients,
    silently. (The in-place ops refuse such tensors instead, _require_no_grad: register_autograd takes
    no mutable op.)"""

    def backward(ctx, *grads):
        raise RuntimeError(
            f"unlearn_fast::{name} has no derivative; differentiate its pure-torch reference "
            f"(unlearn_fast.reference.{name}) instead, or detach the inputs"
        )

    torch.library.register_autograd(f"unlearn_fast::{name}", backward)


for _name in ("quantize_blockwise", "dequantize_blockwise", "lbfgs_compact", "lbfgs_matvec"):
    _declare_no_derivative(_name)


# ----------------------------------------------------------------------------- public wrappers
def quantize_blockwise(x, blocksize=256, bits=8, stochastic=False, seed=0):
    """Symmetric blockwise quantization of x (any shape, flattened) -> (codes, scales).

    For block b of `blocksize` consecutive elements: scale_b = absmax_b / qmax (qmax 127 for 8 bits,
    7 for 4 bits), v = x * (qmax / absmax_b), code = floor(v + 0.5) (round half up, |error| <= scale/2)
    or, with stochastic=True, floor(v + u) with u in [0, 1) from a counter-based hash of (seed, index):
    unbiased, and identical on every backend for a seed. codes: int8 (bits=8, numel values) or uint8
    (bits=4, two codes per byte, element 2j in the low nibble, stored as code + 8). scales: float32,
    one per block (the last block may be partial). NaN or Inf in x raises ValueError.
    """
    return torch.ops.unlearn_fast.quantize_blockwise(x, blocksize, bits, stochastic, seed)


def dequantize_blockwise(codes, scales, blocksize, bits, numel, dtype=torch.float32):
    """x_hat[i] = code[i] * scale[i // blocksize] (a float32 product), cast to dtype; flat (numel,)."""
    return torch.ops.unlearn_fast.dequantize_blockwise(codes, scales, blocksize, bits, numel, dtype)


def dequantize_axpy_(y, codes, scales, alpha, blocksize, bits):
    """y += alpha * dequantize(codes, scales) in one pass (float32 math, float64 for float64 y); returns y."""
    torch.ops.unlearn_fast.dequantize_axpy_(y, codes, scales, alpha, blocksize, bits)
    return y


def lbfgs_compact(S, Y, skip_bad_pairs=False, sigma_floor=1e-3):
    """Compact L-BFGS factors from m curvature pairs (rows of S, Y; oldest first) -> (sigma, Minv).

    B = sigma I - W Minv W' with W = [Y, sigma S], M = [[-D, L'], [L, sigma S S']], D = diag(s_i'y_i),
    L the strictly lower part of S Y' (Byrd, Nocedal, Schnabel 1994); sigma = s'y / s's of the newest
    pair, floored. Pairs with s'y <= 0 raise ValueError unless skip_bad_pairs drops them.
    """
    return torch.ops.unlearn_fast.lbfgs_compact(S, Y, skip_bad_pairs, sigma_floor)


def lbfgs_matvec(S, Y, sigma, Minv, V):
    """B V for V of shape (p,) or (p, k), never forming the p x p matrix B."""
    return torch.ops.unlearn_fast.lbfgs_matvec(S, Y, sigma, Minv, V)


def qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales=None, Y_scales=None, blocksize=256, bits=8):
    """One fused quasi-Newton / contraction-map step, in place on w; returns |eta g| (0-dim float64).

    v = w - w_ref; g = alpha (B v + g_ref + lam w_ref) - beta (g_extra + lam w); w -= eta g.
    DeltaGrad's approximate step is alpha = |B_t|/|rem_t|, beta = |Delta_t|/|rem_t|, g_extra the
    deleted samples' gradient. S and Y may be row-quantized codes (each row quantized alone with
    quantize_blockwise) with S_scales, Y_scales of shape (m, ceil(p / blocksize)).
    """
    return torch.ops.unlearn_fast.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam, S_scales, Y_scales, blocksize, bits)


def quantize_rows(X, blocksize=256, bits=8, stochastic=False, seed=0):
    """Quantize each row of a 2-D tensor on its own: the layout qn_step_ takes for S and Y."""
    pairs = [quantize_blockwise(row, blocksize, bits, stochastic, seed + i) for i, row in enumerate(X)]
    return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


# ============================================================================= softmax_linear_hvp (issue 5)
# Exact Hessian-vector products of mean softmax cross-entropy for a linear layer, k directions at
# once, never forming the (c d) x (c d) Hessian. Appended as its own section: schema, checks, fake
# kernel, device dispatch and public wrapper.
LIB.define("softmax_linear_hvp(Tensor X, Tensor W, Tensor V) -> Tensor")


def check_softmax_linear_hvp(X, W, V):
    op = "softmax_linear_hvp"
    _require(X.dim() == 2, f"{op}: X must be (n, d), got shape {tuple(X.shape)}")
    _require(W.dim() == 2, f"{op}: W must be (c, d), got shape {tuple(W.shape)}")
    _require(V.dim() == 3, f"{op}: V must be (k, c, d), one direction per leading index; got shape {tuple(V.shape)}")
    _require(X.shape[0] >= 1 and X.shape[1] >= 1, f"{op}: X is empty (shape {tuple(X.shape)})")
    _require(W.shape[0] >= 1, f"{op}: W has no classes (shape {tuple(W.shape)})")
    _require(W.shape[1] == X.shape[1], f"{op}: W has {W.shape[1]} columns, X has d = {X.shape[1]}")
    _require(
        tuple(V.shape[1:]) == tuple(W.shape),
        f"{op}: V must be (k, {W.shape[0]}, {W.shape[1]}) like W, got shape {tuple(V.shape)}",
    )
    _require(V.shape[0] >= 1, f"{op}: V holds no directions (k = 0)")
    _require(X.dtype in (torch.float32, torch.float64), f"{op}: X must be float32 or float64, got {X.dtype}")
    _require(W.dtype == X.dtype, f"{op}: W dtype {W.dtype} differs from X dtype {X.dtype}")
    _require(V.dtype == X.dtype, f"{op}: V dtype {V.dtype} differs from X dtype {X.dtype}")
    _same_device(op, X.device, W=W, V=V)


@torch.library.register_fake("unlearn_fast::softmax_linear_hvp")
def _(X, W, V):
    check_softmax_linear_hvp(X, W, V)
    return torch.empty_like(V, memory_format=torch.contiguous_format)


def _softmax_linear_hvp(X, W, V):
    check_softmax_linear_hvp(X, W, V)
    fn = backends.kernel("softmax_linear_hvp", X.device.type)
    out = fn(X.contiguous(), W.contiguous(), V.contiguous())
    # A NaN or Inf anywhere in X, W or V reaches the (small) output, so checking it is the cheap test;
    # the inputs are only scanned, to name the culprit, once it fails.
    if not bool(torch.isfinite(out).all()):
        for name, t in (("X", X), ("W", W), ("V", V)):
            _require(bool(torch.isfinite(t).all()), f"softmax_linear_hvp: {name} contains NaN or Inf")
        raise RuntimeError("softmax_linear_hvp: the product overflowed float range although X, W and V are finite; scale X or V down")
    return out


LIB.impl("softmax_linear_hvp", _softmax_linear_hvp, "CompositeExplicitAutograd")
_declare_no_derivative("softmax_linear_hvp")


def softmax_linear_hvp(X, W, V):
    """H V_j, j < k, for H the Hessian w.r.t. W (c, d) of mean softmax cross-entropy of X W' (X: (n, d)).

    H V_j = X' (P * Z_j - P (P * Z_j) 1 1') / n with P = softmax(X W') and Z_j = X V_j' (both (n, c)),
    * elementwise. Returns (k, c, d) in V's dtype (float32 or float64). The labels do not enter.
    For a bias, append a ones column to X and the bias as a last column of W (and of every V_j).
    """
    return torch.ops.unlearn_fast.softmax_linear_hvp(X, W, V)
