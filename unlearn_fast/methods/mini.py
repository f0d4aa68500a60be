"""Mini-Unlearning (our reconstruction; derivation and measurements in docs/mini_unlearning.md).

Minimal history (the "summary" section, written once when training ends), nothing per step:
  w*      the final parameters (the model itself),
  g*      the full-data mean loss gradient at w*,
  U, Lam  the top-k eigenpairs of the full-data Gauss-Newton matrix G(w*) (randomized subspace
          iteration with batched GGN-vector products),
  tau     the sum of the learning rates (the schedule's "training time").
H_hat = U diag(Lam) U' + Lam_k (I - U U') models the loss curvature and A = H_hat + lam I.

Removing R (r of n samples) adds d(w) = r (grad L(w) - mean_R grad l_i(w)) / (n - r) to the gradient of
the training objective. Gradient flow run for time tau responds to a constant gradient change d with
the shift -Phi d, Phi = (I - exp(-tau A)) A^-1 (= A^-1 once training has converged), so we solve
  w = T(w) = w* - Phi d(w),   d(w) = (r (g* + H_hat (w - w*)) - sum_R grad l_i(w)) / (n - r),
with the forget-set gradients EXACT at the current w (one batched pass over R per iteration: the only
data touched). The Jacobian of T is Phi (sum_R H_i - r H_hat) / (n - r): small when the forget set's
curvature is close to its share of the total, so T contracts even at 30 % deletion. The observed
residual ratio q estimates the contraction factor, and |w - w_fix| <= |T(w) - w| / (1 - q) is both
the reported error bound and the stopping rule.
"""
import math

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..history import EncodedRows, fetch, flat_grads, flat_params, set_flat_params
from ._common import batch_loss, check_history


# ----------------------------------------------------------------------------- recording side
def _chunks(n, size):
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def _ggn_matmul(model, loss_fn, batch, w, V):
    """G V for the chunk's mean loss: J' H_out J V, batched over the rows of V (k, p)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    sizes = [math.prod(s) for s in shapes]
    x, y = batch

    def outputs(flat):
        params = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(model, params, (x,))

    out, pullback = vjp(outputs, w)
    loss_grad = grad(lambda o: loss_fn(o, y))

    def one(v):
        _, Jv = jvp(outputs, (w,), (v,))
        _, HJv = jvp(loss_grad, (out,), (Jv,))
        return pullback(HJv)[0]

    return vmap(one)(V)


def _full_ggn_matmul(model, loss_fn, train_set, w, V, batch_size):
    n = len(train_set)
    total = torch.zeros_like(V)
    for idx in _chunks(n, batch_size):
        total += _ggn_matmul(model, loss_fn, fetch(train_set, idx), w, V) * (idx.numel() / n)
    return total


def summary_rank(policy, p, steps):
    return min(p, policy.rank if policy.rank is not None else max(16, steps // 6))


def final_summary(model, train_set, loss_fn, policy, steps, batch_size=1024, power_iterations=2, oversample=8, seed=0):
    """g* and the top-k GGN eigenpairs at the model's current parameters (see module docstring)."""
    w = flat_params(model).clone()
    p, n = w.numel(), len(train_set)
    g_star = torch.zeros_like(w)
    saved_grads = [q.grad for q in model.parameters()]  # the trainer's .grad is put back afterwards
    for idx in _chunks(n, batch_size):
        model.zero_grad(set_to_none=True)
        batch_loss(model, loss_fn, fetch(train_set, idx)).backward()
        g_star += flat_grads(model) * (idx.numel() / n)
    for q, g in zip(model.parameters(), saved_grads):
        q.grad = g
    k = summary_rank(policy, p, steps)
    width = min(k + oversample, p)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(p, width, generator=gen, dtype=w.dtype)).Q
    G = lambda M: _full_ggn_matmul(model, loss_fn, train_set, w, M.T.contiguous(), batch_size).T  # noqa: E731
    for _ in range(power_iterations):
        Q = torch.linalg.qr(G(Q)).Q
    GQ = G(Q)
    evals, evecs = torch.linalg.eigh(Q.T @ GQ)
    order = torch.argsort(evals, descending=True)[:k]
    lam, U = evals[order].clamp(min=0), Q @ evecs[:, order]
    return {
        "w_star": w,
        "g_star": g_star,
        "eigvecs": EncodedRows.encode(U.T.contiguous(), policy.codec, policy.blocksize),
        "eigvals": lam,
    }


# ----------------------------------------------------------------------------- unlearning side
def sgd_settings(meta, method):
    """(weight decay, learning-rate multiplier) of the recorded SGD; other optimizers raise ValueError.

    With heavy-ball momentum beta the gradient flow runs 1 / (1 - beta) times faster than the raw
    learning rates say.
    """
    cls, groups = meta["optimizer"]["class"], meta["optimizer"]["groups"]
    if cls != "torch.optim.sgd.SGD":
        raise ValueError(f"{method}: models SGD training (the learning rates set how far training moved); history was recorded with {cls}")
    settings = {(g.get("weight_decay", 0.0), g.get("momentum", 0.0)) for g in groups}
    if len(settings) != 1:
        raise ValueError(f"{method}: needs one weight_decay and momentum for every parameter group, got {sorted(settings)}")
    decay, momentum = settings.pop()
    if not 0 <= momentum < 1:
        raise ValueError(f"{method}: needs SGD momentum in [0, 1), got {momentum}")
    return decay, 1.0 / (1.0 - momentum)


