"""Batched HVPs, inverse-HVP solvers, the fused softmax-linear Hessian op, influence and method="newton".

Every product is checked against an independent dense reference (torch.autograd.functional.hessian,
jacobian) in float64 on small models.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast import ops, reference
from unlearn_fast.backends import use_backend
from unlearn_fast.hvp import ConvergenceError, batched_cg, hvp, ihvp, lissa
from tolerances import assert_close, sum_magnitude

F64 = torch.float64


def small_mlp(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def small_batch(n=7, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def flat_params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_loss(model, loss_fn, batch):
    """The mean loss as a function of one flat parameter vector (for autograd.functional)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(w):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = torch.Size(shape).numel()
            params[name] = w[start : start + size].view(shape)
            start += size
        return loss_fn(torch.func.functional_call(model, params, (batch[0],)), batch[1])

    return f


def dense_hessian(model, loss_fn, batch):
    return torch.autograd.functional.hessian(flat_loss(model, loss_fn, batch), flat_params(model))


# ----------------------------------------------------------------------------- hvp
@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hvp_matches_dense_hessian(mode):
    model, batch = small_mlp(), small_batch()
    H = dense_hessian(model, F.cross_entropy, batch)
    V = torch.randn(5, H.shape[0], dtype=F64)
    assert_close(hvp(F.cross_entropy, model, V, batch, mode=mode), V @ H)


@pytest.fixture
def fused_calls(monkeypatch):
    """Records the V shape of every call of the fused op (unlearn_fast.hvp looks it up in ops at call time)."""
    calls, op = [], ops.softmax_linear_hvp
    monkeypatch.setattr(ops, "softmax_linear_hvp", lambda *a: calls.append(a[2].shape) or op(*a))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode,kind", [("rev-rev", "hessian"), ("fwd-rev", "hessian"), ("rev-rev", "ggn")])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, torch.nn.CrossEntropyLoss()])
def test_hvp_of_linear_softmax_model_uses_fused_op(bias, mode, kind, loss_fn, fused_calls):
    torch.manual_seed(5)
    model = torch.nn.Linear(6, 4, bias=bias).to(F64)
    batch = (torch.randn(23, 6, dtype=F64), torch.randint(0, 4, (23,)))
    H = dense_hessian(model, F.cross_entropy, batch)
    V = torch.randn(11, H.shape[0], dtype=F64)
    assert_close(hvp(loss_fn, model, V, batch, mode=mode, kind=kind), V @ H)
    assert fused_calls and all(shape[1:] == (4, 6 + bias) for shape in fused_calls)


@pytest.mark.parametrize("case", ["soft targets", "ignore_index", "label smoothing", "frozen bias", "mlp"])
def test_hvp_outside_the_fused_structure_goes_the_generic_way(case, fused_calls):
    torch.manual_seed(6)
    model = torch.nn.Linear(6, 4).to(F64)
    X, y = torch.randn(23, 6, dtype=F64), torch.randint(0, 4, (23,))
    loss_fn = F.cross_entropy
    if case == "soft targets":
        y = torch.softmax(torch.randn(23, 4, dtype=F64), dim=1) * 0.7  # rows sum to 0.7: H scales by 0.7
    elif case == "ignore_index":
        y[:5] = -100
    elif case == "label smoothing":
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    elif case == "frozen bias":
        model.bias.requires_grad_(False)
    else:
        model = torch.nn.Sequential(model)
    if case == "frozen bias":  # the trainable parameters are the weight alone
        bias = model.bias.detach()
        H = torch.autograd.functional.hessian(lambda w: F.cross_entropy(X @ w.view(4, 6).T + bias, y), model.weight.detach().reshape(-1))
    else:
        H = dense_hessian(model, loss_fn, (X, y))
    V = torch.randn(3, H.shape[0], dtype=F64)
    assert_close(hvp(loss_fn, model, V, (X, y)), V @ H)
    assert fused_calls == []


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hvp_refuses_dropout_in_training_mode(mode):
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Dropout(0.3), torch.nn.Linear(5, 3)).to(F64)
    batch, V = small_batch(), torch.randn(2, 43, dtype=F64)
    with pytest.raises(ValueError, match="Dropout '1' .* in training mode"):
        hvp(F.cross_entropy, model, V, batch, mode=mode)
    model.eval()
    assert_close(hvp(F.cross_entropy, model, V, batch, mode=mode), V @ dense_hessian(model, F.cross_entropy, batch))


