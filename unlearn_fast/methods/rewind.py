"""Rewind-to-Delete (Mu and Klabjan 2024; stochastic, certified for non-convex losses, 2025): restart from a
parameter checkpoint recorded before the end of training and replay the rest of the recorded schedule
(its batches without the forgotten samples, its learning rates) on the retained data.

Checkpoints: w_0 (schedule["w0"], every history), every step of a "full" history (w_t before step t, rebuilt from w_0
and the recorded gradients of steps 0..t-1: methods/trajectory.py) and the few of a "minimal" one (summary["ckpt_steps"] / ["ckpt_w"], stored through
the summary codec, int8 by default). With a budget of B steps it rewinds as far as the budget allows:
to the EARLIEST checkpoint t with T - t <= B (the further back, the less of the forgotten samples'
influence is left). A budget of T steps or more replays the whole run from w_0 and equals `retrain`
bit for bit on CPU. From a step of a full history the recorded optimizer goes on with the state the run had there
(momentum buffers, Adam moments: rebuilt with the weights), so a rewind forgetting nothing reproduces the run bit for bit
with fp32 rows; from a minimal history's checkpoints, or with the caller's optimizer= factory, it starts with fresh state.
No certification noise is added (the 2025 paper's calibrated noise is a separate choice). A kind="minimal"
history keeps no batch order: the replay draws batches of the recorded sizes from the retained samples
(seed=; stats["batch_order"]), as the stochastic R2D does.
"""
import time

import torch

from ..history import fetch, flat_params, restore_buffers, set_flat_params
from ._common import check_history, clip, clip_max_norm, history_batch_order, replay_step, remaining, replayed_batches
from .trajectory import state_at
from .finetune import DEFAULT_BUDGET_FRACTION, check_budget, check_lr, make_optimizer, not_unlearned, plan, set_settings, step_seconds


RECALIBRATION_BATCH = 256  # samples per forward of recalibrate_batch_norm


