"""Batched Hessian-vector products and inverse-HVP solvers for any nn.Module (see docs/hvp.md).

hvp(loss_fn, model, vectors, batch) returns H v_j for k vectors at once, H the Hessian (or the
Gauss-Newton matrix) of the mean loss loss_fn(model(inputs), targets) over batch = (inputs, targets)
with respect to the trainable parameters. The forward pass and the first backward pass are shared
by all k vectors: torch.func.vjp of the gradient runs them once and keeps the graph, through which vmap
pushes the k vectors (forward-over-reverse: vmap of jvp of the gradient, where only tangents are batched).
ihvp solves (H + damping I) x_j = v_j for all j with batched conjugate gradients or LiSSA and
reports how far it got.
"""
import contextlib
import dataclasses
import math

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from . import ops

MODES = ("rev-rev", "fwd-rev")
KINDS = ("hessian", "ggn")
SOLVERS = ("cg", "lissa")


class ConvergenceError(RuntimeError):
    """An inverse-HVP solver stopped before reaching its tolerance; `.report` says how far it got."""

    def __init__(self, message, report):
        super().__init__(message)
        self.report = report


@contextlib.contextmanager
def transformable_kernels():
    """Kernels with forward-mode AD and batching rules inside the torch.func transforms: scaled dot-product attention
    on its math path (the fused CPU/CUDA kernels, flash and memory-efficient, have neither), and nn.MultiheadAttention /
    TransformerEncoderLayer's fused fast path off (eval mode, where the curvature products run, would take it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


# ----------------------------------------------------------------------------- parameters and vectors
def parameter_paths(model):
    """[(path, name)]: every path by which a module attribute holding a parameter or buffer is reached, each
    (module, attribute) once, with the name model.named_parameters() / named_buffers() gives that tensor. None where
    every tensor is reached by one path only (most models): call_with then calls functional_call as it is."""
    names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    seen, paths, reached = set(), [], 0
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            reached += 1
            if (id(module), attr) not in seen:
                seen.add((id(module), attr))
                paths.append((f"{prefix}.{attr}" if prefix else attr, names[id(t)]))
    return None if reached == len(paths) == len(names) else paths


def call_with(model, paths, values, args=(), kwargs=None):
    """torch.func.functional_call(model, values, args, kwargs), `values` keyed by named_parameters() / named_buffers()
    names, `paths` from parameter_paths(model). Where a submodule is registered under two names (self.b = self.a),
    functional_call's tie_weights leaves plain tensors in the module after the call (torch 2.13): the caller's model
    loses its Parameters. So each module attribute gets its value under a path of its own, and tie_weights is off: a
    parameter shared by two modules (a tied embedding and output layer) is passed under each module's path."""
    if paths is None:
        return functional_call(model, values, args, kwargs)
    return functional_call(model, {path: values[name] for path, name in paths if name in values}, args, kwargs, tie_weights=False)


@dataclasses.dataclass
class Problem:
    """A loss as a function of the trainable parameters (a tuple of tensors, in `names` order)."""

    names: list
    primals: tuple
    loss_of: object  # (primals, batch) -> scalar loss
    output_of: object = None  # (primals, inputs) -> model outputs; Modules only (for kind="ggn")
    loss_of_output: object = None  # (outputs, targets) -> scalar loss
    softmax_linear: bool = False  # an nn.Linear under plain cross-entropy: products can use the fused op

    @property
    def numel(self):
        return sum(p.numel() for p in self.primals)


def _check_scalar(loss, where="loss_fn"):
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"{where} must return a scalar (0-dim) tensor, the mean loss; got {shape}")
    if not loss.dtype.is_floating_point:
        raise ValueError(f"{where} must return a floating-point loss, got {loss.dtype}")
    return loss


