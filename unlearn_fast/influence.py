"""Influence of training samples: Koh & Liang influence functions, self-influence, TracIn dot products.

Sign convention (Koh & Liang 2017): influence(z_i, test) = -g_test' (H + damping I)^-1 g_i, the rate
of change of the test loss when sample i is up-weighted by epsilon. Removing sample i from n (epsilon =
-1/n) changes the test loss by about -influence / n: a negative score marks a helpful sample (its
removal raises the test loss). H is the Hessian of the mean training loss (hessian_batch, default the
training batch). See docs/hvp.md.
"""
import torch
from torch.func import grad, vmap

from .hvp import _cat, _finite_rows_or_raise, hvp, ihvp, make_problem, mean_gradient  # noqa: F401  (hvp re-exported: uf imports it from here)


def _rows(batch):
    inputs, targets = batch
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"batch: inputs have {inputs.shape[0]} rows, targets {targets.shape[0]}")
    return inputs.shape[0]


def per_sample_gradients(loss_fn, model, batch, chunk_size=256):
    """(n, p) flat gradients of loss_fn(model(x_i[None]), y_i[None]) for every sample, via vmap(grad)."""
    problem = make_problem(loss_fn, model, "per_sample_gradients")
    if problem.output_of is None:
        raise ValueError("per_sample_gradients: needs an nn.Module")
    n = _rows(batch)
    inputs, targets = batch

    def one(x, y):
        return grad(lambda prims: problem.loss_of(prims, (x[None], y[None])))(problem.primals)

    parts = []
    for s in range(0, n, chunk_size):
        g = vmap(one)(inputs[s : s + chunk_size], targets[s : s + chunk_size])
        parts.append(_cat(g, g[0].shape[0]))
    return torch.cat(parts)


def influence(loss_fn, model, train_batch, test_batch, damping=0.0, hessian_batch=None, per_test=False, return_report=False, **solver_options):
    """Koh & Liang influence of every training sample on the test loss -> (n_train,) scores.

    per_test=True gives (n_test, n_train): one inverse-HVP per test sample, all solved together by
    batched CG. solver_options go to ihvp (solver, tol, max_iter, mode, kind, chunk_size, data_chunk_size).
    """
    hessian_batch = train_batch if hessian_batch is None else hessian_batch
    if per_test:
        test_grads = per_sample_gradients(loss_fn, model, test_batch)
    else:
        test_grads = mean_gradient(make_problem(loss_fn, model, "influence"), test_batch)[None]
    s_test, report = ihvp(loss_fn, model, test_grads, hessian_batch, damping=damping, **solver_options)
    scores = -s_test @ per_sample_gradients(loss_fn, model, train_batch).T
    scores = scores if per_test else scores[0]
    return (scores, report) if return_report else scores


def self_influence(loss_fn, model, batch, damping=0.0, hessian_batch=None, vectors_per_solve=64, **solver_options):
    """g_i' (H + damping I)^-1 g_i for every sample of batch -> (n,); samples solved in groups of vectors_per_solve."""
    hessian_batch = batch if hessian_batch is None else hessian_batch
    grads = per_sample_gradients(loss_fn, model, batch)
    out = []
    for s in range(0, grads.shape[0], vectors_per_solve):
        G = grads[s : s + vectors_per_solve]
        solved, _ = ihvp(loss_fn, model, G, hessian_batch, damping=damping, **solver_options)
        out.append((solved * G).sum(1))
    return torch.cat(out)


def random_projection(grads, dim, seed=0, block=4096):
    """grads (n, p) @ G with G (p, dim) Gaussian, entries N(0, 1/dim): dot products kept in expectation.

    G is regenerated from `seed` block by block (rows block*b .. block*(b+1)), never stored whole, so
    train and test gradients projected with one seed see the same G on any machine (CPU generator).
    """
    if dim < 1:
        raise ValueError(f"random_projection: dim must be >= 1, got {dim}")
    if grads.dim() != 2:
        raise ValueError(f"random_projection: grads must be (n, p), one row per sample; got shape {tuple(grads.shape)}")
    _finite_rows_or_raise(grads, "random_projection: grads")
    n, p = grads.shape
    out = torch.zeros(n, dim, dtype=grads.dtype, device=grads.device)
    gen = torch.Generator(device="cpu")
    for b, start in enumerate(range(0, p, block)):
        gen.manual_seed(seed * 1_000_003 + b)
        rows = min(block, p - start)
        G = torch.randn(rows, dim, generator=gen, dtype=torch.float64) / dim**0.5
        out += grads[:, start : start + rows] @ G.to(grads.dtype).to(grads.device)
    return out


def tracin(train_grads, test_grads, learning_rates=None):
    """TracIn: sum over checkpoints t of lr_t * <g_t(test_j), g_t(train_i)> -> (n_test, n_train).

    train_grads, test_grads: one (n, p) tensor (one checkpoint) or lists with one tensor per checkpoint
    (optionally projected with random_projection, the same seed for both). learning_rates: one per
    checkpoint (default 1).
    """
    train = [train_grads] if isinstance(train_grads, torch.Tensor) else list(train_grads)
    test = [test_grads] if isinstance(test_grads, torch.Tensor) else list(test_grads)
    if len(train) != len(test) or not train:
        raise ValueError(f"tracin: train_grads and test_grads need the same non-zero number of checkpoints, got {len(train)} and {len(test)}")
    lrs = [1.0] * len(train) if learning_rates is None else list(learning_rates)
    if len(lrs) != len(train):
        raise ValueError(f"tracin: learning_rates has {len(lrs)} entries for {len(train)} checkpoints")
    total = None
    for t, (lr, tr, te) in enumerate(zip(lrs, train, test)):
        if tr.dim() != 2 or te.dim() != 2 or tr.shape[1] != te.shape[1]:
            raise ValueError(f"tracin: gradients must be (n, p) with one p, got {tuple(tr.shape)} and {tuple(te.shape)}")
        _finite_rows_or_raise(tr, f"tracin: train_grads[{t}]")
        _finite_rows_or_raise(te, f"tracin: test_grads[{t}]")
        term = lr * (te @ tr.T)
        total = term if total is None else total + term
    return total


def tracin_self_influence(train_grads, learning_rates=None):
    """TracIn self-influence sum_t lr_t |g_t(z_i)|^2 -> (n,)."""
    train = [train_grads] if isinstance(train_grads, torch.Tensor) else list(train_grads)
    lrs = [1.0] * len(train) if learning_rates is None else list(learning_rates)
    if len(lrs) != len(train) or not train:
        raise ValueError(f"tracin_self_influence: learning_rates has {len(lrs)} entries for {len(train)} checkpoints (need one per checkpoint, at least one)")
    for t, g in enumerate(train):
        if g.dim() != 2:
            raise ValueError(f"tracin_self_influence: train_grads[{t}] must be (n, p), got shape {tuple(g.shape)}")
        _finite_rows_or_raise(g, f"tracin_self_influence: train_grads[{t}]")
    return sum(lr * (g * g).sum(1) for lr, g in zip(lrs, train))
