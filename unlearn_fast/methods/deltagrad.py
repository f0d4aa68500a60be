"""DeltaGrad (Wu, Dobriban, Davidson, ICML 2020): replay SGD without the forgotten samples, with
quasi-Newton approximations of the retained-batch gradient on all but every T0-th step.

Needs torch.optim.SGD and the full trajectory (HistoryPolicy(kind="full")). The paper replays plain SGD at one
learning rate; the quasi-Newton part approximates only the retained batch's gradient, so any SGD update rule can take
it: parameter groups at their own learning rates (each coordinate steps at its group's), and momentum (heavy ball or
Nesterov, dampening, a momentum cycled per step by OneCycleLR), for which the replay keeps its own velocity as
torch.optim.SGD does (`Velocity`), fed with the exact or approximated gradient of each step.
The weight decay lambda may differ between parameter groups (no decay on biases and norms, as Hugging Face's
trainers group them): then lambda is a vector over the coordinates and every product with it is elementwise.
Step t with batch B_t, deleted part D_t, remainder R_t:
  exact (t < j0 or (t - j0) % T0 == 0): gradients of R_t and D_t at w; new curvature pair
      s = w - w_t, y = (|R_t| g_R + |D_t| g_D)/|B_t| - g_t + lambda s; d = g_R + lambda w
  approximate: d from the compact L-BFGS matrix B of the last m pairs,
      d = (|B_t| (B (w - w_t) + g_t + lambda w_t) - |D_t| (g_D + lambda w)) / |R_t|; only the |D_t| deleted samples
      need a fresh gradient. Plain SGD at one learning rate takes it and the step w <- w - eta d in one fused ops.qn_step_.
  then w <- w - eta d, or with momentum the SGD step on the velocity.
With T0 = 1 every step is exact and the result equals `retrain` to rounding.

The recorded weights w_t are rebuilt as the replay goes from w0 and the recorded gradients by torch's SGD itself,
w_{t+1} = w_t - eta_t (g_t + lambda w_t) (methods/trajectory.py; histories store no w_t). With fp32 rows that is the
run's w_t bit for bit; with int8 rows it is a better estimate than int8-stored w_t, which carried their own quantisation
error: DeltaGrad landed at 0.0769 / 0.0860 of the gap on digits / MNIST-1D instead of 0.0963 / 0.0881
(benchmarks/results/trajectory_reconstruction.md).
"""
import math

import torch

from .. import ops
from ..history import fetch, flat_grads, set_flat_params
from ._common import (UnsupportedTrainingError, batch_loss, check_history, coordinate_decay, coordinate_groups, parameter_bounds, remaining,
                      skipped_parameters)
from .trajectory import replay


STEP_GUARD = 3.0  # an approximate step longer than this many recorded steps is redone exactly (3 and 2 measured alike; 10 let an MLP replay drift to 1.3x the gap)


def check_sgd(history, method):
    """(lambda, Velocity or None, coordinate groups or None) of an SGD history: lambda a float, or a (p,) tensor (each
    coordinate its group's weight decay) where groups decay differently; a Velocity where the run used momentum; each
    coordinate's parameter group (p,) where the groups' learning rates differ at some step (else one rate per step).
    Else UnsupportedTrainingError (a ValueError that uf.unlearn's fallback runs on)."""
    meta = history.meta
    cls = meta["optimizer"]["class"]
    groups = meta["optimizer"]["groups"]
    if cls != "torch.optim.sgd.SGD":
        raise UnsupportedTrainingError(f"{method}: needs torch.optim.SGD (it models the SGD update exactly), history was recorded with {cls}")
    if any(g.get("maximize", False) for g in groups):
        raise UnsupportedTrainingError(f"{method}: SGD with maximize=True is not modelled")
    velocity = Velocity.of(history, method)
    lrs = history.schedule["lrs"]
    coord_groups = None if bool((lrs == lrs[:, :1]).all()) else coordinate_groups(meta)
    return coordinate_decay(meta, history.schedule["w0"].dtype), velocity, coord_groups


