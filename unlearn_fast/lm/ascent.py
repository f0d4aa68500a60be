"""Gradient-ascent unlearning for causal language models (methods of uf.unlearn).

first_epoch_ascent: ascend along the stored first-epoch per-sample gradients of the forget samples on the
recorded parameters (no gradient is recomputed: the direction is built from the int8 rows with
ops.dequantize_axpy_). gradient_ascent: the baseline, fresh gradients of the forget loss (whole model by
default). Both share one calibration (see docs/lm_unlearning.md):

  target  = mean per-sample loss of held-out samples (never trained on) at the original model
  bound   = target + bound_sigma * std(held-out losses) / sqrt(#forget)   (beyond it the forget set would
            look *less* like members than non-members do: a Streisand effect)
  retain  = retain-probe perplexity may rise by at most retain_tolerance (relative); a step that breaks it
            is undone and the run stops with status "retain_tolerance".

mode="iterative": repeated small steps with a check after each; the direction is rebuilt each step from the
forget samples still below the held-out median, and the step size adapts to the measured progress; stops
when the mean forget loss is in [target, bound]. mode="fuzzy": `forget` may be a text request, matched to
training samples with rapidfuzz (partial_ratio >= threshold); the matches are reported, and removed in
one shift along one fixed direction whose length is found by bracketing and bisection.
calibrate=False: one fixed-scale shift, theta += scale * sum of the forget gradients (scale defaults to
the recorded learning rate), for comparison.
"""
import math
import types

import torch

from .metrics import losses
from .recording import FirstEpochHistory, select_params
from .training import check_fits, forward_logits, lm_loss

MODES = ("iterative", "fuzzy")


# ----------------------------------------------------------------------------- fuzzy requests
def fuzzy_matches(request, texts, threshold=85.0):
    """[(index, score)] of the texts that contain a close match of `request`, best first.

    rapidfuzz partial_ratio: the Levenshtein similarity (0-100) of the request with its best-aligned
    window of the text, after lower-casing and stripping punctuation. It tolerates typos and word-level
    edits inside a name or quote and ignores the rest of a long sample; rapidfuzz runs it in C++."""
    from rapidfuzz import fuzz, process, utils

    if not isinstance(request, str) or not utils.default_process(request):
        raise ValueError(f"forget: a text request must contain letters or digits, got {request!r}")
    if not 0 < threshold <= 100:
        raise ValueError(f"threshold must be in (0, 100], got {threshold}")
    found = process.extract(request, texts, scorer=fuzz.partial_ratio, processor=utils.default_process,
                            score_cutoff=threshold, limit=None)
    return sorted(((int(i), float(s)) for _, s, i in found), key=lambda m: (-m[1], m[0]))


# ----------------------------------------------------------------------------- helpers
def _probe(train_set, indices):
    """A batch view (input_ids, labels) of some samples of a map-style data set of (input_ids, labels)."""
    if hasattr(train_set, "input_ids"):
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return types.SimpleNamespace(input_ids=train_set.input_ids[idx], labels=train_set.labels[idx])
    items = [train_set[int(i)] for i in indices]
    return types.SimpleNamespace(input_ids=torch.stack([x for x, _ in items]), labels=torch.stack([y for _, y in items]))


def _resolve_forget(forget, train_set, threshold):
    if isinstance(forget, str):
        texts = getattr(train_set, "texts", None)
        if texts is None:
            raise ValueError("forget: a text request needs a train_set with .texts (unlearn_fast.lm.TextDataset)")
        matches = fuzzy_matches(forget, texts, threshold)
        if not matches:
            raise ValueError(f"forget: the request {forget!r} matches no training sample at threshold {threshold}")
        return torch.tensor(sorted(i for i, _ in matches)), [
            {"index": i, "score": round(s, 1), "text": texts[i][:120]} for i, s in matches
        ]
    forget = torch.as_tensor(forget, dtype=torch.int64).reshape(-1)
    if forget.numel() == 0:
        raise ValueError("forget: the forget set is empty")
    return forget, None


