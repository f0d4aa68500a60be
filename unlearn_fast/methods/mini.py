"""Mini-Unlearning (our reconstruction; derivation in docs/mini_unlearning.md).

Minimal history (the "summary" section, written once when training ends):
  w*      the final parameters (the model itself),
  g*      the full-data mean loss gradient at w*,
  U, Lam  the top-k eigenpairs of the full-data Gauss-Newton matrix G(w*) (randomized subspace iteration
          with batched GGN-vector products), rho the mean eigenvalue left outside span(U).
So H_hat = U diag(Lam) U' + rho (I - U U') models the loss curvature; nothing per training step is kept.

Unlearning R (r of n samples) solves grad F_R(w) = 0 for the retained objective
  F_R(w) = sum_{i not in R} l_i(w) / (n - r) + lam/2 |w|^2
with the retained-data gradient modelled as n (g* + H_hat (w - w*)) minus the EXACT forget-set
gradients at the current w (one batched pass over R per iteration, the only data touched):
  T(w) = w - P^-1 [ (n (g* + H_hat (w - w*)) - sum_R grad l_i(w)) / (n - r) + lam w ],  P = H_hat + lam I.
T is a contraction whenever the forget set's curvature is close to its share r/n of the total; the
observed step ratio q estimates the contraction factor and |w_k - w_fix| <= q / (1 - q) |w_k - w_{k-1}|
is the stopping rule (and the error bound reported).
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


def final_summary(model, train_set, loss_fn, policy, batch_size=1024, progress=False, power_iterations=2, oversample=8, probes=8, seed=0):
    """g*, the top-k GGN eigenpairs and rho at the model's current parameters (see module docstring)."""
    w = flat_params(model).clone()
    p, n = w.numel(), len(train_set)
    g_star = torch.zeros_like(w)
    for idx in _chunks(n, batch_size):
        model.zero_grad(set_to_none=True)
        batch_loss(model, loss_fn, fetch(train_set, idx)).backward()
        g_star += flat_grads(model) * (idx.numel() / n)
    model.zero_grad(set_to_none=True)
    k = min(policy.rank, p)
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
    rho = torch.zeros((), dtype=w.dtype)
    if k < p:
        Z = torch.randint(0, 2, (p, probes), generator=gen).to(w.dtype) * 2 - 1
        Z = Z - U @ (U.T @ Z)
        rho = ((Z * G(Z)).sum() / (Z * Z).sum()).clamp(min=0)
    return {
        "w_star": w,
        "g_star": g_star,
        "eigvecs": EncodedRows.encode(U.T.contiguous(), policy.codec, policy.blocksize),
        "eigvals": lam,
        "rho": rho,
    }


# ----------------------------------------------------------------------------- unlearning side
def weight_decay(meta, method):
    decays = {g.get("weight_decay", 0.0) for g in meta["optimizer"]["groups"]}
    if len(decays) != 1 or "AdamW" in meta["optimizer"]["class"]:
        raise ValueError(f"{method}: needs one L2 weight decay for all parameters (not decoupled AdamW decay), got {sorted(decays)}")
    return decays.pop()


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


def run(model, history, forget, train_set, loss_fn, tol=1e-4, max_iter=50, batch_size=4096, progress=None):
    check_history(history, model, forget, "mini")
    history.require("summary", "mini")
    lam = weight_decay(history.meta, "mini")
    s = history.summary
    w_star, g_star = s["w_star"], s["g_star"]
    U = torch.linalg.qr(s["eigvecs"].all().T).Q  # re-orthonormalise after lossy codecs
    eig, rho = s["eigvals"].to(w_star.dtype), s["rho"].to(w_star.dtype)
    n, r = history.n_train, forget.numel()

    tau = float(history.schedule["lrs"][:, 0].sum())  # total SGD "time": sum of learning rates

    def H_hat(v):
        c = U.T @ v
        return U @ (eig * c) + rho * (v - U @ c)

    def response(v):
        """Phi v: the gradient-flow filter (I - exp(-tau A)) A^-1 with A = H_hat + lam I."""
        c = U.T @ v
        phi = lambda a: -torch.expm1(-tau * a) / a  # noqa: E731
        return U @ (phi(eig + lam) * c) + phi(rho + lam) * (v - U @ c)

    # Krasnoselskii-Mann iteration w <- w + relax (T(w) - w): relax = 1 while T contracts, halved
    # whenever a step grows, which turns a non-contracting T (e.g. a non-convex model) into a damped one.
    w = w_star.clone()
    relax, steps, bound, q, converged = 1.0, [], float("inf"), float("nan"), False
    for it in range(1, max_iter + 1):
        g_forget = forget_gradient_sum(model, loss_fn, train_set, forget, w, batch_size)
        # Gradient the retained objective adds to the trained one: r (grad L(w) - mean forget grad) / (n - r).
        d = (r * (g_star + H_hat(w - w_star)) - g_forget) / (n - r)
        step = relax * (w_star - response(d) - w)
        if not bool(torch.isfinite(step).all()):
            raise RuntimeError(f"mini: non-finite step at iteration {it}; the forget set may be too large for the curvature model")
        w = w + step
        steps.append(float(torch.linalg.vector_norm(step)))
        if progress is not None:
            progress.update(1)
        if len(steps) >= 2:
            if steps[-1] > steps[-2]:
                relax *= 0.5
            ratios = [b / a for a, b in zip(steps[-3:-1], steps[-2:]) if a > 0]
            q = max(ratios) if ratios else 0.0
            bound = q / (1 - q) * steps[-1] if q < 1 else float("inf")
            moved = float(torch.linalg.vector_norm(w - w_star))
            if bound <= tol * max(moved, 1e-12):
                converged = True
                break
    set_flat_params(model, w)
    stats = {
        "iterations": it,
        "gradient_evaluations": it * r,
        "contraction_factor": q,
        "error_bound": bound,
        "converged": converged,
        "relaxation": relax,
        "history_bytes_read": history.nbytes("summary"),
    }
    return model, stats
