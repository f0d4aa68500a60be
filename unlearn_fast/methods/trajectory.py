"""The recorded run's parameters w_t, rebuilt from w_0 and the recorded gradients.

A kind="full" history stores each step's gradient g_t as the optimizer stepped on it, not w_t: w_{t+1} is the recorded
optimizer's step from w_t on g_t at step t's recorded learning rates. replay() takes those steps on a copy of w_0 with a
fresh optimizer of the recorded class and hyper-parameters, whose state (momentum buffers, Adam's moments) is rebuilt
along. With fp32 rows that is the run's w_t bit for bit (the same kernels on the same values, parameter by parameter);
with int8 rows it carries the rows' quantisation error, which DeltaGrad measured as no worse than storing int8 w_t
(benchmarks/results/trajectory_reconstruction.md). Storing g_t alone halves a full history's bytes and record()'s work.

Clipping: the rows are the gradients after clipping, except where the trainer clipped after the recorder saw them
(Lightning: meta["recording"]["rows_unclipped"] = {"algorithm": "norm" | "value", "clip_val": c}); those rows are
clipped here as the trainer did.

Skipped parameters: a parameter whose .grad was None at training's optimizer.step() (an unused head, a branch not taken)
was skipped by it: no weight decay, no momentum or Adam update. Its row holds zeros; meta["recording"]["grad_none"] names
such parameters step by step, and the replay sets their .grad to None on those steps, so the optimizer skips them too
(stepping on the zeros decayed an unused head's weights by 5e-2 over 64 momentum-SGD steps).
"""
import copy
import math

import torch

from ..optimizers import set_step_settings
from ._common import parameter_bounds, skipped_parameters
from .retrain import build_optimizer


def replay(history, until=None):
    """(t, w_t, g_t) for t = 0, 1, ... until `until` (default: every recorded step): the parameters before step t and the
    gradient row step t applied, flat. Both are buffers that the next step overwrites: clone them to keep them."""
    return ((t, w, g) for t, w, g, _ in _replay(history, until))


def _replay(history, until):
    """replay()'s steps, each with the rebuilt optimizer as it is before step t."""
    history.require("trajectory", "the parameter trajectory")
    rows, meta = history.trajectory["g"], history.meta
    T = history.num_steps if until is None else until
    w = history.schedule["w0"].clone()
    shapes = [torch.Size(shape) for _, shape, _ in meta["param_spec"]]
    bounds = parameter_bounds(meta)
    params = [w[a:b].view(shape) for a, b, shape in zip(bounds, bounds[1:], shapes)]  # views: the optimizer steps w itself
    optimizer = build_optimizer(params, meta)
    clipping = _clipping((meta.get("recording") or {}).get("rows_unclipped"))
    decoded = None if rows.codec == "fp32" else torch.empty_like(w)  # (fp32 rows are views of the history: nothing to decode)
    skipped, run, none = skipped_parameters(history), 0, ()  # (the parameters training's optimizer skipped, step by step)
    for t in range(T):
        g = rows.row(t, decoded).to(w.dtype)
        yield t, w, g, optimizer
        if clipping is not None and decoded is None:
            g = g.clone()  # clipped in place below: an fp32 row is a view of the history's own tensor
        for p, a, b, shape in zip(params, bounds, bounds[1:], shapes):
            p.grad = g[a:b].view(shape)
        while run < len(skipped) and skipped[run][0] <= t:
            none, run = skipped[run][1], run + 1
        for i in none:  # .grad None at training's step: torch.optim skips the parameter (no weight decay, momentum, Adam moments)
            params[i].grad = None
        if clipping is not None:
            clipping(params)
        set_step_settings(optimizer, *history.step_settings(t))
        optimizer.step()


def state_at(history, step):
    """(w_t, the recorded optimizer's state_dict before step t), copies: where a rewind restarts with the run's own
    momentum buffers or Adam moments."""
    _check_steps(history, [step])
    for t, w, _, optimizer in _replay(history, step + 1):
        if t == step:
            return w.clone(), copy.deepcopy(optimizer.state_dict())


def _check_steps(history, steps):
    if min(steps) < 0 or max(steps) >= history.num_steps:
        raise ValueError(f"steps: must lie in [0, {history.num_steps}), got {sorted(steps)[:3]}..{max(steps)}")


def weights_at(history, steps):
    """{t: copy of w_t} for the given steps, each in [0, T) (the final weights are the trained model's)."""
    wanted = {int(t) for t in steps}
    if not wanted:
        return {}
    _check_steps(history, wanted)
    return {t: w.clone() for t, w, _ in replay(history, until=max(wanted) + 1) if t in wanted}


def final_weights(history):
    """A copy of w_T, the weights after the last recorded step, rebuilt by replaying every row (exact with fp32 rows)."""
    w = None
    for _, w, _ in replay(history):  # (w: the buffer the replay steps in place; exhausted, it holds w_T)
        pass
    return w.clone()


def _clipping(unclipped):
    """What the trainer did to the recorded (unclipped) gradients before its optimizer step, or None."""
    if unclipped is None:
        return None
    algorithm, value = (unclipped.get("algorithm"), unclipped.get("clip_val")) if isinstance(unclipped, dict) else (None, None)
    if not (type(value) in (int, float) and 0 < value < math.inf) or algorithm not in ("norm", "value"):
        raise ValueError(f"history: meta['recording']['rows_unclipped'] is malformed: {unclipped!r:.200}")
    if algorithm == "norm":
        return lambda params: torch.nn.utils.clip_grad_norm_(params, value)
    return lambda params: torch.nn.utils.clip_grad_value_(params, value)