def _retain_indices(n, forget, count, seed):
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    pool = torch.nonzero(keep).reshape(-1)
    if pool.numel() == 0:
        raise ValueError("forget: names every training sample; nothing is left to check retain loss on")
    order = torch.randperm(pool.numel(), generator=torch.Generator().manual_seed(seed))
    return pool[order[:count]]


def _shift_(params, direction, eta):
    """params += eta * direction, direction flat in the order of params."""
    with torch.no_grad():
        for p, chunk in zip(params, direction.split([p.numel() for p in params])):
            p.add_(chunk.view_as(p).to(p.dtype), alpha=eta)


class _Calibrator:
    """Moves theta along directions and keeps the forget/retain checks (see the module docstring)."""

    def __init__(self, model, names, forget_probe, retain_probe, heldout_losses, retain_tolerance, bound_sigma):
        params = dict(model.named_parameters())
        self.model = model
        self.params = [params[n] for n in names]
        self.forget_probe, self.retain_probe = forget_probe, retain_probe
        heldout = torch.as_tensor(heldout_losses, dtype=torch.float32).reshape(-1)
        if heldout.numel() < 2:
            raise ValueError("heldout: calibration needs at least two held-out samples")
        self.heldout_median = float(heldout.median())
        self.target = float(heldout.mean())
        n_forget = forget_probe.input_ids.shape[0]
        self.bound = self.target + bound_sigma * float(heldout.std()) / math.sqrt(n_forget)
        self.forget = self.forget_before = self._losses(forget_probe)
        self.retain = self.retain_before = float(self._losses(retain_probe).mean())
        self.retain_limit = self.retain_before + math.log1p(retain_tolerance)
        self.evaluations = 0
        self.retain_rejections = 0
        self.trace = [(0.0, float(self.forget.mean()), self.retain)]

    def _losses(self, probe):
        return losses(self.model, probe)

    def flat(self):
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def shift_(self, direction, eta):
        _shift_(self.params, direction, eta)

    def evaluate(self):
        self.evaluations += 1
        forget = self._losses(self.forget_probe)
        retain = float(self._losses(self.retain_probe).mean())
        return forget, retain

    def ok_retain(self, retain):
        return retain <= self.retain_limit

    def first_guess(self, direction, steps_hint):
        """eta so that the first-order forget-loss rise along `direction` is (target - now) / steps_hint."""
        gap = max(self.target - float(self.forget.mean()), 1e-3)
        return gap / (steps_hint * max(float(direction @ direction), 1e-12))


def _iterative(cal, direction_fn, max_steps):
    eta, status, shrinks = None, "max_steps", 0
    if float(cal.forget.mean()) >= cal.target:
        return "already_at_target"
    for step in range(max_steps):
        mean = float(cal.forget.mean())
        if mean >= cal.target:
            status = "reached_target"
            break
        active = cal.forget < cal.heldout_median
        if not bool(active.any()):
            active = torch.ones_like(active)
        direction = direction_fn(active)
        eta = cal.first_guess(direction, 4) if eta is None else eta
        cal.shift_(direction, eta)
        forget, retain = cal.evaluate()
        if not cal.ok_retain(retain):  # undo; retry up to 3 shorter steps, then stop
            cal.shift_(direction, -eta)
            shrinks += 1
            cal.retain_rejections += 1
            if shrinks > 3:
                status = "retain_tolerance"
                break
            eta /= 4
            continue
        if float(forget.mean()) > cal.bound:  # overshot: undo and take a shorter step
            cal.shift_(direction, -eta)
            eta /= 2
            continue
        rise = float(forget.mean()) - mean
        wanted = cal.target - mean
        eta *= 2.0 if rise <= 0 else min(2.0, max(0.5, wanted / rise))
        cal.forget, cal.retain = forget, retain
        cal.trace.append((eta, float(forget.mean()), retain))
        shrinks = 0
    else:
        if float(cal.forget.mean()) >= cal.target:
            status = "reached_target"
        elif cal.retain_rejections:  # ran out of steps while the retain tolerance kept cutting them short
            status = "retain_tolerance"
    return status