@pytest.mark.parametrize("solver", ["cg", "lissa"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_vectors_are_refused_not_solved(solver, bad):
    """A NaN right-hand side used to pass for converged after 0 iterations (its NaN residual is not above
    tol) and came back as zeros."""
    model, batch = small_mlp(), small_batch()
    V = torch.randn(3, 43, dtype=F64)
    V[1, 7] = bad
    with pytest.raises(ValueError, match=r"ihvp: vectors hold NaN or Inf \(rows \[1\]\)"):
        ihvp(F.cross_entropy, model, V, batch, damping=0.1, kind="ggn", solver=solver)
    with pytest.raises(ValueError, match=r"hvp: vectors hold NaN or Inf \(rows \[1\]\)"):
        hvp(F.cross_entropy, model, V, batch)
    with pytest.raises(ValueError, match=f"ihvp \\({solver}\\): right-hand sides hold NaN or Inf"):
        if solver == "cg":
            batched_cg(lambda M: M, V)
        else:
            lissa(lambda M: M, V, scale=1.0)


def test_hvp_batch_must_be_a_pair():
    model, batch = small_mlp(), small_batch()
    with pytest.raises(ValueError, match=r"hvp: batch must be a pair \(inputs, targets\)"):
        hvp(F.cross_entropy, model, torch.randn(2, 43, dtype=F64), batch[0])


def test_hvp_refuses_batchnorm_in_training_mode_and_leaves_its_statistics():
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).to(F64)
    batch = (torch.randn(32, 5, dtype=F64), torch.randint(0, 3, (32,)))
    V = torch.randn(2, sum(t.numel() for t in model.parameters()), dtype=F64)
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BatchNorm1d '1' in training mode"):
        hvp(F.cross_entropy, model, V, batch)
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    model.eval()  # running statistics: a plain function of the parameters
    assert_close(hvp(F.cross_entropy, model, V, batch), V @ dense_hessian(model, F.cross_entropy, batch))


def test_hvp_of_linear_softmax_model_rejects_out_of_range_labels():
    model = torch.nn.Linear(3, 2).to(F64)
    with pytest.raises((IndexError, RuntimeError), match="[Tt]arget"):
        hvp(F.cross_entropy, model, torch.randn(2, 8, dtype=F64), (torch.randn(5, 3, dtype=F64), torch.tensor([0, 1, 2, 0, 1])))


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hvp_dict_form_and_single_vector(mode):
    model, batch = small_mlp(), small_batch()
    H = dense_hessian(model, F.cross_entropy, batch)
    V = torch.randn(3, H.shape[0], dtype=F64)
    named = dict(model.named_parameters())
    vectors, start = {}, 0
    for name, p in named.items():
        vectors[name] = V[:, start : start + p.numel()].reshape(3, *p.shape)
        start += p.numel()
    out = hvp(F.cross_entropy, model, vectors, batch, mode=mode)
    assert list(out) == list(named)
    flat = torch.cat([out[n].reshape(3, -1) for n in named], dim=1)
    assert_close(flat, V @ H)
    assert_close(hvp(F.cross_entropy, model, V[1], batch, mode=mode), V[1] @ H)


def test_hvp_symmetric_and_batched_equals_looped():
    model, batch = small_mlp(2), small_batch(11, seed=3)
    torch.manual_seed(4)
    U, V = torch.randn(4, 43, dtype=F64), torch.randn(4, 43, dtype=F64)
    HV, HU = hvp(F.cross_entropy, model, V, batch), hvp(F.cross_entropy, model, U, batch)
    assert_close((U * HV).sum(1), (V * HU).sum(1))
    looped = torch.stack([hvp(F.cross_entropy, model, v, batch) for v in V])
    assert_close(HV, looped)


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_hvp_chunking_over_vectors_and_data(mode):
    model, batch = small_mlp(5), small_batch(13, seed=6)
    V = torch.randn(7, 43, dtype=F64)
    whole = hvp(F.cross_entropy, model, V, batch, mode=mode)
    assert_close(hvp(F.cross_entropy, model, V, batch, mode=mode, chunk_size=3, data_chunk_size=4), whole)


def test_hvp_params_dict_form():
    torch.manual_seed(0)
    A = torch.randn(6, 6, dtype=F64)
    params = {"w": torch.randn(6, dtype=F64)}

    def loss(p, batch):  # quartic: the Hessian depends on w
        w = p["w"]
        return (A @ w).pow(4).sum() / 4 + batch * w.dot(w)

    H = torch.autograd.functional.hessian(lambda w: loss({"w": w}, 0.5), params["w"])
    V = torch.randn(3, 6, dtype=F64)
    for mode in ("rev-rev", "fwd-rev"):
        assert_close(hvp(loss, params, V, 0.5, mode=mode), V @ H)


@pytest.mark.parametrize("mode", ["rev-rev", "fwd-rev"])
def test_ggn_matches_explicit_jacobian_product(mode):
    model, batch = small_mlp(7), small_batch(5, seed=8)
    w = flat_params(model)
    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for p in model.parameters()]

    def outputs(wf):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = wf[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return torch.func.functional_call(model, params, (batch[0],)).reshape(-1)

    J = torch.autograd.functional.jacobian(outputs, w)  # (n c, p)
    out = outputs(w).detach()
    H_out = torch.autograd.functional.hessian(lambda o: F.cross_entropy(o.view(5, 3), batch[1]), out)
    G = J.T @ H_out @ J
    V = torch.randn(4, w.numel(), dtype=F64)
    assert_close(hvp(F.cross_entropy, model, V, batch, mode=mode, kind="ggn"), V @ G)


def test_hvp_frozen_parameters_are_excluded():
    model, batch = small_mlp(), small_batch()
    model[0].weight.requires_grad_(False)
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    H_full = dense_hessian(model, F.cross_entropy, batch)
    keep = torch.cat([torch.full((q.numel(),), q.requires_grad) for q in model.parameters()])
    V = torch.randn(2, p, dtype=F64)
    assert_close(hvp(F.cross_entropy, model, V, batch), V @ H_full[keep][:, keep])


# ----------------------------------------------------------------------------- bad input
def test_hvp_bad_inputs():
    model, batch = small_mlp(), small_batch()
    with pytest.raises(ValueError, match="vectors must be"):
        hvp(F.cross_entropy, model, torch.randn(2, 42, dtype=F64), batch)
    with pytest.raises(ValueError, match="vectors dtype"):
        hvp(F.cross_entropy, model, torch.randn(2, 43), batch)
    with pytest.raises(ValueError, match="vectors keys"):
        hvp(F.cross_entropy, model, {"0.weight": torch.randn(1, 5, 4, dtype=F64)}, batch)
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda o, t: F.cross_entropy(o, t, reduction="none"), model, torch.randn(1, 43, dtype=F64), batch)
    frozen = small_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hvp(F.cross_entropy, frozen, torch.randn(1, 43, dtype=F64), batch)
    with pytest.raises(ValueError, match="mode"):
        hvp(F.cross_entropy, model, torch.randn(1, 43, dtype=F64), batch, mode="fwd-fwd")
    broken = small_mlp()
    with torch.no_grad():
        broken[2].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        hvp(F.cross_entropy, broken, torch.randn(1, 43, dtype=F64), batch)


