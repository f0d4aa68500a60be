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
import inspect
import time
import warnings
import weakref

import torch

from .history import GradientHistory, eager_module, fetch, flat_params, set_flat_params, weights_digest
from .methods._common import NotUnlearnedError, UnsupportedTrainingError, check_history, check_loss_fingerprint, loss_ratio

# method name -> "module:function"; imported on first use so optional dependencies stay optional.
METHODS = {
    "retrain": "unlearn_fast.methods.retrain:run",
    "deltagrad": "unlearn_fast.methods.deltagrad:run",
    "mini": "unlearn_fast.methods.mini:run",
    "newton": "unlearn_fast.methods.newton:run",
    "finetune": "unlearn_fast.methods.finetune:run",
    "rewind": "unlearn_fast.methods.rewind:run",
    "first_epoch_ascent": "unlearn_fast.lm.ascent:run_first_epoch_ascent",
    "gradient_ascent": "unlearn_fast.lm.ascent:run_gradient_ascent",
}
# methods that resolve a text request (forget given as a string) themselves
TEXT_METHODS = ("first_epoch_ascent", "gradient_ascent")
# methods that check the GradientHistory they are given against model and train_set (finetune: when one is given)
HISTORY_METHODS = ("retrain", "deltagrad", "mini", "rewind", "finetune")


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


def check_fallback(fallback, method):
    """fallback: None, or a method other than `method` that takes the same request (not a text-only method)."""
    if fallback is None:
        return
    allowed = sorted(m for m in METHODS if m != method and m not in TEXT_METHODS)
    if fallback not in allowed:
        raise ValueError(f"fallback: must be None or one of {allowed}, got {fallback!r}")