def _one_shift(cal, direction, max_evaluations):
    """Find eta with the forget mean in [target, bound] and retain within tolerance; apply it once."""
    origin = cal.flat()

    def at(eta):
        cal.shift_(direction, eta)
        forget, retain = cal.evaluate()
        cal.shift_(direction, -eta)
        cal.trace.append((eta, float(forget.mean()), retain))
        return forget, retain

    low, high, best = 0.0, None, None  # best: (eta, forget, retain) inside all the bounds
    if float(cal.forget.mean()) >= cal.target:
        return "already_at_target"  # the samples already look like non-members: ascending would overshoot
    eta = cal.first_guess(direction, 1)
    status = "max_steps"
    for _ in range(max_evaluations):
        forget, retain = at(eta)
        mean = float(forget.mean())
        if not cal.ok_retain(retain) or mean > cal.bound:
            high = eta
        elif mean >= cal.target:
            best, status = (eta, forget, retain), "reached_target"
            break
        else:
            low, best = eta, (eta, forget, retain)
        eta = eta * 2 if high is None else (low + high) / 2
    if status != "reached_target" and high is not None and best is not None:
        probe_retain = at(high)[1]
        status = "retain_tolerance" if not cal.ok_retain(probe_retain) else "max_steps"
    with torch.no_grad():  # undo rounding drift from the probes, then apply the one shift
        start = 0
        for p in cal.params:
            p.copy_(origin[start : start + p.numel()].view_as(p))
            start += p.numel()
    if best is not None:
        cal.shift_(direction, best[0])
        cal.forget, cal.retain = best[1], best[2]
    return status


def _run(model, names, direction_fn, fixed_direction_fn, forget, train_set, matches, *, mode, heldout, retain,
         calibrate, scale, retain_tolerance, bound_sigma, max_steps, retain_probe_size, seed, verbose):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forget_probe = _probe(train_set, forget)
    check_fits(model, forget_probe.input_ids)
    stats = {"params": names, "mode": mode, "forgotten": int(forget.numel()), "calibrated": bool(calibrate)}
    if matches is not None:
        stats["matches"] = matches
        if verbose:
            for m in matches:
                print(f"  match {m['index']:>5} score {m['score']:5.1f}: {m['text']}")
    if not calibrate:
        before = float(losses(model, forget_probe).mean())
        direction = fixed_direction_fn()
        params = dict(model.named_parameters())
        _shift_([params[n] for n in names], direction, scale)
        stats.update(status="fixed_scale", scale=scale, forget_loss_before=before,
                     forget_loss_after=float(losses(model, forget_probe).mean()))
        return model, stats
    if heldout is None:
        raise ValueError("heldout: calibration needs held-out samples (a TextDataset or their per-sample losses)")
    heldout_losses = heldout if torch.is_tensor(heldout) else losses(model, heldout)
    retain_probe = retain if retain is not None else _probe(
        train_set, _retain_indices(len(train_set), forget, retain_probe_size, seed))
    cal = _Calibrator(model, names, forget_probe, retain_probe, heldout_losses, retain_tolerance, bound_sigma)
    if mode == "iterative":
        status = _iterative(cal, direction_fn, max_steps)
    else:
        status = _one_shift(cal, direction_fn(torch.ones(forget.numel(), dtype=torch.bool)), max_steps)
    stats.update(
        status=status, target=cal.target, bound=cal.bound, evaluations=cal.evaluations,
        retain_rejections=cal.retain_rejections,
        forget_loss_before=float(cal.forget_before.mean()), forget_loss_after=float(cal.forget.mean()),
        retain_loss_before=cal.retain_before, retain_loss_after=cal.retain,
        trace=[tuple(round(v, 6) for v in t) for t in cal.trace],
    )
    return model, stats