def test_ihvp_bad_inputs():
    model, batch = small_mlp(), small_batch()
    V = torch.randn(1, 43, dtype=F64)
    with pytest.raises(ValueError, match="damping"):
        ihvp(F.cross_entropy, model, V, batch, damping=-1.0)
    with pytest.raises(ValueError, match="solver"):
        ihvp(F.cross_entropy, model, V, batch, solver="newton")
    broken = small_mlp()
    with torch.no_grad():
        broken[0].bias[0] = float("nan")
    with pytest.raises(RuntimeError, match="ihvp: the hessian vector product is not finite"):
        ihvp(F.cross_entropy, broken, V, batch, damping=1.0)
    with pytest.raises(RuntimeError, match="NaN or Inf at iteration 1"):
        batched_cg(lambda P: P * float("nan"), V, damping=0.0)
    # Negative curvature: H + damping I indefinite -> a clear error, not a garbage solve.
    with pytest.raises(RuntimeError, match="not positive definite"):
        ihvp(lambda p, b: -(p["w"] ** 2).sum(), {"w": torch.ones(3, dtype=F64)}, torch.ones(1, 3, dtype=F64), None)


# ----------------------------------------------------------------------------- solvers
def spd_problem(p=30, k=4, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=F64))
    A = Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=F64)) @ Q.T
    return A, torch.randn(k, p, generator=g, dtype=F64)