def make_problem(loss_fn, model_or_params, op="hvp"):
    """Module: loss_fn(model(inputs), targets). Dict of tensors: loss_fn(params_dict, batch)."""
    if isinstance(model_or_params, torch.nn.Module):
        model = model_or_params
        _check_training_mode_layers(model, op)
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError(f"{op}: model_or_params has no trainable parameters (none with requires_grad=True)")
        frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
        buffers = dict(model.named_buffers())
        names = list(trainable)
        paths = parameter_paths(model)

        def output_of(primals, inputs):
            return call_with(model, paths, {**frozen, **buffers, **dict(zip(names, primals))}, (inputs,))

        def loss_of_output(outputs, targets):
            return _check_scalar(loss_fn(outputs, targets))

        def loss_of(primals, batch):
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"{op}: batch must be a pair (inputs, targets) for an nn.Module, got {type(batch).__name__}")
            inputs, targets = batch
            return loss_of_output(output_of(primals, inputs), targets)

        primals = tuple(trainable[name].detach() for name in names)
        return Problem(names, primals, loss_of, output_of, loss_of_output, is_softmax_linear(model, loss_fn, names))
    if isinstance(model_or_params, dict):
        if not model_or_params:
            raise ValueError(f"{op}: model_or_params is an empty dict; there are no parameters to differentiate")
        for name, t in model_or_params.items():
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise ValueError(f"{op}: parameter {name!r} of model_or_params must be a floating-point tensor")
        names = list(model_or_params)

        def loss_of(primals, batch):
            return _check_scalar(loss_fn(dict(zip(names, primals)), batch))

        return Problem(names, tuple(model_or_params[n].detach() for n in names), loss_of)
    raise ValueError(f"{op}: model_or_params must be an nn.Module or a dict of parameter tensors, got {type(model_or_params).__name__}")


