"""method="newton": influence-function / one-step Newton removal (see docs/hvp.md).

The model is assumed to minimise F(w) = (1/n) sum_i l_i(w) + weight_decay/2 |w|^2 over the training
set. Removing the r samples R leaves F_R(w) = (1/(n-r)) sum_{i not in R} l_i(w) + weight_decay/2 |w|^2.
If grad F(w) = 0, then grad F_R(w) = -(1/(n-r)) sum_{i in R} (grad l_i(w) + weight_decay w), and one
Newton step on F_R is
    w <- w + (H_R + (weight_decay + damping) I)^-1 sum_{i in R} (grad l_i(w) + weight_decay w) / (n - r),
H_R the Hessian of the mean retained loss, solved by batched CG (ihvp) on the retained data. Further
steps (steps > 1) are exact Newton steps on F_R, with its gradient computed on the retained data.
noise > 0 adds Gaussian noise N(0, noise^2 I) to the result (certified-removal style).
"""
import torch

from ..history import fetch, set_flat_params
from ..hvp import ihvp, make_problem, mean_gradient, transformable_kernels
from ._common import refusing_untransformable


def run(model, history, forget, train_set, loss_fn, damping=0.0, weight_decay=0.0, steps=1, noise=0.0, seed=0,
        tol=None, max_iter=200, solver="cg", data_chunk_size=None, mode="rev-rev"):
    """Newton / influence removal of `forget` from `model` (modified in place and returned) -> (model, stats).

    history is not used. weight_decay is the L2 coefficient of the training objective (lambda/2 |w|^2).
    damping is added to H_R on top of weight_decay. steps: Newton steps (the first uses only the forget
    gradients, the rest the retained gradient). noise: std of the Gaussian added at the end (seeded).
    """
    if steps < 1:
        raise ValueError(f"newton: steps must be >= 1, got {steps}")
    with transformable_kernels(), refusing_untransformable("newton"):  # (an EmbeddingBag's backward has no derivative)
        return _run(model, train_set, forget, loss_fn, damping, weight_decay, steps, noise, seed, tol, max_iter, solver, data_chunk_size, mode)


def _run(model, train_set, forget, loss_fn, damping, weight_decay, steps, noise, seed, tol, max_iter, solver, data_chunk_size, mode):
    if damping < 0 or weight_decay < 0 or noise < 0:
        raise ValueError(f"newton: damping, weight_decay and noise must be >= 0, got {damping}, {weight_decay}, {noise}")
    n = len(train_set)
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    retain_batch = fetch(train_set, torch.nonzero(keep).reshape(-1))
    forget_batch = fetch(train_set, forget)
    n_retain, n_forget = int(keep.sum()), forget.numel()

    problem = make_problem(loss_fn, model, "newton")
    w = torch.cat([p.reshape(-1) for p in problem.primals])
    if tol is None:  # CG's relative residual: float32 products stall near 1e-7, so 1e-8 is for float64 only
        tol = 1e-8 if w.dtype == torch.float64 else 1e-6
    stats = {"steps": steps, "cg_iterations": [], "residuals": [], "step_norms": []}
    for step in range(steps):
        if step == 0:
            # sum_{i in R} (grad l_i + weight_decay w) / (n - r): the mean forget gradient scaled by r / (n - r).
            g_forget = mean_gradient(problem, forget_batch, data_chunk_size, "newton") + weight_decay * w
            rhs = g_forget * (n_forget / n_retain)
        else:
            rhs = -(mean_gradient(problem, retain_batch, data_chunk_size, "newton") + weight_decay * w)
        delta, report = ihvp(
            loss_fn, model, rhs[None], retain_batch, solver=solver, damping=weight_decay + damping,
            tol=tol, max_iter=max_iter, data_chunk_size=data_chunk_size, mode=mode,
        )
        w = w + delta[0]
        set_flat_params(model, w)
        problem = make_problem(loss_fn, model, "newton")
        stats["cg_iterations"].append(report.iterations)
        stats["residuals"].append(float(report.residuals.max()))
        stats["step_norms"].append(float(torch.linalg.vector_norm(delta)))
    retained_gradient = mean_gradient(problem, retain_batch, data_chunk_size, "newton") + weight_decay * w
    stats["retained_gradient_norm"] = float(torch.linalg.vector_norm(retained_gradient))
    if noise > 0:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w = w + noise * torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype).to(w.device)
        set_flat_params(model, w)
    stats["noise"] = noise
    return model, stats