def test_cg_matches_dense_solve():
    A, B = spd_problem()
    X, report = batched_cg(lambda V: V @ A, B, damping=0.1, tol=1e-10, max_iter=200)
    dense = torch.linalg.solve(A + 0.1 * torch.eye(30, dtype=F64), B.T).T
    torch.testing.assert_close(X, dense, rtol=1e-6, atol=1e-8)
    assert report.converged and report.residuals.max() <= 1e-10 and report.iterations <= 60


def test_ihvp_cg_on_model_matches_dense_solve():
    model, batch = small_mlp(), small_batch(20)
    H = dense_hessian(model, F.cross_entropy, batch)
    V = torch.randn(3, 43, dtype=F64)
    for mode in ("rev-rev", "fwd-rev"):
        X, report = ihvp(F.cross_entropy, model, V, batch, damping=0.5, tol=1e-10, max_iter=200, mode=mode)
        dense = torch.linalg.solve(H + 0.5 * torch.eye(43, dtype=F64), V.T).T
        torch.testing.assert_close(X, dense, rtol=1e-6, atol=1e-8)
        assert report.converged


def test_lissa_converges_on_well_conditioned_problem():
    A, B = spd_problem(cond=5.0)
    X, report = lissa(lambda V: V @ A, B, damping=0.0, tol=1e-8, max_iter=2000)
    torch.testing.assert_close(X, torch.linalg.solve(A, B.T).T, rtol=1e-6, atol=1e-7)
    assert report.converged and report.scale > 0
    model, batch = small_mlp(), small_batch(20)
    V = torch.randn(2, 43, dtype=F64)
    X, report = ihvp(F.cross_entropy, model, V, batch, solver="lissa", damping=1.0, tol=1e-8, max_iter=3000)
    H = dense_hessian(model, F.cross_entropy, batch)
    torch.testing.assert_close(X, torch.linalg.solve(H + torch.eye(43, dtype=F64), V.T).T, rtol=1e-6, atol=1e-7)


def test_non_convergence_raises_or_reports():
    A, B = spd_problem(cond=1e4)
    with pytest.raises(ConvergenceError, match="did NOT converge") as info:
        batched_cg(lambda V: V @ A, B, tol=1e-12, max_iter=3)
    assert info.value.report.iterations == 3 and not info.value.report.converged
    X, report = batched_cg(lambda V: V @ A, B, tol=1e-12, max_iter=3, on_failure="return")
    assert not report.converged and report.residuals.max() > 1e-12 and torch.isfinite(X).all()
    with pytest.raises(ConvergenceError, match="diverged"):
        lissa(lambda V: V @ A, B, scale=1.0, max_iter=100)


# ----------------------------------------------------------------------------- fused softmax-linear op
def autograd_softmax_linear_hvp(X, W, V):
    """Independent check: dense Hessian of the mean cross-entropy w.r.t. W (labels arbitrary)."""
    y = torch.zeros(X.shape[0], dtype=torch.long)
    H = torch.autograd.functional.hessian(lambda w: F.cross_entropy(X @ w.view_as(W).T, y), W.reshape(-1))
    return (V.reshape(V.shape[0], -1) @ H).view_as(V)


def random_slh(n, d, c, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64).to(dtype)
    W = (torch.randn(c, d, generator=g, dtype=F64) / d**0.5).to(dtype)
    V = torch.randn(k, c, d, generator=g, dtype=F64).to(dtype)
    return X, W, V