# ----------------------------------------------------------------------------- the two methods
def run_first_epoch_ascent(model, history, forget, train_set, loss_fn=None, *, mode=None, params=None, epochs=None,
                           heldout=None, retain=None, calibrate=True, scale=None, retain_tolerance=0.05,
                           center=False, bound_sigma=2.0, max_steps=20, threshold=85.0, retain_probe_size=48, seed=0, verbose=False):
    """Ascent along stored per-sample gradients. history: FirstEpochHistory (or a path to one);
    params: subset of the recorded parameters (default all recorded); epochs: recorded epochs to use
    (default all: only epoch 0 for a first_epoch history). Other options: see the module docstring."""
    if isinstance(history, str):
        history = FirstEpochHistory.load(history)
    if not isinstance(history, FirstEpochHistory):
        raise ValueError(f"history: first_epoch_ascent needs a FirstEpochHistory (HistoryPolicy kind 'first_epoch' "
                         f"or 'all_epochs'), got {type(history).__name__}")
    forget, matches = _resolve_forget(forget, train_set, threshold)
    mode = mode or ("fuzzy" if matches is not None else "iterative")
    names = history.param_names if params is None else select_params(model, params)
    history.check_params(model, names)
    for e in range(history.n_epochs) if epochs is None else epochs:  # unrecorded samples fail before any change
        if not 0 <= e < history.n_epochs:
            raise ValueError(f"epochs: epoch {e} not recorded (history has {history.n_epochs})")
        history._rows(e, forget)
    spans = history.slices(names)

    def stored_sum(indices, weight):
        full = torch.zeros(history.numel)
        history.accumulate_(full, indices, weight, epochs)
        return torch.cat([full[a:b] for a, b in spans])

    # center=True removes the component shared by all training samples (the mean stored row), keeping what
    # is specific to the forget samples; ascending the shared part raises every sample's loss alike.
    recorded = history.epochs[0]["index"]
    shared = stored_sum(recorded, 1.0 / recorded.numel()) if center else None

    def direction_fn(active):
        chosen = forget[active]
        direction = stored_sum(chosen, 1.0 / chosen.numel())
        return direction - shared if center else direction

    scale = history.lrs[0] if scale is None and history.lrs else (1.0 if scale is None else scale)
    model, stats = _run(model, names, direction_fn, lambda: stored_sum(forget, 1.0), forget, train_set, matches,
                        mode=mode, heldout=heldout, retain=retain, calibrate=calibrate, scale=scale,
                        retain_tolerance=retain_tolerance, bound_sigma=bound_sigma, max_steps=max_steps,
                        retain_probe_size=retain_probe_size, seed=seed, verbose=verbose)
    stats["epochs"] = list(range(history.n_epochs)) if epochs is None else list(epochs)
    stats["center"] = bool(center)
    return model, stats


def run_gradient_ascent(model, history, forget, train_set, loss_fn=None, *, mode="iterative", params="all",
                        heldout=None, retain=None, calibrate=True, scale=1e-3, retain_tolerance=0.05,
                        bound_sigma=2.0, max_steps=20, threshold=85.0, retain_probe_size=48, seed=0, verbose=False):
    """Baseline: ascent along fresh gradients of the forget loss, recomputed at every step, on `params`
    (default the whole model); history is not used. loss_fn(logits, labels) defaults to lm_loss."""
    forget, matches = _resolve_forget(forget, train_set, threshold)
    names = select_params(model, params)
    named = dict(model.named_parameters())
    loss_fn = loss_fn or lm_loss

    def fresh(indices, total):
        probe = _probe(train_set, indices)
        model.zero_grad(set_to_none=True)
        loss = loss_fn(forward_logits(model, probe.input_ids), probe.labels)
        grads = torch.autograd.grad(loss * (len(indices) if total else 1.0), [named[n] for n in names])
        return torch.cat([g.reshape(-1) for g in grads]).detach()

    model, stats = _run(model, names, lambda active: fresh(forget[active], False), lambda: fresh(forget, True),
                        forget, train_set, matches, mode=mode, heldout=heldout, retain=retain, calibrate=calibrate,
                        scale=scale, retain_tolerance=retain_tolerance, bound_sigma=bound_sigma, max_steps=max_steps,
                        retain_probe_size=retain_probe_size, seed=seed, verbose=verbose)
    return model, stats