def _check_training_mode_layers(model, op):
    """Layers whose training-mode forward has no single Hessian: batch norm updates its stored running
    statistics in place (torch.func refuses, and they must not change); dropout draws a new mask per pass."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            raise ValueError(
                f"{op}: model_or_params has {type(module).__name__} {name!r} in training mode, which updates its running "
                "statistics in every forward pass; call model.eval() (running statistics) or build it with "
                "track_running_stats=False (batch statistics)"
            )
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ValueError(
                f"{op}: model_or_params has {type(module).__name__} {name!r} (p = {module.p}) in training mode: each "
                "forward pass draws a new mask, so the loss has no single Hessian; call model.eval()"
            )


def is_softmax_linear(model, loss_fn, names):
    """A bare nn.Linear, all of it trainable, under plain mean cross-entropy: the structure of the fused op."""
    if type(model) is not torch.nn.Linear or names != [name for name, _ in model.named_parameters()]:
        return False
    if loss_fn is torch.nn.functional.cross_entropy:
        return True
    return (type(loss_fn) is torch.nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean"
            and loss_fn.label_smoothing == 0.0 and loss_fn.ignore_index == -100)


def _non_finite_rows(V):
    """The first (up to 10) rows of a (k, p) tensor that hold NaN or Inf."""
    return torch.nonzero(~torch.isfinite(V).all(dim=1)).reshape(-1)[:10].tolist()


def _finite_rows_or_raise(V, what):
    """NaN or Inf in V would pass for converged (a NaN residual is not above tol) or spread silently."""
    rows = _non_finite_rows(V)
    if rows:
        raise ValueError(f"{what} hold NaN or Inf (rows {rows})")


def _to_flat(problem, vectors, op):
    """vectors -> ((k, p) tensor, how to give results back)."""
    ref = problem.primals[0]
    p = problem.numel
    if isinstance(vectors, torch.Tensor):
        if vectors.dim() not in (1, 2) or vectors.shape[-1] != p:
            raise ValueError(f"{op}: vectors must be (k, {p}) or ({p},) (trainable parameters in named_parameters order), got shape {tuple(vectors.shape)}")
        if vectors.dtype != ref.dtype:
            raise ValueError(f"{op}: vectors dtype {vectors.dtype} differs from the parameters' dtype {ref.dtype}")
        if vectors.device != ref.device:
            raise ValueError(f"{op}: vectors are on {vectors.device}, the parameters on {ref.device}")
        if vectors.dim() == 2 and vectors.shape[0] == 0:
            raise ValueError(f"{op}: vectors holds no vectors (k = 0)")
        flat = vectors.reshape(-1, p)
        _finite_rows_or_raise(flat, f"{op}: vectors")
        return flat, ("flat1" if vectors.dim() == 1 else "flat")
    if isinstance(vectors, dict):
        if set(vectors) != set(problem.names):
            missing, extra = set(problem.names) - set(vectors), set(vectors) - set(problem.names)
            raise ValueError(f"{op}: vectors keys must be the trainable parameter names; missing {sorted(missing)}, unexpected {sorted(extra)}")
        ks = {vectors[n].shape[0] if vectors[n].dim() else None for n in problem.names}
        if len(ks) != 1 or None in ks or 0 in ks:
            raise ValueError(f"{op}: every tensor in vectors needs the same non-zero leading k; got {sorted(map(str, ks))}")
        (k,) = ks
        parts = []
        for name, prim in zip(problem.names, problem.primals):
            v = vectors[name]
            if tuple(v.shape[1:]) != tuple(prim.shape):
                raise ValueError(f"{op}: vectors[{name!r}] must be (k, *{tuple(prim.shape)}), got {tuple(v.shape)}")
            if v.dtype != prim.dtype or v.device != prim.device:
                raise ValueError(f"{op}: vectors[{name!r}] is {v.dtype} on {v.device}, the parameter is {prim.dtype} on {prim.device}")
            parts.append(v.reshape(k, -1))
        flat = torch.cat(parts, dim=1)
        _finite_rows_or_raise(flat, f"{op}: vectors")
        return flat, "dict"
    raise ValueError(f"{op}: vectors must be a (k, p) tensor or a dict of parameter-shaped tensors, got {type(vectors).__name__}")


def _from_flat(problem, flat, form):
    if form == "flat1":
        return flat[0]
    if form == "flat":
        return flat
    return dict(zip(problem.names, _split(problem, flat)))


def _split(problem, flat):
    """(k, p) -> tuple of (k, *param.shape) views."""
    parts, start = [], 0
    for prim in problem.primals:
        parts.append(flat[:, start : start + prim.numel()].reshape(flat.shape[0], *prim.shape))
        start += prim.numel()
    return tuple(parts)


def _cat(parts, k):
    return torch.cat([t.reshape(k, -1) for t in parts], dim=1)


def _data_chunks(batch, data_chunk_size, op):
    """[(weight, sub-batch)]: the mean loss over batch is the weighted sum of the chunks' mean losses."""
    if data_chunk_size is None:
        return [(1.0, batch)]
    if not (isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch)):
        raise ValueError(f"{op}: data_chunk_size needs batch to be a tuple of tensors sharing their first dimension")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch) or n == 0:
        raise ValueError(f"{op}: the tensors of batch must share a non-zero first dimension, got {[tuple(t.shape) for t in batch]}")
    if data_chunk_size < 1:
        raise ValueError(f"{op}: data_chunk_size must be >= 1, got {data_chunk_size}")
    return [(min(data_chunk_size, n - s) / n, type(batch)(t[s : s + data_chunk_size] for t in batch)) for s in range(0, n, data_chunk_size)]


def mean_gradient(problem, batch, data_chunk_size=None, op="mean_gradient"):
    """(p,) gradient of the mean loss over batch, summed over data chunks weighted by their size."""
    total = None
    for weight, sub in _data_chunks(batch, data_chunk_size, op):
        g = grad(lambda prims: problem.loss_of(prims, sub))(problem.primals)
        part = _cat(tuple(t[None] for t in g), 1)[0] * weight
        total = part if total is None else total + part
    return total