def skipped_decay(history, lam, velocity, method):
    """lam with no decay on the coordinates of the parameters training's optimizer skipped at every step (.grad None at
    optimizer.step(): an unused head; meta["recording"]["grad_none"]): torch's SGD applies neither weight decay nor
    momentum to them, and their gradient is 0 in the rows and in the replay's backward, so with no decay they stay as
    trained (momentum buffer 0). A parameter skipped on some steps only is refused, naming it, where momentum or weight
    decay would move it on the steps it was skipped (without either, a zero gradient is a skip)."""
    runs = skipped_parameters(history)
    if not runs:
        return lam
    always = set(runs[0][1]) if runs[0][0] == 0 else set()
    for _, idx in runs[1:]:
        always &= set(idx)
    starts = parameter_bounds(history.meta)
    moved = [i for i in sorted({i for _, idx in runs for i in idx} - always)
             if velocity is not None or (bool((lam[starts[i]:starts[i + 1]] != 0).any()) if isinstance(lam, torch.Tensor) else lam != 0)]
    if moved:
        step = next(t for t, idx in runs if moved[0] in idx)
        raise UnsupportedTrainingError(f"{method}: parameter {history.meta['param_spec'][moved[0]][0]!r} had no gradient (.grad None, which "
                                       f"optimizer.step() skips) at recorded step {step} and a gradient at other steps; {method}'s SGD model would "
                                       "apply its momentum / weight decay on the skipped steps. Use method='retrain' or 'rewind' (they replay the skips)")
    if not always:
        return lam
    lam = lam.clone() if isinstance(lam, torch.Tensor) else torch.full_like(history.schedule["w0"], lam)
    for i in always:
        lam[starts[i]:starts[i + 1]] = 0
    return lam


class Velocity:
    """torch.optim.SGD's momentum buffer, kept by the replay: step() updates w from the decayed gradient d as
    torch's SGD updates the parameters from grad + weight_decay * p (the first step copies d into the buffer)."""

    def __init__(self, momentum, dampening, nesterov, momenta=None):
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        self.momenta = momenta  # (T,) a scheduler's per-step momentum (OneCycleLR), or None
        self.buf = None

    @classmethod
    def of(cls, history, method):
        """The recorded run's velocity, or None for plain SGD; UnsupportedTrainingError where parameter groups differ in it."""
        groups = history.meta["optimizer"]["groups"]
        settings = {(float(g.get("momentum", 0.0)), float(g.get("dampening", 0.0)), bool(g.get("nesterov", False))) for g in groups}
        momenta = history.schedule.get("momenta")
        if len(settings) != 1 or (momenta is not None and bool((momenta != momenta[:, :1]).any())):
            raise UnsupportedTrainingError(f"{method}: needs one momentum, dampening and nesterov for every parameter group, got {sorted(settings)}"
                                           + ("" if momenta is None else " (momenta cycled per group)"))
        momentum, dampening, nesterov = settings.pop()
        if momenta is None and momentum == 0:
            return None
        return cls(momentum, dampening, nesterov, None if momenta is None else momenta[:, 0].tolist())

    def step(self, w, d, eta, t):
        """w after step t at learning rate eta (a float, or per coordinate) on the decayed gradient d."""
        beta = self.momentum if self.momenta is None else self.momenta[t]
        if self.buf is None:
            self.buf = d.clone()
        else:
            self.buf.mul_(beta).add_(d, alpha=1 - self.dampening)
        return w - eta * (d + beta * self.buf if self.nesterov else self.buf)


def _mean_grad(model, loss_fn, train_set, idx, w):
    set_flat_params(model, w)
    model.zero_grad(set_to_none=True)
    batch_loss(model, loss_fn, fetch(train_set, idx)).backward()
    return flat_grads(model)


NEEDS = "trajectory"  # the history section uf.unlearn checks before running (also as a fallback) and run() requires