def test_softmax_linear_hvp_reference_matches_autograd():
    X, W, V = random_slh(9, 4, 3, 5, F64)
    assert_close(reference.softmax_linear_hvp(X, W, V), autograd_softmax_linear_hvp(X, W, V))


def test_softmax_linear_hvp_matches_module_hvp():
    X, W, V = random_slh(17, 6, 4, 3, F64, seed=2)
    model = torch.nn.Linear(6, 4, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(W)
    y = torch.randint(0, 4, (17,))
    assert_close(ops.softmax_linear_hvp(X, W, V).reshape(3, -1), hvp(F.cross_entropy, model, V.reshape(3, -1), (X, y)))


# (1000, 3, 301, 20): c + k (c - 1) = 6301 values per sample, so the C++ kernel takes blocks of 665 samples.
SIZES = [(1, 1, 1, 1), (255, 7, 3, 2), (257, 33, 10, 5), (130, 20, 301, 2), (1000, 3, 301, 20), (4097, 5, 2, 3),
         (1_000_003, 2, 2, 1)]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("size", SIZES)
def test_softmax_linear_hvp_backends(backend, dtype, size):
    X, W, V = random_slh(*size, dtype, seed=sum(size))
    expected = reference.softmax_linear_hvp(X.double(), W.double(), V.double())
    with use_backend(backend):
        out = ops.softmax_linear_hvp(X, W, V)
    assert out.shape == V.shape and out.dtype == dtype
    # Each output is a sum of n terms that cancel: rounding error grows like sqrt(n) times the
    # magnitude sum_i |r_ia| |x_id| / n, so atol is scaled by that (not by the cancelled result).
    assert_close(out, expected, dtype, scale=sum_magnitude(X, W, V) * X.shape[0] ** 0.5 + 1.0)


@pytest.mark.parametrize("size", [(255, 7, 3, 2), (1100, 33, 10, 5)])
def test_softmax_linear_hvp_cpp_without_onednn(size):
    """float32 GEMMs go to oneDNN when torch has it (csrc/cpu/gemm.h); with torch's oneDNN switch off
    they go to at::mm. Both must give the reference's numbers."""
    X, W, V = random_slh(*size, torch.float32, seed=3)
    expected = reference.softmax_linear_hvp(X.double(), W.double(), V.double())
    scale = sum_magnitude(X, W, V) * X.shape[0] ** 0.5 + 1.0
    with use_backend("cpp"):
        with torch.backends.mkldnn.flags(enabled=False):
            assert_close(ops.softmax_linear_hvp(X, W, V), expected, torch.float32, scale=scale)
        assert_close(ops.softmax_linear_hvp(X, W, V), expected, torch.float32, scale=scale)


def test_softmax_linear_hvp_cpp_repeated_calls_same_shapes():
    """New values in tensors of the same shapes (the GEMM library may cache per shape) give new results."""
    with use_backend("cpp"):
        for seed in range(3):
            X, W, V = random_slh(300, 16, 5, 4, torch.float32, seed=seed)
            expected = reference.softmax_linear_hvp(X.double(), W.double(), V.double())
            assert_close(ops.softmax_linear_hvp(X, W, V), expected, torch.float32, scale=sum_magnitude(X, W, V) * 300**0.5 + 1.0)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_softmax_linear_hvp_opcheck(backend):
    X, W, V = random_slh(33, 5, 4, 3, torch.float32)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.unlearn_fast.softmax_linear_hvp, (X, W, V))