# ----------------------------------------------------------------------------- the batched product
def _hessian_map(problem, batch, mode):
    """The linear map v -> H v on one data chunk, vmapped over a leading k; forward and first backward run here, once."""
    loss_grad = grad(lambda prims: problem.loss_of(prims, batch))
    if mode == "rev-rev":
        # H is symmetric, so the vector-Jacobian product of the gradient map is H v.
        _, pull = vjp(loss_grad, problem.primals)
        return vmap(lambda *v: pull(v)[0])
    # Forward-over-reverse: inside vmap only the tangents carry the batch dimension, so the primal
    # forward and backward run once per call for all k vectors (torch.func.linearize, which would
    # also reuse them across calls, costs more in tracing than it saves here: see the benchmark).
    return vmap(lambda *v: jvp(loss_grad, (problem.primals,), (v,))[1])


def _softmax_linear_map(problem, batch):
    """v -> H v through the fused op softmax_linear_hvp, or None where the batch does not fit its structure.

    For a linear layer under softmax cross-entropy the Hessian and the Gauss-Newton matrix are the same
    matrix, and neither depends on the labels, so one map serves every mode and kind. A bias is a ones
    column appended to the inputs. Soft (probability) targets, or labels at ignore_index (-100), change
    the loss's weighting per sample, and labels out of range must raise: those go the generic way.
    """
    inputs, targets = batch
    weight = problem.primals[0]
    if not (isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.dtype == weight.dtype
            and inputs.dtype in (torch.float32, torch.float64) and isinstance(targets, torch.Tensor)
            and targets.dim() == 1 and not targets.dtype.is_floating_point
            and bool(((targets >= 0) & (targets < weight.shape[0])).all())):  # else the generic path raises
        return None
    has_bias = len(problem.primals) == 2
    X, W = inputs.detach(), weight
    if has_bias:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        W = torch.cat([W, problem.primals[1][:, None]], dim=1)

    def products(*v):  # (k, c, d) [, (k, c)] -> the same
        V = torch.cat([v[0], v[1][..., None]], dim=2) if has_bias else v[0]
        HV = ops.softmax_linear_hvp(X, W, V)
        return (HV[..., :-1], HV[..., -1]) if has_bias else (HV,)

    products.fused = True
    return products


def _ggn_map(problem, batch, mode):
    """v -> J' H_L J v: J the Jacobian of the model outputs, H_L the Hessian of the loss in the outputs."""
    if problem.output_of is None:
        raise ValueError("hvp: kind='ggn' needs an nn.Module (model outputs), not a dict of parameters")
    inputs, targets = batch
    outputs_of = lambda prims: problem.output_of(prims, inputs)
    outputs, pull_outputs = vjp(outputs_of, problem.primals)
    if mode == "rev-rev":
        # J v as the transpose of the saved pullback (a vjp of the vjp): no new forward pass.
        zeros = torch.zeros_like(outputs)
        _, pull_transpose = vjp(lambda u: pull_outputs(u)[0], zeros)
        push_outputs = lambda *v: pull_transpose(v)[0]
    else:
        push_outputs = lambda *v: jvp(outputs_of, (problem.primals,), (v,))[1]
    _, pull_loss = vjp(grad(lambda out: problem.loss_of_output(out, targets)), outputs.detach())
    push_all, pull_loss_all = vmap(push_outputs), vmap(lambda u: pull_loss(u)[0])
    pull_all = vmap(lambda u: pull_outputs(u)[0])
    return lambda *v: pull_all(pull_loss_all(push_all(*v)))


# Vectors per vmapped pass by default. The batched second pass holds chunk x activations; on the
# 793k-parameter MLP of benchmarks/bench_hvp.py, 8 at a time ran 1.17-1.41x faster than all 32 at once
# (cache), and on a 20-10 toy it cost 0.5 ms. None pushes all k vectors in one pass.
DEFAULT_CHUNK_SIZE = 8