def run(model, history, forget, train_set, loss_fn, T0=5, j0=10, m=2, progress=None):
    check_history(history, model, forget, train_set, "deltagrad")
    history.require(NEEDS, "deltagrad")
    lam, velocity, coord_groups = check_sgd(history, "deltagrad")
    lam = skipped_decay(history, lam, velocity, "deltagrad")  # (a tensor where some parameter is skipped: no decay there)
    per_group = isinstance(lam, torch.Tensor)
    fused = velocity is None and coord_groups is None  # plain SGD at one learning rate: the step is one qn_step_
    if T0 < 1 or j0 < 0 or m < 1:
        raise ValueError(f"deltagrad: need T0 >= 1, j0 >= 0, m >= 1; got T0={T0}, j0={j0}, m={m}")
    forget_mask = torch.zeros(history.n_train, dtype=torch.bool)
    forget_mask[forget] = True
    traj = history.trajectory
    w = history.schedule["w0"].clone()
    S, Y = [], []
    compact = None
    exact_steps = approx_steps = guarded_steps = evals = 0
    for (t, w_t, g_t), batch in zip(replay(history), history.schedule["batches"]):  # w_t: the recorded run's (module docstring)
        if progress is not None:
            progress.update(1)
        eta = float(history.schedule["lrs"][t, 0]) if coord_groups is None else history.schedule["lrs"][t].to(w.dtype)[coord_groups]
        rem = remaining(batch, forget_mask)
        if rem.numel() == 0:
            continue
        deleted = batch[forget_mask[batch]]
        g_del = _mean_grad(model, loss_fn, train_set, deleted, w) if deleted.numel() else torch.zeros_like(w)
        evals += deleted.numel()
        if not (t < j0 or (t - j0) % T0 == 0 or compact is None):
            alpha, beta = batch.numel() / rem.numel(), deleted.numel() / rem.numel()
            # Guard: an approximate gradient far longer than the recorded one means the quasi-Newton model broke
            # down here (non-convex losses); without it the replay can diverge while staying finite
            # (measured on an MNIST-1D MLP at 1% deletion: relative distance 2.7e7, 0.87 with the guard). Such a step is redone exactly.
            limit = STEP_GUARD * float(torch.linalg.vector_norm(eta * (g_t + lam * w_t)))
            if fused:
                w_before = w.clone()
                step = float(ops.qn_step_(w, w_t, g_t, g_del, S_mat, Y_mat, *compact, eta, alpha, beta, 0.0 if per_group else lam))
                if per_group:  # the op's scalar decay terms, elementwise: alpha lam w_ref - beta lam w
                    w.sub_(eta * lam * (alpha * w_t - beta * w_before))
                    step = float(torch.linalg.vector_norm(w - w_before))
                if math.isfinite(step) and step <= limit:
                    approx_steps += 1
                    continue
                w = w_before
            else:
                d = alpha * (ops.lbfgs_matvec(S_mat, Y_mat, *compact, w - w_t) + g_t + lam * w_t) - beta * (g_del + lam * w)
                step = float(torch.linalg.vector_norm(eta * d))
                if math.isfinite(step) and step <= limit:
                    w = w - eta * d if velocity is None else velocity.step(w, d, eta, t)
                    approx_steps += 1
                    continue
            guarded_steps += 1
        g_rem = _mean_grad(model, loss_fn, train_set, rem, w)
        evals += rem.numel()
        s = w - w_t
        y = (rem.numel() * g_rem + deleted.numel() * g_del) / batch.numel() - g_t + lam * s
        if float(s @ y) > 0:
            S, Y = (S + [s])[-m:], (Y + [y])[-m:]
            S_mat, Y_mat = torch.stack(S), torch.stack(Y)
            compact = ops.lbfgs_compact(S_mat, Y_mat, skip_bad_pairs=True)
        d = g_rem + lam * w
        w = w - eta * d if velocity is None else velocity.step(w, d, eta, t)
        exact_steps += 1
    set_flat_params(model, w)
    if not bool(torch.isfinite(w).all()):
        raise RuntimeError("deltagrad: non-finite parameters: a NaN or infinite loss or gradient, or a diverging replay (then try a smaller T0 or a larger j0); no model is returned")
    stats = {
        "exact_steps": exact_steps,
        "approx_steps": approx_steps,
        "guarded_steps": guarded_steps,
        "gradient_evaluations": evals,
        "history_bytes_read": traj["g"].nbytes + history.nbytes("schedule"),
    }
    return model, stats
