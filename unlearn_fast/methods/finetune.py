"""Fine-tune (Descent-to-Delete, Neel, Roth and Sharifi-Malvajerdi 2021; its stochastic form is the usual
"fine-tune" baseline of deep-unlearning papers): start from the trained model and run the optimizer on
shuffled batches of the retained data for a compute budget.

Budget: `steps` optimizer steps and/or `seconds` of wall time (whichever ends first; with neither, a
tenth of the recorded run). Defaults come from the history: the recorded optimizer class and
hyper-parameters (rebuilt as `retrain` does, with fresh state: momentum or Adam moments are not
recorded), the most common recorded batch size, and the last `steps` learning rates of the recorded
schedule (so finetune and rewind spend the same learning rates and differ only in where they start).
For strongly convex losses this contracts towards the retained optimum; for non-convex ones nothing
guarantees it reaches the retrained model (docs/baselines.md).
"""
import math
import numbers
import time

import torch

from ..history import fetch
from ..optimizers import set_step_settings
from ._common import batch_loss, check_history

DEFAULT_BUDGET_FRACTION = 0.1  # with no budget given: a tenth of the recorded steps
PROBES = 2  # forward-backward passes timed to turn a seconds budget into steps
SAFETY = 0.9  # share of the estimated steps planned: the probes do not time optimizer.step()


def check_budget(steps, seconds):
    """ValueError naming the argument unless steps is None or an int >= 0 and seconds None or a finite real >= 0."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0):
        raise ValueError(f"steps: the budget must be a non-negative integer number of optimizer steps, got {steps!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, numbers.Real)
                                or not math.isfinite(seconds) or seconds < 0):
        raise ValueError(f"seconds: the budget must be a finite non-negative number of seconds, got {seconds!r}")
    return (None if steps is None else int(steps)), (None if seconds is None else float(seconds))


def check_lr(lr):
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0):
        raise ValueError(f"lr: must be None (the recorded schedule) or a positive number, got {lr!r}")
    return lr


def make_optimizer(model, history, optimizer, lr):
    """The recorded optimizer rebuilt over model (fresh state), or optimizer(params) from the caller's factory."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        from .retrain import build_optimizer

        if history is None:
            raise ValueError("optimizer: without a history, pass an optimizer factory (e.g. lambda params: torch.optim.SGD(params, lr=0.01))")
        opt = build_optimizer(model, history.meta)
    else:
        if not callable(optimizer):
            raise ValueError(f"optimizer: must be a factory called with the list of trainable parameters, got {type(optimizer).__name__}")
        opt = optimizer(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ValueError(f"optimizer: the factory must return a torch.optim.Optimizer, returned {type(opt).__name__}")
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        if any(id(p) not in held for p in params):
            raise ValueError("optimizer: the factory's optimizer does not hold every trainable parameter it was given")
    if lr is None and history is not None and len(opt.param_groups) != history.schedule["lrs"].shape[1]:
        raise ValueError(f"optimizer: has {len(opt.param_groups)} parameter groups, the recorded schedule has learning rates for "
                         f"{history.schedule['lrs'].shape[1]}; pass lr= to use one constant learning rate instead")
    return opt


def set_settings(opt, history, t, lr, recorded_optimizer):
    """Step t's recorded learning rates, and its cycled momenta where the recorded optimizer runs; or `lr` for every group."""
    if lr is not None:
        set_step_settings(opt, [lr] * len(opt.param_groups))
    else:
        lrs, momenta = history.step_settings(t)
        set_step_settings(opt, lrs, momenta if recorded_optimizer else None)


def step_seconds(model, loss_fn, batch):
    """Wall time of one forward-backward pass on `batch` (the larger of PROBES timings). Leaves no trace: grads
    cleared, buffers (batch norm's running statistics) and the RNG (dropout) restored."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(PROBES):
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            batch_loss(model, loss_fn, batch).backward()
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    return max(times)


def plan(steps, seconds, default, probe):
    """(planned steps, deadline or None) from the budget: `default` steps when neither is given; with seconds,
    the steps a probe says fit in them (the probe's own time counts against the budget)."""
    start = time.perf_counter()
    if steps is None and seconds is None:
        return default, None
    deadline = None if seconds is None else start + seconds
    if seconds is not None and (steps is None or steps > 0) and seconds > 0:
        per_step = probe()
        fit = int(SAFETY * max(0.0, deadline - time.perf_counter()) / max(per_step, 1e-9))
        steps = fit if steps is None else min(steps, fit)
    elif seconds == 0:
        steps = 0
    return steps, deadline


def not_unlearned(reason, **extra):
    return {"unlearned": False, "reason": reason, "steps": 0, "gradient_evaluations": 0, **extra}


def retained_indices(n_train, forget):
    mask = torch.ones(n_train, dtype=torch.bool)
    mask[forget] = False
    return torch.nonzero(mask).flatten()


def recorded_batch_size(history):
    return int(torch.mode(history.schedule["batch_sizes"]).values)


def run(model, history, forget, train_set, loss_fn, steps=None, seconds=None, optimizer=None, lr=None, batch_size=None,
        seed=0, progress=None):
    steps, seconds = check_budget(steps, seconds)
    lr = check_lr(lr)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1):
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if history is None:
        if optimizer is None or lr is None or batch_size is None or steps is None and seconds is None:
            raise ValueError("history: finetune without a history needs optimizer, lr, batch_size and a budget (steps or seconds)")
        T = None
    else:
        check_history(history, model, forget, train_set, "finetune")
        T = history.num_steps
    n_train = len(train_set)
    keep = retained_indices(n_train, forget)
    batch_size = min(batch_size or recorded_batch_size(history), keep.numel())
    gen = torch.Generator().manual_seed(seed)

    def batches():
        while True:  # epochs of shuffled retained samples; the last short batch of an epoch is dropped, like the benchmark's trainer
            order = keep[torch.randperm(keep.numel(), generator=gen)]
            for b in range(0, keep.numel() - batch_size + 1, batch_size):
                yield order[b : b + batch_size]

    stream = batches()
    first = next(stream)
    default = None if T is None else max(1, math.ceil(DEFAULT_BUDGET_FRACTION * T))
    steps, deadline = plan(steps, seconds, default, lambda: step_seconds(model, loss_fn, fetch(train_set, first)))
    if steps == 0:
        why = "a budget of 0 steps" if seconds is None or seconds > 0 else "a budget of 0 seconds"
        return model, not_unlearned(f"{why}: the trained model is returned unchanged", planned_steps=0)
    opt = make_optimizer(model, history, optimizer, lr)
    done = evals = 0
    batch = first
    for k in range(steps):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        if k:
            batch = next(stream)
        # the tail of the recorded schedule (repeated from its start when the budget exceeds the run)
        set_settings(opt, history, None if lr is not None else (T - steps + k) % T, lr, optimizer is None)
        opt.zero_grad(set_to_none=True)
        batch_loss(model, loss_fn, fetch(train_set, batch)).backward()
        opt.step()
        done += 1
        evals += batch.numel()
        if progress is not None:
            progress.update(1)
    stats = {"steps": done, "planned_steps": steps, "gradient_evaluations": evals, "batch_size": batch_size,
             # what was read: the learning rates and the batch sizes (not the batches themselves)
             "history_bytes_read": 0 if history is None else (0 if lr is not None else history.schedule["lrs"].numel() * 8) + 8 * T}
    if done < steps:
        stats["stopped"] = f"seconds budget ran out after {done} of {steps} planned steps"
    if done == 0:
        stats.update(unlearned=False, reason="the seconds budget ran out before the first step: the trained model is returned unchanged")
    return model, stats