def recalibrate_batch_norm(model, train_set, samples):
    """Batch norm's running statistics recomputed at the model's weights from `samples` (the retained trained ones):
    their plain average over forwards in batches of RECALIBRATION_BATCH (momentum None), every other module in eval
    mode, no gradients. A rewind from a later step starts with step 0's statistics (the only ones the history keeps;
    the trained model's carry the forgotten samples), and its few replayed steps at momentum 0.1 leave them far from
    the retrain's (measured on a digits MLP with BatchNorm1d, 4 epochs: 2.67 gaps off, eval accuracy 0.983 against
    0.994). Returns the number of samples, 0 where the model has no batch norm tracking statistics."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or samples.numel() == 0:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # (a cumulative average: every batch weighs the same)
            m.train()
        with torch.no_grad():
            for start in range(0, samples.numel(), RECALIBRATION_BATCH):
                x, _ = fetch(train_set, samples[start : start + RECALIBRATION_BATCH])
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return samples.numel()


def checkpoints(history):
    """[(step, source)] of every usable parameter checkpoint, ascending; source names where it is read from."""
    out = {0: "w0"}
    if history.trajectory is not None:
        out.update({t: "trajectory" for t in range(1, history.num_steps)})
    summary = history.summary or {}
    if "ckpt_steps" in summary and "ckpt_w" in summary:
        for t in summary["ckpt_steps"].tolist():
            out.setdefault(int(t), "summary")
    return sorted((t, src) for t, src in out.items() if t < history.num_steps)


def checkpoint(history, step, source):
    """(parameters at `step`, the recorded optimizer's state there or None: a fresh state)."""
    if source == "w0":
        return history.schedule["w0"].clone(), None
    if source == "trajectory":
        return state_at(history, step)
    i = history.summary["ckpt_steps"].tolist().index(step)
    return history.summary["ckpt_w"].row(i).clone(), None


def checkpoint_bytes(history, step, source):
    w0 = history.schedule["w0"]
    if source == "w0":
        return w0.numel() * w0.element_size()
    if source == "trajectory":  # w0 and the gradient rows of the steps before
        rows = history.trajectory["g"]
        return w0.numel() * w0.element_size() + rows.nbytes // len(rows) * step
    rows = history.summary["ckpt_w"]
    return rows.nbytes // len(rows)


def choose(history, budget, what):
    """The earliest checkpoint whose remaining steps fit in `budget`; ValueError naming `what` when none does."""
    T = history.num_steps
    usable = [(t, src) for t, src in checkpoints(history) if T - t <= budget]
    if not usable:
        latest = checkpoints(history)[-1][0]
        raise ValueError(
            f"{what}: a budget of {budget} steps reaches back only to step {T - budget} of {T}; the latest recorded checkpoint is "
            f"step {latest} ({T - latest} steps to replay). Give a larger budget, or record a full history (every step is a checkpoint)"
        )
    return usable[0]


def run(model, history, forget, train_set, loss_fn, steps=None, seconds=None, optimizer=None, lr=None, progress=None, seed=0):
    steps, seconds = check_budget(steps, seconds)
    lr = check_lr(lr)
    check_history(history, model, forget, train_set, "rewind")
    T = history.num_steps
    forget_mask = torch.zeros(history.n_train, dtype=torch.bool)
    forget_mask[forget] = True
    max_norm = clip_max_norm(history)
    probe_batch = torch.as_tensor(history.meta["loss_check"]["indices"]) if "indices" in history.meta.get("loss_check", {}) else history.schedule["batches"][-1]

    def probe():  # time one replay step on the last recorded batch, at the trained weights
        last = remaining(probe_batch, forget_mask)
        return step_seconds(model, loss_fn, fetch(train_set, last if last.numel() else probe_batch))

    default = max(1, round(DEFAULT_BUDGET_FRACTION * T))
    budget, deadline = plan(steps, seconds, default, probe)
    if budget == 0:
        why = "a budget of 0 steps" if seconds is None or seconds > 0 else "a budget of 0 seconds"
        return model, not_unlearned(f"{why}: the trained model is returned unchanged", checkpoint_step=None)
    start_step, source = choose(history, budget, "seconds" if seconds is not None and (steps is None or budget < steps) else "steps")
    trained = flat_params(model).clone()
    w, state = checkpoint(history, start_step, source)
    set_flat_params(model, w)
    # the buffers (batch norm's running statistics) of step 0: a history keeps no later ones, and the trained model's carry
    # every trained sample, the forgotten ones too (from a later checkpoint the statistics then see the replayed steps only)
    restore_buffers(model, history.schedule.get("buffers0"))
    opt = make_optimizer(model, history, optimizer, lr)
    if state is not None and optimizer is None:  # the recorded optimizer: it goes on with the run's own state
        opt.load_state_dict(state)
    lrs = history.schedule["lrs"]
    done = evals = 0
    stopped = None
    # the same loop as retrain's, from start_step: from step 0 it performs the same operations in the same order
    for t, parts in replayed_batches(history, forget_mask, seed):
        if t < start_step:
            continue
        if deadline is not None and time.perf_counter() >= deadline:
            stopped = t
            break
        if progress is not None:
            progress.update(1)
        if not any(part.numel() for part in parts):
            continue
        set_settings(opt, history, t, lr, optimizer is None)
        opt.zero_grad(set_to_none=True)
        evals += replay_step(model, loss_fn, train_set, history, parts, t)
        clip(model, max_norm)
        opt.step()
        done += 1
    stats = {
        "steps": done, "gradient_evaluations": evals, "checkpoint_step": start_step, "checkpoint_source": source,
        "replayed_steps": (stopped if stopped is not None else T) - start_step, "budget_steps": budget,
        # read: one checkpoint, and the batches and learning rates from it on
        "history_bytes_read": checkpoint_bytes(history, start_step, source)
        + 4 * int(history.schedule["batch_sizes"][start_step:].sum() if "batches" in history.schedule else 0)
        + lrs[start_step:].numel() * lrs.element_size(),
        "batch_order": history_batch_order(history),
    }
    if start_step > 0 and done:  # (from step 0 the replayed steps computed the retrain's own statistics)
        retained = torch.nonzero(history.seen_mask() & ~forget_mask).flatten()
        stats["batch_norm_recalibrated"] = recalibrate_batch_norm(model, train_set, retained)
    if stopped is not None:
        stats["stopped"] = f"seconds budget ran out at step {stopped} of {T}: the model is mid-schedule"
        if done == 0:  # not even one step: hand back the trained model, not the checkpoint
            set_flat_params(model, trained)
            stats.update(unlearned=False, reason="the seconds budget ran out before the first step: the trained model is returned unchanged")
    return model, stats