def test_softmax_linear_hvp_bad_inputs():
    X, W, V = random_slh(8, 4, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="X must be"):
        ops.softmax_linear_hvp(X[0], W, V)
    with pytest.raises(ValueError, match="V must be"):
        ops.softmax_linear_hvp(X, W, V[:, :2])
    with pytest.raises(ValueError, match="W has 4 columns"):
        ops.softmax_linear_hvp(X[:, :3], W, V)
    with pytest.raises(ValueError, match="V dtype"):
        ops.softmax_linear_hvp(X, W, V.double())
    with pytest.raises(ValueError, match="float32 or float64"):
        ops.softmax_linear_hvp(X.half(), W.half(), V.half())


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("culprit,value", [("X", float("nan")), ("W", float("inf")), ("V", float("nan"))])
def test_softmax_linear_hvp_non_finite_inputs_are_named(backend, culprit, value):
    tensors = dict(zip("XWV", random_slh(40, 4, 3, 2, torch.float32)))
    tensors[culprit].view(-1)[5] = value
    with use_backend(backend), pytest.raises(ValueError, match=f"{culprit} contains NaN or Inf"):
        ops.softmax_linear_hvp(*tensors.values())
    X, W, V = random_slh(40, 4, 3, 2, torch.float32)
    with use_backend(backend), pytest.raises(RuntimeError, match="overflowed"):
        ops.softmax_linear_hvp(X * 1e20, W / 1e20, V * 1e20)  # same logits, products past float32


# ----------------------------------------------------------------------------- influence
def test_influence_matches_dense_formula():
    from unlearn_fast.influence import influence, per_sample_gradients, self_influence

    model, train = small_mlp(3), small_batch(12, seed=5)
    test = small_batch(4, seed=9)
    H = dense_hessian(model, F.cross_entropy, train) + 0.3 * torch.eye(43, dtype=F64)
    grads = torch.stack([torch.func.grad(flat_loss(model, F.cross_entropy, (x[None], y[None])))(flat_params(model)) for x, y in zip(*train)])
    g_test = torch.func.grad(flat_loss(model, F.cross_entropy, test))(flat_params(model))
    assert_close(per_sample_gradients(F.cross_entropy, model, train, chunk_size=5), grads)
    expected = -grads @ torch.linalg.solve(H, g_test)
    assert_close(influence(F.cross_entropy, model, train, test, damping=0.3, tol=1e-12), expected, scale=1e2)
    test_grads = torch.stack([torch.func.grad(flat_loss(model, F.cross_entropy, (x[None], y[None])))(flat_params(model)) for x, y in zip(*test)])
    per_test = influence(F.cross_entropy, model, train, test, damping=0.3, per_test=True, tol=1e-12)
    assert_close(per_test, -test_grads @ torch.linalg.solve(H, grads.T), scale=1e2)
    expected_self = (grads * torch.linalg.solve(H, grads.T).T).sum(1)
    assert_close(self_influence(F.cross_entropy, model, train, damping=0.3, vectors_per_solve=5, tol=1e-12), expected_self, scale=1e2)


def test_tracin_and_random_projection():
    from unlearn_fast.influence import random_projection, tracin, tracin_self_influence

    g = torch.Generator().manual_seed(0)
    train = [torch.randn(6, 5000, generator=g, dtype=F64) for _ in range(2)]
    test = [torch.randn(3, 5000, generator=g, dtype=F64) for _ in range(2)]
    expected = 0.1 * test[0] @ train[0].T + 0.05 * test[1] @ train[1].T
    assert_close(tracin(train, test, [0.1, 0.05]), expected)
    assert_close(tracin_self_influence(train, [0.1, 0.05]), 0.1 * train[0].pow(2).sum(1) + 0.05 * train[1].pow(2).sum(1))
    # Same seed -> same projection; Gram matrix kept to within JL error (relative to the norms).
    P1, P2 = random_projection(train[0], 2048, seed=3), random_projection(train[0], 2048, seed=3, block=1000)
    assert_close(P1, random_projection(train[0], 2048, seed=3))
    gram, projected = train[0] @ train[0].T, P1 @ P1.T
    assert (projected - gram).abs().max() < 0.15 * gram.diagonal().max()
    assert P2.shape == (6, 2048)
    with pytest.raises(ValueError, match="checkpoints"):
        tracin(train, test[:1])
    poisoned = [train[0].clone(), train[1]]
    poisoned[0][4, 17] = float("nan")
    with pytest.raises(ValueError, match=r"tracin: train_grads\[0\] hold NaN or Inf \(rows \[4\]\)"):
        tracin(poisoned, test)
    with pytest.raises(ValueError, match=r"tracin: test_grads\[1\] hold NaN"):
        tracin(train, [test[0], test[1] / 0.0 * 0.0])
    with pytest.raises(ValueError, match=r"tracin_self_influence: train_grads\[0\] hold NaN"):
        tracin_self_influence(poisoned)
    with pytest.raises(ValueError, match="random_projection: grads hold NaN"):
        random_projection(poisoned[0], 16)
    with pytest.raises(ValueError, match=r"random_projection: grads must be \(n, p\)"):
        random_projection(train[0][0], 16)