def check_method_fits(name, run, model, history, options, role="method"):
    """Whether method `name` can run on this model and history at all: TypeError for an option `run` does not take;
    for batch norm or dropout it cannot model, or a history section it needs (its module's NEEDS) missing,
    UnsupportedTrainingError (a ValueError that uf.unlearn's fallback runs on), or for the fallback itself (role) a plain
    ValueError naming it."""
    inspect.signature(run).bind(model, history, None, None, None, **options)
    if not isinstance(history, GradientHistory):
        return
    refuse, who = (UnsupportedTrainingError, name) if role == "method" else (ValueError, f"{role} {name}")
    if name in NO_BATCH_NORM:
        norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
        if norms:
            raise refuse(f"model: has batch norm ({norms[:3]}); {who} computes gradients of parts of recorded batches, which "
                         "batch statistics make depend on the whole batch. Use method='retrain'")
    if name in NO_DROPOUT:
        drops = [f"{n}: p={m.p}" for n, m in model.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
        if drops:
            raise refuse(f"model: has dropout ({', '.join(drops[:3])}); {who} compares the recorded gradients with fresh gradients of "
                         "parts of each batch, whose dropout masks differ from training's. Use method='retrain' or 'rewind' (they replay "
                         "training's masks), or train without dropout")
    needs = getattr(inspect.getmodule(run), "NEEDS", None)
    if needs is not None:
        try:
            history.require(needs, name)
        except ValueError as err:
            raise refuse(str(err) if role == "method" else f"{role}: {err}") from None


def check_forget(forget, n_train):
    """forget -> sorted unique int64 tensor; ValueError naming `forget` on anything invalid. A set is taken in
    sorted order."""
    if isinstance(forget, (set, frozenset)):
        forget = sorted(forget)
    if forget is None:
        raise ValueError("forget: must be a 1-D sequence of integer training-set indices, got None")
    try:
        t = torch.as_tensor(forget)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"forget: must be a 1-D sequence of integer training-set indices, got {type(forget).__name__} ({err})") from None
    if t.numel() == 0:
        return t.new_empty(0, dtype=torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.dim() > 1:
        raise ValueError(f"forget must be a 1-D sequence of integer training-set indices, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= n_train)
    if bool(bad.any()):
        raise ValueError(f"forget: indices {t[bad][:10].tolist()} are out of range for a training set of {n_train} samples")
    unique = torch.unique(t)
    if unique.numel() != t.numel():
        if t.numel() == n_train and unique.numel() <= 2 and int(unique.max()) <= 1:  # (a uint8 / int mask, not indices)
            raise ValueError(f"forget: holds {n_train} values, all 0 or 1: a mask over the training set, not indices; pass "
                             "torch.nonzero(mask).flatten()")
        raise ValueError(f"forget: contains {t.numel() - unique.numel()} duplicated indices")
    if unique.numel() == n_train:
        raise ValueError("forget: names the whole training set; nothing would remain to learn from")
    return unique


# methods that evaluate the loss on parts of a recorded batch (its deleted samples alone): batch norm makes each
# sample's gradient depend on its batch-mates, which they cannot model
NO_BATCH_NORM = ("deltagrad", "mini")
# methods whose step model compares recorded gradients with fresh gradients of parts of a batch: dropout draws other masks
# for those (measured: deltagrad with T0=1, retrain's equal without dropout, landed 1.05 gaps from it at p=0.2)
NO_DROPOUT = ("deltagrad",)


def bind_request(model, history, forget, allow_unrecorded_model):
    """The samples to forget from the history's training run: forget itself when model holds the weights the
    history was recorded for; the union with an earlier request's forget set when model is that request's
    result (every method restarts from the history, so it must forget both); ValueError naming model otherwise,
    unless allow_unrecorded_model. Returns (union, digest of model)."""
    digest = weights_digest(model)
    final = history.meta.get("final_digest")  # absent from histories recorded before the binding (unchecked)
    earlier = next((r for r in reversed(history.requests) if r["model_digest"] == digest), None)
    if earlier is not None:
        forget = torch.unique(torch.cat([forget, torch.tensor(earlier["forget"], dtype=torch.int64)]))
    elif final is not None and digest != final and not allow_unrecorded_model:
        raise ValueError(
            "model: its weights are neither the final weights this history was recorded for nor the result of a request "
            "logged in it; the methods would unlearn the history's model, not this one. Pass the trained model (or the "
            "result of an earlier uf.unlearn on this history), or allow_unrecorded_model=True to unlearn the history's model anyway"
        )
    return forget, digest


# history -> its trained weights w* (flat) rebuilt by a replay of its gradient rows: chained requests on one history
# replay them once
_REPLAYED_TRAINED_WEIGHTS = weakref.WeakKeyDictionary()


def trained_weights(history):
    """The weights the history was finished at (w*, flat), from the history alone: the summary's w_star (kind="minimal",
    or a full history mini prepared), else a replay of a full history's gradient rows (exact with fp32 rows, off by the
    rows' rounding with bf16 / int8 / int4); None when it keeps neither (a snapshot)."""
    summary = history.summary or {}
    if isinstance(summary.get("w_star"), torch.Tensor):
        return summary["w_star"]
    if history.trajectory is None or "g" not in history.trajectory or "optimizer" not in history.meta:
        return None
    if history not in _REPLAYED_TRAINED_WEIGHTS:
        from .methods.trajectory import final_weights

        _REPLAYED_TRAINED_WEIGHTS[history] = final_weights(history)
    return _REPLAYED_TRAINED_WEIGHTS[history]


def check_loss_at_trained_weights(model, digest, history, loss_fn, train_set):
    """ValueError naming loss_fn / train_set unless they give the gradient finish() measured on its probe batch at the
    trained weights w* (meta["loss_check"]). The check does not depend on the model passed: the trained model is checked
    as it is, any other (an earlier request's result, or one passed with allow_unrecorded_model) at w* rebuilt from the
    history on a private copy, since every method replays the history with this loss_fn and train_set whatever the model
    (measured before this check: a chained retrain with label smoothing 0.05 landed 1.69 gaps from the truth, with a
    permuted train_set 2.71)."""
    check, final = history.meta.get("loss_check"), history.meta.get("final_digest")
    if check is None or final is None or len(train_set) != history.n_train:  # (another size: the method refuses train_set)
        return
    probe = check["indices"] if "indices" in check else history.schedule["batches"][check["step"]]
    batch = fetch(train_set, torch.as_tensor(probe))
    if digest == final:  # model holds the weights finish() checked loss_fn at
        check_loss_fingerprint(check, model, loss_fn, batch, flat_params(model))
        return
    w_star = trained_weights(history)
    if w_star is None:
        return
    trained = copy.deepcopy(model)  # the caller's model is never modified
    set_flat_params(trained, w_star)
    if weights_digest(trained) == final:
        check_loss_fingerprint(check, trained, loss_fn, batch, flat_params(trained))
    else:  # lossy rows rebuild w* only nearly: that moves the per-parameter norms by 1e-3 (int8) to 0.1 (int4) of the
        # gradient's norm, as much as a wrong loss or train_set does (measured), so only the coarse ratio (a sum for a mean)
        loss_ratio(trained, loss_fn, batch, flat_params(trained), check["grad_norm"])


def non_finite_parameters(model):
    """Names of the parameters holding NaN or infinite values."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def unlearn(model, history, forget, train_set, loss_fn, method="mini", allow_unrecorded_model=False, fallback=None,
            fallback_options=None, **options):
    """Remove the training samples `forget` from `model`; returns UnlearnResult(model, seconds, stats).

    history is the GradientHistory recorded while training; train_set a map-style data set returning
    (x, y); loss_fn(outputs, targets) the mean training loss. See docs/ for each method's options.

    With a GradientHistory, model must be the trained model (its weights' digest is the history's) or the
    result of an earlier request served from the same history; then the union of that request and forget is
    forgotten (stats["forgotten_total"]), and every served request is logged in history.requests.
    allow_unrecorded_model=True unlearns the history's model whatever model is passed.
    A method that cannot unlearn raises NotUnlearnedError, and one that cannot model how the run was trained (an
    optimizer, clipping, batch norm, a history section it needs) UnsupportedTrainingError (a ValueError too); with
    fallback="retrain" (or another method) a warning says so and that method runs instead (with fallback_options):
    stats["fallback"] names it, stats[method] keeps what the first method measured. Whether the fallback can run is
    checked before anything runs; bad input (forget, train_set, model) raises whatever the fallback.
    """
    run = _method(method)
    check_fallback(fallback, method)
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model: must be the trained nn.Module, got {type(model).__name__}")
    if isinstance(train_set, torch.Tensor) or not (hasattr(train_set, "__len__") and hasattr(train_set, "__getitem__")):
        raise ValueError(f"train_set: must be a map-style data set of (x, y) samples (a TensorDataset(X, y), say), got {type(train_set).__name__}")
    if method in HISTORY_METHODS + ("newton",) and not callable(loss_fn):
        raise ValueError(f"loss_fn: method {method!r} needs the training loss, loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    model = eager_module(model)  # (a torch.compile'd model: its eager module is unlearned, and returned)
    if isinstance(forget, str) and method not in TEXT_METHODS:
        raise ValueError(f"forget: a text request works only with methods {TEXT_METHODS}; method {method!r} needs training-set indices")
    if not isinstance(forget, str):
        forget = check_forget(forget, len(train_set))
    bad = non_finite_parameters(model)
    if bad:
        raise ValueError(f"model: parameters {bad[:5]} hold NaN or infinite values; nothing to unlearn from")
    bound = isinstance(history, GradientHistory)
    unsupported = None  # the method cannot model this run: its refusal, raised where the method would run (so the fallback runs)
    try:
        check_method_fits(method, run, model, history, options)
    except UnsupportedTrainingError as err:
        if fallback is None:
            raise
        unsupported = err
    if fallback is not None:  # (a fallback that cannot run would fail only after the first method gave up, maybe minutes later)
        check_method_fits(fallback, _method(fallback), model, history, fallback_options or {}, "fallback")
    if bound and not isinstance(forget, str):
        history.check_model(model)  # another architecture: say so before comparing weights
        new, digest = bind_request(model, history, forget, allow_unrecorded_model)
        if new.numel() >= len(train_set):
            raise ValueError("forget: with the earlier requests this model served it names the whole training set; nothing would remain")
        check_loss_at_trained_weights(model, digest, history, loss_fn, train_set)
        forgotten_before, forget = new.numel() - forget.numel(), new  # samples added by the earlier requests
    start = time.perf_counter()
    new_model = copy.deepcopy(model)
    if not isinstance(forget, str) and forget.numel() == 0:
        # nothing to forget, so the method does not run: the history it would check against model and train_set is checked
        # here (its option names above): an empty request with a wrong train_set or history returned the model as if served
        if method in HISTORY_METHODS and not (method == "finetune" and history is None):
            check_history(history, model, forget, train_set, method)
        return UnlearnResult(new_model, time.perf_counter() - start, {"method": method, "forgotten": 0})
    try:
        if unsupported is not None:
            raise unsupported
        new_model, stats = run(new_model, history, forget, train_set, loss_fn, **options)
    except NotUnlearnedError as err:  # (UnsupportedTrainingError included: the method cannot model how this run was trained)
        if fallback is None:
            raise
        warnings.warn(f"{method}: not unlearned ({err.stats.get('reason', err)}); running fallback method {fallback!r}",
                      RuntimeWarning, stacklevel=2)
        new_model, stats = _method(fallback)(copy.deepcopy(model), history, forget, train_set, loss_fn, **(fallback_options or {}))
        stats = {**stats, "unlearned": True, "fallback": fallback, method: err.stats}
    seconds = time.perf_counter() - start
    bad = non_finite_parameters(new_model)
    if bad:  # e.g. a loss that went NaN during a replay: stop and say so rather than return a broken model
        raise RuntimeError(f"{method}: the unlearned parameters {bad[:5]} are NaN or infinite (a non-finite loss or a "
                           "diverging step); no model is returned")
    if bound and not isinstance(forget, str):
        history.append_request(forget.tolist(), fallback if "fallback" in stats else method, weights_digest(new_model))
        stats = {**stats, "forgotten_total": forget.numel(), "forgotten_earlier": forgotten_before}
    return UnlearnResult(new_model, seconds, {"method": method, **stats})