def forget_gradient_sum(model, loss_fn, train_set, forget, w, batch_size):
    """sum_{i in R} grad l_i(w): the forget set in a few large batches (loss_fn returns batch means)."""
    set_flat_params(model, w)
    total = torch.zeros_like(w)
    for start in range(0, forget.numel(), batch_size):
        idx = forget[start : start + batch_size]
        model.zero_grad(set_to_none=True)
        batch_loss(model, loss_fn, fetch(train_set, idx)).backward()
        total += flat_grads(model) * idx.numel()
    return total


def run(model, history, forget, train_set, loss_fn, tol=1e-4, max_iter=50, min_relax=1e-3, batch_size=4096, progress=None):
    check_history(history, model, forget, "mini")
    if max_iter < 1 or batch_size < 1:
        raise ValueError(f"mini: max_iter and batch_size must be >= 1, got max_iter={max_iter}, batch_size={batch_size}")
    history.require("summary", "mini")
    lam, lr_scale = sgd_settings(history.meta, "mini")
    s = history.summary
    w_star, g_star = s["w_star"], s["g_star"]
    U = torch.linalg.qr(s["eigvecs"].all().T).Q  # re-orthonormalise after lossy codecs
    eig = s["eigvals"].to(w_star.dtype)
    # Curvature off span(U) is modelled by the smallest kept eigenvalue, an upper bound of what is
    # left there: it under-moves in flat directions but keeps T contracting (docs/mini_unlearning.md).
    rho = eig[-1]
    n, r = history.n_train, forget.numel()

    tau = lr_scale * float(history.schedule["lrs"][:, 0].sum())  # training "time": sum of learning rates

    def H_hat(v):
        c = U.T @ v
        return U @ (eig * c) + rho * (v - U @ c)

    def response(v):
        """Phi v: the gradient-flow filter (I - exp(-tau A)) A^-1 with A = H_hat + lam I."""
        c = U.T @ v
        # phi(a) -> tau as a -> 0: exact zero eigenvalues occur (softmax logit-shift directions) when lam = 0.
        phi = lambda a: torch.where(a > 0, -torch.expm1(-tau * a) / a, torch.full_like(a, tau))  # noqa: E731
        return U @ (phi(eig + lam) * c) + phi(rho + lam) * (v - U @ c)

    def residual(w):
        """T(w) - w, where T(w) = w* - Phi d(w) and d is the gradient the retained objective adds."""
        g_forget = forget_gradient_sum(model, loss_fn, train_set, forget, w, batch_size)
        d = (r * (g_star + H_hat(w - w_star)) - g_forget) / (n - r)
        res = w_star - response(d) - w
        if not bool(torch.isfinite(res).all()):
            raise RuntimeError("mini: non-finite fixed-point residual; the forget set may be too large for the curvature model")
        return res

    # Krasnoselskii-Mann iteration w <- w + relax (T(w) - w) with backtracking: a step is kept only if
    # the residual shrinks (relax halves otherwise), so a weakly or non-contracting T (non-convex
    # models) is damped instead of diverging. q = |res_new| / |res| estimates the contraction factor
    # and |w - w_fix| <= |T(w) - w| / (1 - q) is the error bound and stopping rule.
    w, res = w_star.clone(), residual(w_star)
    res_norm, relax, q, bound, converged, evals = float(torch.linalg.vector_norm(res)), 1.0, float("nan"), float("inf"), False, 1
    for it in range(1, max_iter + 1):
        w_new = w + relax * res
        res_new = residual(w_new)
        evals += 1
        new_norm = float(torch.linalg.vector_norm(res_new))
        if progress is not None:
            progress.update(1)
        if new_norm > res_norm:
            relax *= 0.5
            if relax < min_relax:  # T does not contract near w*: stop with the best iterate so far
                break
            continue
        q = new_norm / res_norm if res_norm > 0 else 0.0
        w, res, res_norm = w_new, res_new, new_norm
        bound = res_norm / (1 - q) if q < 1 else float("inf")
        if bound <= tol * max(float(torch.linalg.vector_norm(w - w_star)), 1e-12):
            converged = True
            break
    set_flat_params(model, w)
    stats = {
        "iterations": it,
        "gradient_evaluations": evals * r,
        "contraction_factor": q,
        "error_bound": bound,
        "converged": converged,
        "relaxation": relax,
        "history_bytes_read": history.nbytes("summary") + history.schedule["lrs"].numel() * 8,
    }
    return model, stats