def flat_products(problem, batch, V, mode="rev-rev", kind="hessian", chunk_size=DEFAULT_CHUNK_SIZE, data_chunk_size=None, op="hvp", cache=None):
    """(k, p) -> (k, p): H V' row by row, chunked over k (chunk_size) and over the data (data_chunk_size).

    cache: a dict that keeps each data chunk's linear map (its saved forward/backward graph) for later
    calls at the same parameters, as the iterative solvers make; None rebuilds it every call.
    """
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {KINDS}, got {kind!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be >= 1 or None, got {chunk_size}")
    build = _hessian_map if kind == "hessian" else _ggn_map
    k = V.shape[0]
    out = torch.zeros_like(V)
    for index, (weight, sub) in enumerate(_data_chunks(batch, data_chunk_size, op)):
        linear_map = cache.get(index) if cache is not None else None
        if linear_map is None:
            linear_map = (problem.softmax_linear and _softmax_linear_map(problem, sub)) or build(problem, sub, mode)
            if cache is not None:
                cache[index] = linear_map
        # The fused op blocks its own workspace, and one call shares its logits among all k vectors.
        step = k if getattr(linear_map, "fused", False) else chunk_size or k
        for s in range(0, k, step):
            hv = linear_map(*_split(problem, V[s : s + step]))
            out[s : s + step].add_(_cat(hv, hv[0].shape[0]), alpha=weight)
    rows = _non_finite_rows(out)
    if rows:
        raise RuntimeError(f"{op}: the {kind} vector product is not finite (NaN or Inf) for vectors {rows}; check the parameters and the batch for NaN/Inf")
    return out


def hvp(loss_fn, model_or_params, vectors, batch, mode="rev-rev", kind="hessian", chunk_size=DEFAULT_CHUNK_SIZE, data_chunk_size=None):
    """H v_j for k vectors at once, H the Hessian of the mean loss over batch w.r.t. the trainable parameters.

    model_or_params: an nn.Module (loss = loss_fn(model(inputs), targets), batch = (inputs, targets)) or a
    dict name -> tensor (loss = loss_fn(params_dict, batch)). vectors: a (k, p) or (p,) tensor, parameters
    flattened in named_parameters order, or a dict name -> (k, *param.shape); the result has the same form.
    mode: "rev-rev" (vjp of the gradient, graph kept) or "fwd-rev" (vmap of jvp of the gradient).
    kind: "hessian" or "ggn" (Gauss-Newton J' H_L J; Modules only).
    chunk_size: vectors per pass (memory grows with it; None: all at once); data_chunk_size: samples per pass, valid when
    the loss is a mean over samples (chunk results are weighted by chunk size).
    """
    problem = make_problem(loss_fn, model_or_params, "hvp")
    V, form = _to_flat(problem, vectors, "hvp")
    return _from_flat(problem, flat_products(problem, batch, V, mode, kind, chunk_size, data_chunk_size), form)


# ----------------------------------------------------------------------------- inverse HVP
@dataclasses.dataclass
class SolveReport:
    """How an inverse-HVP solve went. residuals: final |(H + damping I) x_j - v_j| / |v_j| per vector."""

    solver: str
    converged: bool
    iterations: int
    matvecs: int
    residuals: torch.Tensor
    history: list  # the largest relative residual after each iteration
    tol: float
    damping: float
    scale: float = None  # LiSSA only

    def __str__(self):
        state = "converged" if self.converged else "did NOT converge"
        return (
            f"{self.solver} {state} after {self.iterations} iterations ({self.matvecs} vector products): "
            f"max relative residual {float(self.residuals.max()):.3e} (tol {self.tol:g}, damping {self.damping:g})"
        )


def _finite_or_raise(t, solver, iteration):
    if not bool(torch.isfinite(t).all()):
        raise RuntimeError(f"ihvp ({solver}): the Hessian-vector product returned NaN or Inf at iteration {iteration}")


def _finish(report, on_failure):
    if not report.converged:
        if on_failure == "raise":
            raise ConvergenceError(f"ihvp: {report}; raise max_iter, damping or tol, or pass on_failure='return'", report)
    return report


def batched_cg(matvec, B, damping=0.0, tol=1e-6, max_iter=100, on_failure="raise"):
    """Solve (A + damping I) x_j = b_j for every row of B (k, p) by conjugate gradients, all at once.

    Each vector runs its own CG recurrence; the k recurrences share every call matvec(P) (one batched
    product per iteration). Converged vectors drop out of the batch. When all recurrences report
    convergence the true residual is recomputed and CG restarts from it for any vector it does not
    confirm. Returns (X, SolveReport). Curvature p'(A + damping I)p <= 0 raises: A must be PSD.
    """
    _finite_rows_or_raise(B, "ihvp (cg): right-hand sides")
    k = B.shape[0]
    X = torch.zeros_like(B)
    b_norm = torch.linalg.vector_norm(B, dim=1)
    safe_norm = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    R = B.clone()
    rel = torch.linalg.vector_norm(R, dim=1) / safe_norm
    active = torch.nonzero(rel > tol).reshape(-1)
    P = R[active].clone()
    rs = (P * P).sum(1)
    history, matvecs, iteration = [], 0, 0
    while active.numel() and iteration < max_iter:
        iteration += 1
        AP = matvec(P) + damping * P
        matvecs += active.numel()
        _finite_or_raise(AP, "cg", iteration)
        curvature = (P * AP).sum(1)
        if bool((curvature <= 0).any()):
            j = int(active[torch.nonzero(curvature <= 0)[0]])
            raise RuntimeError(
                f"ihvp (cg): curvature p'(H + damping I)p = {float(curvature.min()):.3e} <= 0 at iteration {iteration} "
                f"(vector {j}); H + damping I is not positive definite, increase damping"
            )
        alpha = rs / curvature
        X[active] += alpha[:, None] * P
        R_active = R[active] - alpha[:, None] * AP
        R[active] = R_active
        rs_new = (R_active * R_active).sum(1)
        rel[active] = rs_new.sqrt() / safe_norm[active]
        history.append(float(rel.max()))
        keep = rel[active] > tol
        if not bool(keep.any()):
            # Every recurrence says converged: confirm with the true residual, restart where it disagrees.
            R = B - (matvec(X) + damping * X)
            matvecs += k
            rel = torch.linalg.vector_norm(R, dim=1) / safe_norm
            active = torch.nonzero(rel > tol).reshape(-1)
            P = R[active].clone()
            rs = (P * P).sum(1)
            continue
        P = R_active[keep] + (rs_new / rs)[keep, None] * P[keep]
        rs = rs_new[keep]
        active = active[keep]
    converged = active.numel() == 0
    report = SolveReport("cg", converged, iteration, matvecs, rel, history, tol, damping)
    return X, _finish(report, on_failure)


def largest_eigenvalue(matvec, p, dtype, device, iterations=20, seed=0):
    """Power-iteration estimate of the largest eigenvalue of a PSD operator (for LiSSA's scale)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(1, p, generator=gen, dtype=dtype).to(device)
    v /= torch.linalg.vector_norm(v)
    value = 0.0
    for i in range(iterations):
        Av = matvec(v)
        _finite_or_raise(Av, "lissa scale estimate", i + 1)
        value = float(torch.linalg.vector_norm(Av))
        if value == 0.0:
            break
        v = Av / value
    return value


def lissa(matvec, B, damping=0.0, scale=None, tol=1e-6, max_iter=1000, on_failure="raise"):
    """Solve (A + damping I) x_j = b_j by LiSSA's recursion h <- b + h - (A h + damping h) / scale, x = h / scale.

    Written for x directly: x <- x + r / scale with r = b - (A + damping I) x, so the residual (and the
    convergence check) comes with every product. Converges when 0 < eig(A + damping I) < 2 scale;
    scale defaults to 1.05 times a power-iteration estimate of the largest eigenvalue. Returns (X, SolveReport).
    """
    _finite_rows_or_raise(B, "ihvp (lissa): right-hand sides")
    k, p = B.shape
    if scale is None:
        scale = 1.05 * (largest_eigenvalue(matvec, p, B.dtype, B.device) + damping)
        scale = scale if scale > 0 else 1.0
    if scale <= 0:
        raise ValueError(f"ihvp (lissa): scale must be positive, got {scale}")
    b_norm = torch.linalg.vector_norm(B, dim=1)
    safe_norm = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    X = torch.zeros_like(B)
    R = B.clone()
    rel = torch.linalg.vector_norm(R, dim=1) / safe_norm
    history, iteration, matvecs = [], 0, 0
    while iteration < max_iter and bool((rel > tol).any()):
        iteration += 1
        X += R / scale
        AX = matvec(X) + damping * X
        matvecs += k
        _finite_or_raise(AX, "lissa", iteration)
        R = B - AX
        rel = torch.linalg.vector_norm(R, dim=1) / safe_norm
        history.append(float(rel.max()))
        if history[-1] > 1e6 or not math.isfinite(history[-1]):
            report = SolveReport("lissa", False, iteration, matvecs, rel, history, tol, damping, scale)
            raise ConvergenceError(f"ihvp (lissa): diverged at iteration {iteration} (relative residual {history[-1]:.3e}); scale {scale:g} is too small", report)
    report = SolveReport("lissa", bool((rel <= tol).all()), iteration, matvecs, rel, history, tol, damping, scale)
    return X, _finish(report, on_failure)


def ihvp(
    loss_fn,
    model_or_params,
    vectors,
    batch,
    solver="cg",
    damping=0.0,
    tol=1e-6,
    max_iter=None,
    scale=None,
    on_failure="raise",
    mode="rev-rev",
    kind="hessian",
    chunk_size=DEFAULT_CHUNK_SIZE,
    data_chunk_size=None,
):
    """(H + damping I)^-1 v_j for k vectors at once -> (solution in the form of vectors, SolveReport).

    Same model_or_params, vectors, batch, mode, kind and chunking as hvp. solver: "cg" (batched conjugate
    gradients, default max_iter 100) or "lissa" (default max_iter 1000, scale from power iteration).
    Stops when every |(H + damping I) x_j - v_j| <= tol |v_j|. A solve that does not get there raises
    ConvergenceError (with .report) unless on_failure="return", which returns the iterate and the report
    (report.converged False).
    """
    if solver not in SOLVERS:
        raise ValueError(f"ihvp: solver must be one of {SOLVERS}, got {solver!r}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"ihvp: damping must be a finite number >= 0, got {damping!r}")
    if not (tol > 0):
        raise ValueError(f"ihvp: tol must be positive, got {tol!r}")
    if on_failure not in ("raise", "return"):
        raise ValueError(f"ihvp: on_failure must be 'raise' or 'return', got {on_failure!r}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"ihvp: max_iter must be >= 1, got {max_iter}")
    problem = make_problem(loss_fn, model_or_params, "ihvp")
    B, form = _to_flat(problem, vectors, "ihvp")

    # The parameters stay fixed during a solve: keep the saved graphs unless the data is chunked to save memory.
    cache = {} if data_chunk_size is None else None

    def matvec(V):
        return flat_products(problem, batch, V, mode, kind, chunk_size, data_chunk_size, op="ihvp", cache=cache)

    if solver == "cg":
        X, report = batched_cg(matvec, B, damping, tol, max_iter or 100, on_failure)
    else:
        X, report = lissa(matvec, B, damping, scale, tol, max_iter or 1000, on_failure)
    return _from_flat(problem, X, form), report
