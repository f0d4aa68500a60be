"""uf.unlearn: one entry point for every unlearning method.

A method is a function `run(model, history, forget, train_set, loss_fn, **options) -> (model, stats)`
living in its own module under unlearn_fast/methods (or unlearn_fast/lm for language models). It
receives a private deep copy of the model (the caller's model is never modified) and forget as a
sorted, duplicate-free int64 tensor of training-set indices (or a string for text requests, which
methods that accept them resolve themselves).
"""
import copy
import dataclasses
import importlib
import time

import torch

# method name -> "module:function"; imported on first use so optional dependencies stay optional.
METHODS = {
    "retrain": "unlearn_fast.methods.retrain:run",
    "deltagrad": "unlearn_fast.methods.deltagrad:run",
    "mini": "unlearn_fast.methods.mini:run",
    "newton": "unlearn_fast.methods.newton:run",
    "first_epoch_ascent": "unlearn_fast.lm.ascent:run_first_epoch_ascent",
    "gradient_ascent": "unlearn_fast.lm.ascent:run_gradient_ascent",
}
# methods that resolve a text request (forget given as a string) themselves
TEXT_METHODS = ("first_epoch_ascent", "gradient_ascent")


@dataclasses.dataclass
class UnlearnResult:
    model: torch.nn.Module
    seconds: float
    stats: dict


def _method(name):
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    module, function = METHODS[name].split(":")
    return getattr(importlib.import_module(module), function)


def check_forget(forget, n_train):
    """forget -> sorted unique int64 tensor; ValueError naming `forget` on anything invalid."""
    t = torch.as_tensor(forget)
    if t.numel() == 0:
        return t.new_empty(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() > 1:
        raise ValueError(f"forget must be a 1-D sequence of integer training-set indices, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= n_train)
    if bool(bad.any()):
        raise ValueError(f"forget: indices {t[bad][:10].tolist()} are out of range for a training set of {n_train} samples")
    unique = torch.unique(t)
    if unique.numel() != t.numel():
        raise ValueError(f"forget: contains {t.numel() - unique.numel()} duplicated indices")
    if unique.numel() == n_train:
        raise ValueError("forget: names the whole training set; nothing would remain to learn from")
    return unique


def non_finite_parameters(model):
    """Names of the parameters holding NaN or infinite values."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def unlearn(model, history, forget, train_set, loss_fn, method="mini", **options):
    """Remove the training samples `forget` from `model`; returns UnlearnResult(model, seconds, stats).

    history is the GradientHistory recorded while training; train_set a map-style data set returning
    (x, y); loss_fn(outputs, targets) the mean training loss. See docs/ for each method's options.
    """
    run = _method(method)
    if isinstance(forget, str) and method not in TEXT_METHODS:
        raise ValueError(f"forget: a text request works only with methods {TEXT_METHODS}; method {method!r} needs training-set indices")
    if not isinstance(forget, str):
        forget = check_forget(forget, len(train_set))
    bad = non_finite_parameters(model)
    if bad:
        raise ValueError(f"model: parameters {bad[:5]} hold NaN or infinite values; nothing to unlearn from")
    start = time.perf_counter()
    new_model = copy.deepcopy(model)
    if not isinstance(forget, str) and forget.numel() == 0:
        return UnlearnResult(new_model, time.perf_counter() - start, {"method": method, "forgotten": 0})
    new_model, stats = run(new_model, history, forget, train_set, loss_fn, **options)
    seconds = time.perf_counter() - start
    bad = non_finite_parameters(new_model)
    if bad:  # e.g. a loss that went NaN during a replay: stop and say so rather than return a broken model
        raise RuntimeError(f"{method}: the unlearned parameters {bad[:5]} are NaN or infinite (a non-finite loss or a "
                           "diverging step); no model is returned")
    return UnlearnResult(new_model, seconds, {"method": method, **stats})