# ----------------------------------------------------------------------------- method="newton"
def _fit_logistic(X, y, lam, init=None):
    """L2 multinomial logistic regression trained to convergence (LBFGS, float64)."""
    model = torch.nn.Linear(X.shape[1], 10).to(F64)
    if init is not None:
        model.load_state_dict(init.state_dict())
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + lam / 2 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return model


def test_newton_removal_lands_near_retrained_optimum():
    from sklearn.datasets import load_digits

    from unlearn_fast.unlearn import unlearn

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=F64)
    X = (X - X.mean(0)) / (X.std(0) + 1.0)
    y = torch.tensor(digits.target)
    lam = 1e-3
    train_set = torch.utils.data.TensorDataset(X, y)
    original = _fit_logistic(X, y, lam)
    forget = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: len(y) // 100]
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[forget] = False
    retrained = _fit_logistic(X[keep], y[keep], lam, init=original)
    result = unlearn(original, None, forget, train_set, F.cross_entropy, method="newton", weight_decay=lam, tol=1e-10, max_iter=500)

    def flat(m):
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    gap = (flat(original) - flat(retrained)).norm()
    assert gap > 1e-3  # the removal moves the optimum
    assert (flat(result.model) - flat(retrained)).norm() <= 0.05 * gap
    assert result.stats["method"] == "newton" and result.stats["residuals"][0] <= 1e-10
    # A second Newton step (on the retained gradient) gets closer still; noise moves it by about noise * sqrt(p).
    two = unlearn(original, None, forget, train_set, F.cross_entropy, method="newton", weight_decay=lam, steps=2, tol=1e-10, max_iter=500)
    assert (flat(two.model) - flat(retrained)).norm() <= (flat(result.model) - flat(retrained)).norm()
    assert two.stats["retained_gradient_norm"] < 1e-2 * result.stats["retained_gradient_norm"]
    noisy = unlearn(original, None, forget, train_set, F.cross_entropy, method="newton", weight_decay=lam, noise=1e-3, tol=1e-10, max_iter=500)
    moved = (flat(noisy.model) - flat(result.model)).norm() / (650 ** 0.5)
    assert 0.8e-3 < moved < 1.2e-3
    with pytest.raises(ValueError, match="steps"):
        unlearn(original, None, forget, train_set, F.cross_entropy, method="newton", steps=0)
    # A float32 model with the default options: CG stops at 1e-6 (float32 products stall near 1e-7) and the
    # step is as good as in float64.
    single = unlearn(copy.deepcopy(original).float(), None, forget, torch.utils.data.TensorDataset(X.float(), y),
                     F.cross_entropy, method="newton", weight_decay=lam)
    assert single.stats["residuals"][0] <= 1e-6
    assert (flat(single.model).double() - flat(retrained)).norm() <= 0.05 * gap


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("size", SIZES + [(300, 20, 1000, 2)])
def test_softmax_linear_hvp_cuda(dtype, size):
    from unlearn_fast.backends import _load

    reason = _load("cuda")[2]
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUDA backend is not: {reason}")
    X, W, V = random_slh(*size, dtype, seed=sum(size))
    expected = reference.softmax_linear_hvp(X.double(), W.double(), V.double())
    with use_backend("cuda"):
        out = ops.softmax_linear_hvp(X.cuda(), W.cuda(), V.cuda())
        torch.library.opcheck(torch.ops.unlearn_fast.softmax_linear_hvp, (X[:64].cuda(), W.cuda(), V.cuda()))
    assert_close(out.cpu(), expected, dtype, scale=sum_magnitude(X, W, V) * X.shape[0] ** 0.5 + 1.0)
