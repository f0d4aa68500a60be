"""Gradient-ascent unlearning for causal language models (methods of uf.unlearn).

first_epoch_ascent: ascend along the stored first-epoch per-sample gradients of the forget samples on the
recorded parameters (no gradient is recomputed: the direction is built from the int8 rows with
ops.dequantize_axpy_). gradient_ascent: the baseline, fresh gradients of the forget loss (whole model by
default). Both share one calibration (see docs/lm_unlearning.md):

  target  = mean per-sample loss of held-out samples (never trained on) at the original model
  bound   = target + bound_sigma * std(held-out losses) / sqrt(#forget)   (beyond it the forget set would
            look *less* like members than non-members do: a Streisand effect)
  retain  = retain-probe perplexity may rise by at most retain_tolerance (relative), judged on a one-sided 95%
            upper confidence bound of the probe's mean per-sample loss rise (the probe is a sample of the retain
            set; its mean alone let the whole retain set exceed the tolerance); a step that breaks it is undone and
            the run stops with status "retain_tolerance".

mode="iterative": repeated small steps with a check after each; the direction is rebuilt each step from the
forget samples still below the held-out median, and the step size adapts to the measured progress; stops
when the mean forget loss is in [target, bound]. mode="fuzzy": `forget` may be a text request, matched to
training samples with rapidfuzz (partial_ratio >= threshold); the matches are reported, and removed in
one shift along one fixed direction whose length is found by bracketing and bisection (the direction weights
the matches equally for calibration="mean", by their shortfall below their own targets for "per_sample" / "floor").
calibrate=False: one fixed-scale shift, theta += scale * sum of the forget gradients (scale defaults to
the recorded learning rate), for comparison.

Options of ours (off by default; measured in benchmarks/results/lm_unlearning.md): calibration="per_sample"
(each forget sample aims at the held-out loss quantile of its rank), calibration="floor" (every forget sample
below the held-out mean must reach it; samples above it are left alone: for small requests whose other samples
already look like non-members), retain_guard="difference" | "project" |
"fisher" (keep the step off what the retain samples outside the probe need: stored rows for
first_epoch_ascent, fresh gradients for gradient_ascent), and for gradient_ascent tokens="reference" /
objective="reference_kl" (target the tokens a retain-only n-gram cannot explain; see reference.py).

statistic="min_k" (ours): the calibration measures each sample by its Min-K% loss instead of its mean token loss:
minus the mean of its min_k fraction of lowest token log-probabilities (k = max(1, int(min_k x #tokens)), the
same statistic as the Min-K% Prob membership attack in metrics.mia_scores, sign flipped so that higher means
less member-like). Target, bound, per-sample targets and gaps are then computed on that statistic of the forget
samples against the same statistic of the held-out samples; the retain check stays on the mean loss. It sees a
few memorised tokens (a secret) that barely move a sample's mean loss. For gradient_ascent, tokens="min_k"
ascends only on each forget sample's min_k fraction of lowest-probability tokens (chosen afresh each step).
"""
import functools
import math
import types

import torch

from .metrics import losses, min_k_losses, min_k_select, token_stats
from .recording import FirstEpochHistory, select_params
from .training import check_fits, eval_mode, forward_logits, sample_losses, token_logprobs

MODES = ("iterative", "fuzzy")
GUARDS = (None, "project", "difference", "fisher")
CALIBRATIONS = ("mean", "per_sample", "floor")
STATISTICS = ("loss", "min_k")
TOKEN_MODES = ("all", "reference", "min_k")
OBJECTIVES = ("ascent", "reference_kl")
# The configuration of run_gradient_ascent that meets the goals over 24 seeds (benchmarks/results/lm_pooled.md):
# a diagonal-Fisher retain guard from 64 retain samples and floor calibration on the Min-K% (20%) statistic. The
# defaults stay the plain calibrated ascent (mean loss, no guard) that the paper describes.
RECOMMENDED = dict(retain_guard="fisher", retain_batch=64, calibration="floor", statistic="min_k", min_k=0.2)
# z of the one-sided 95% upper bound on the retain set's mean loss rise, from the retain probe's per-sample rises
RETAIN_Z = 1.645


# ----------------------------------------------------------------------------- fuzzy requests
def fuzzy_matches(request, texts, threshold=85.0):
    """[(index, score)] of the texts that contain a close match of `request`, best first.

    rapidfuzz partial_ratio: the Levenshtein similarity (0-100) of the request with its best-aligned
    window of the text, after lower-casing and stripping punctuation. It tolerates typos and word-level
    edits inside a name or quote and ignores the rest of a long sample; rapidfuzz runs it in C++. A text
    shorter than the request is scored as a whole against it (fuzz.ratio): partial_ratio would align the
    text inside the request instead, so that every short sample the request happens to contain ("ok",
    "Thank you.") scored 100 and was forgotten in place of the sample the request names."""
    from rapidfuzz import fuzz, process, utils

    if not isinstance(request, str) or not utils.default_process(request):
        raise ValueError(f"forget: a text request must contain letters or digits, got {request!r}")
    if not 0 < threshold <= 100:
        raise ValueError(f"threshold must be in (0, 100], got {threshold}")
    wanted = utils.default_process(request)

    def contains(query, text, score_cutoff=None, **kwargs):  # (query and text as processed)
        score = fuzz.ratio if len(text) < len(query) else fuzz.partial_ratio
        return score(query, text, score_cutoff=score_cutoff)

    found = process.extract(wanted, [utils.default_process(t) for t in texts], scorer=contains, score_cutoff=threshold, limit=None)
    return sorted(((int(i), float(s)) for _, s, i in found), key=lambda m: (-m[1], m[0]))


# ----------------------------------------------------------------------------- calibration statistic
def _check_statistic(statistic, min_k):
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if isinstance(min_k, bool) or not (isinstance(min_k, (int, float)) and math.isfinite(min_k) and 0 < min_k <= 1):
        raise ValueError(f"min_k must be a number in (0, 1], got {min_k!r}")


def calibration_statistic(model, dataset, statistic="loss", min_k=0.2):
    """Per-sample values (n,) of the calibration statistic (higher = less member-like) of a data set with
    input_ids and labels: "loss" the mean token loss, "min_k" the Min-K% loss. Pass the held-out samples' values
    as `heldout` to share them between requests."""
    _check_statistic(statistic, min_k)
    loss, logp, mask = token_stats(model, dataset)
    return loss if statistic == "loss" else min_k_losses(logp, mask, min_k)


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


def _split_retain(n, forget, probe_size, seed):
    """Shuffled retain indices (training samples outside the forget set): the first probe_size form the retain
    probe (the calibration's check); the rest is the pool the retain guard may descend on."""
    pool = _retain_indices(n, forget, n, seed)
    return pool[:probe_size], pool[probe_size:]


def _top_directions(rows, rank):
    """(p, k) orthonormal basis of the top-`rank` right singular vectors of rows (m, p), from the m x m Gram
    matrix (cheap when m << p)."""
    gram = rows @ rows.T
    values, vectors = torch.linalg.eigh(gram.double())
    keep = values.flip(0)[:rank]
    keep_vectors = vectors.flip(1)[:, :rank]
    good = keep > keep[0] * 1e-10
    basis = (rows.T.double() @ keep_vectors[:, good]) / keep[good].sqrt()
    return basis.float()


class _Calibrator:
    """Moves theta along directions and keeps the forget/retain checks (see the module docstring)."""

    def __init__(self, model, names, forget_probe, retain_probe, heldout_losses, retain_tolerance, bound_sigma, calibration,
                 statistic="loss", min_k=0.2):
        params = dict(model.named_parameters())
        self.statistic, self.min_k = statistic, min_k
        self.model = model
        self.params = [params[n] for n in names]
        self.forget_probe, self.retain_probe = forget_probe, retain_probe
        heldout = torch.as_tensor(heldout_losses, dtype=torch.float32).reshape(-1)
        if heldout.numel() < 2:
            raise ValueError("heldout: calibration needs at least two held-out samples")
        self.heldout_median = float(heldout.median())
        self.heldout_sd = float(heldout.std())
        self.target = float(heldout.mean())
        n_forget = forget_probe.input_ids.shape[0]
        self.bound = self.target + bound_sigma * float(heldout.std()) / math.sqrt(n_forget)
        self.forget = self.forget_before = self._losses(forget_probe)
        self.retain_samples = self.retain_samples_before = losses(model, retain_probe)
        self.retain = self.retain_before = float(self.retain_samples_before.mean())
        self.retain_limit = math.log1p(retain_tolerance)  # on the mean per-sample loss rise
        self.calibration = calibration
        # per-sample targets: the forget samples, ranked by their loss, take the held-out losses' quantiles at the
        # same ranks (so that, reached, the forget losses are distributed like the held-out ones)
        quantiles = (torch.arange(n_forget, dtype=torch.float32) + 0.5) / n_forget
        levels = torch.quantile(heldout, quantiles)
        self.sample_targets = torch.empty(n_forget)
        self.sample_targets[torch.argsort(self.forget, stable=True)] = levels
        if calibration == "floor":  # every sample must reach at least the held-out mean (samples above it stay)
            self.sample_targets = torch.full((n_forget,), self.target)
        self.below = self.forget < self.sample_targets  # the samples that start short of their targets
        self.sample_floor = torch.maximum(self.sample_targets, self.forget)  # rising past this is overshooting
        self.evaluations = 0
        self.retain_rejections = 0
        self.trace = [(0.0, float(self.forget.mean()), self.retain)]

    def _losses(self, probe):
        """The calibration statistic of the forget samples (mean token loss, or Min-K% loss)."""
        return calibration_statistic(self.model, probe, self.statistic, self.min_k)

    def flat(self):
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def shift_(self, direction, eta):
        _shift_(self.params, direction, eta)

    def evaluate(self):
        """(forget statistic per sample, retain-probe losses per sample) at the current parameters."""
        self.evaluations += 1
        return self._losses(self.forget_probe), losses(self.model, self.retain_probe)

    def retain_rise_bound(self, retain):
        """One-sided 95% upper confidence bound of the retain set's mean loss rise, from the probe's per-sample
        rises (retain: the probe's per-sample losses now)."""
        rise = retain - self.retain_samples_before
        spread = float(rise.std()) / math.sqrt(rise.numel()) if rise.numel() > 1 else 0.0
        return float(rise.mean()) + RETAIN_Z * spread

    def ok_retain(self, retain):
        return self.retain_rise_bound(retain) <= self.retain_limit

    def accept(self, forget, retain):
        self.forget, self.retain_samples, self.retain = forget, retain, float(retain.mean())

    def weights(self):
        """Weights of the forget samples in the next ascent direction (summing to 1).

        mean: the samples still below the held-out median, equally; per_sample / floor: each sample still below its
        own target, by its distance to it (a sample at or above its target is left alone)."""
        if self.calibration != "mean":
            gap = (self.sample_targets - self.forget).clamp(min=0)
            if float(gap.sum()) > 0:
                return gap / gap.sum()
        active = self.forget < self.heldout_median
        if not bool(active.any()):
            active = torch.ones_like(active)
        return active.float() / active.sum()

    def gap(self, forget):
        """How far the forget losses are from their goal: target - mean (mean), or the mean shortfall of the
        samples below their own targets (per_sample), or over the samples that started below the held-out mean
        (floor: samples already above it do not dilute the shortfall of the others)."""
        if self.calibration == "floor":
            short = (self.sample_targets - forget).clamp(min=0)
            return float(short[self.below].mean()) if bool(self.below.any()) else 0.0
        if self.calibration == "per_sample":
            return float((self.sample_targets - forget).clamp(min=0).mean())
        return self.target - float(forget.mean())

    def reached(self, forget):
        """mean: the mean forget loss is at the target; per_sample / floor: the mean shortfall (gap) is at most 0.1
        held-out sd."""
        if self.calibration != "mean":
            return self.gap(forget) <= 0.1 * self.heldout_sd
        return float(forget.mean()) >= self.target

    def overshot(self, forget):
        """mean: the mean is beyond the bound; per_sample / floor: the samples rose past max(own target, own start) by
        more than (bound - target) on average (the same Streisand margin, measured per sample)."""
        if self.calibration != "mean":
            return float((forget - self.sample_floor).clamp(min=0).mean()) > self.bound - self.target
        return float(forget.mean()) > self.bound

    def first_guess(self, direction, raw, steps_hint):
        """eta so that the first-order forget-loss rise along `direction` (taking `raw`, the unguarded ascent
        direction, as the forget gradient) is gap / steps_hint."""
        gap = max(self.gap(self.forget), 1e-3)
        return gap / (steps_hint * max(float(raw @ direction), 1e-12 * max(float(direction @ direction), 1e-12)))


def _iterative(cal, direction_fn, max_steps):
    eta, status, shrinks, direction = None, "max_steps", 0, None
    # after a retain rejection steps no longer grow (a longer one would be rejected again), and the run stops once
    # the retain budget left is smaller than what the last step used (the next one would be rejected)
    retain_limited = False
    if cal.reached(cal.forget):
        return "already_at_target"
    for step in range(max_steps):
        gap = cal.gap(cal.forget)
        if cal.reached(cal.forget):
            status = "reached_target"
            break
        if direction is None:  # a rejected step was undone: theta and the weights are unchanged, so is the direction
            direction, raw = direction_fn(cal.weights())
        eta = cal.first_guess(direction, raw, 4) if eta is None else eta
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
            retain_limited = True
            continue
        if cal.overshot(forget):  # overshot: undo and take a shorter step
            cal.shift_(direction, -eta)
            eta /= 2
            continue
        rise = gap - cal.gap(forget)
        growth = 2.0 if rise <= 0 else min(2.0, max(0.5, gap / rise))
        eta *= min(growth, 1.0) if retain_limited else growth
        bound = cal.retain_rise_bound(retain)
        used = bound - cal.retain_rise_bound(cal.retain_samples)
        cal.accept(forget, retain)
        cal.trace.append((eta, float(forget.mean()), cal.retain))
        shrinks, direction = 0, None
        if retain_limited and not cal.reached(forget) and bound + used > cal.retain_limit:
            status = "retain_tolerance"
            break
    else:
        if cal.reached(cal.forget):
            status = "reached_target"
        elif cal.retain_rejections:  # ran out of steps while the retain tolerance kept cutting them short
            status = "retain_tolerance"
    return status


def _one_shift(cal, direction, raw, max_evaluations):
    """Find eta that reaches the target without overshooting and keeps retain within tolerance; apply it once."""
    origin = cal.flat()

    def at(eta):
        cal.shift_(direction, eta)
        forget, retain = cal.evaluate()
        cal.shift_(direction, -eta)
        cal.trace.append((eta, float(forget.mean()), float(retain.mean())))
        return forget, retain

    low, high, best = 0.0, None, None  # best: (eta, forget, retain) inside all the bounds
    if cal.reached(cal.forget):
        return "already_at_target"  # the samples already look like non-members: ascending would overshoot
    eta = cal.first_guess(direction, raw, 1)
    status = "max_steps"
    for _ in range(max_evaluations):
        forget, retain = at(eta)
        if not cal.ok_retain(retain) or cal.overshot(forget):
            high = eta
        elif cal.reached(forget):
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
        cal.accept(best[1], best[2])
    return status


def _check_options(retain_guard, retain_weight, retain_rank, calibration, statistic="loss", min_k=0.2):
    if retain_guard not in GUARDS:
        raise ValueError(f"retain_guard must be one of {GUARDS}, got {retain_guard!r}")
    if not (isinstance(retain_weight, (int, float)) and math.isfinite(retain_weight) and retain_weight >= 0):
        raise ValueError(f"retain_weight must be a finite number >= 0, got {retain_weight!r}")
    if not (isinstance(retain_rank, int) and retain_rank >= 1):
        raise ValueError(f"retain_rank must be an integer >= 1, got {retain_rank!r}")
    if calibration not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {calibration!r}")
    _check_statistic(statistic, min_k)


def _run(model, names, direction_fn, fixed_direction_fn, forget, train_set, matches, *, mode, heldout, retain,
         calibrate, scale, retain_tolerance, bound_sigma, max_steps, retain_probe_size, seed, verbose, calibration,
         statistic="loss", min_k=0.2, setup_guard=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forget_probe = _probe(train_set, forget)
    check_fits(model, forget_probe.input_ids)
    stats = {"params": names, "mode": mode, "forgotten": int(forget.numel()), "calibrated": bool(calibrate),
             "calibration": calibration, "statistic": statistic}
    if statistic == "min_k":
        stats["min_k"] = min_k
    if matches is not None:
        stats["matches"] = matches
        if verbose:
            for m in matches:
                print(f"  match {m['index']:>5} score {m['score']:5.1f}: {m['text']}")
    probe_idx, guard_pool = _split_retain(len(train_set), forget, retain_probe_size, seed)
    if retain is not None or guard_pool.numel() == 0:  # the probe is the caller's (or everything): guard on all
        guard_pool = torch.cat([probe_idx, guard_pool])
    if setup_guard is not None:  # the retain guard uses retain samples outside the retain probe
        stats.update(setup_guard(guard_pool))
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
    # a tensor holds the held-out samples' values of the statistic (calibration_statistic), else it is computed here
    heldout_losses = heldout if torch.is_tensor(heldout) else calibration_statistic(model, heldout, statistic, min_k)
    retain_probe = retain if retain is not None else _probe(train_set, probe_idx)
    forget_loss_before = losses(model, forget_probe) if statistic != "loss" else None
    cal = _Calibrator(model, names, forget_probe, retain_probe, heldout_losses, retain_tolerance, bound_sigma, calibration,
                      statistic, min_k)
    if mode == "iterative":
        status = _iterative(cal, direction_fn, max_steps)
    else:
        # mean: all matched samples alike; per_sample / floor: weighted by how far each is below its own target
        weights = torch.full((forget.numel(),), 1.0 / forget.numel()) if calibration == "mean" else cal.weights()
        status = _one_shift(cal, *direction_fn(weights), max_steps)
    if calibration != "mean":
        stats["sample_targets"] = cal.sample_targets.tolist()
    stats.update(
        status=status, target=cal.target, bound=cal.bound, evaluations=cal.evaluations,
        retain_rejections=cal.retain_rejections,
        forget_loss_before=float(cal.forget_before.mean()) if statistic == "loss" else float(forget_loss_before.mean()),
        forget_loss_after=float(cal.forget.mean()) if statistic == "loss" else float(losses(model, forget_probe).mean()),
        retain_loss_before=cal.retain_before, retain_loss_after=cal.retain,
        retain_rise_bound=cal.retain_rise_bound(cal.retain_samples),
        forget_statistic_before=float(cal.forget_before.mean()), forget_statistic_after=float(cal.forget.mean()),
        trace=[tuple(round(v, 6) for v in t) for t in cal.trace],
    )
    return model, stats


# ----------------------------------------------------------------------------- the two methods
def _in_eval_mode(run):
    """Unlearning runs with the model in eval mode (no dropout: a random mask per forward would make the
    calibration's before/after losses differ by noise, and the fresh gradients the gradient of another network);
    each module's own mode is restored on the returned model (a model taken from a Trainer stays in train mode)."""

    @functools.wraps(run)
    def wrapped(model, *args, **kwargs):
        with eval_mode(model):
            return run(model, *args, **kwargs)

    return wrapped


@_in_eval_mode
def run_first_epoch_ascent(model, history, forget, train_set, loss_fn=None, *, mode=None, params=None, epochs=None,
                           heldout=None, retain=None, calibrate=True, scale=None, retain_tolerance=0.05,
                           center=False, retain_guard=None, retain_weight=1.0, retain_rank=8, retain_rows=128,
                           calibration="mean", statistic="loss", min_k=0.2, bound_sigma=2.0, max_steps=20,
                           threshold=85.0, retain_probe_size=48, seed=0, verbose=False):
    """Ascent along stored per-sample gradients. history: FirstEpochHistory (or a path to one);
    params: subset of the recorded parameters (default all recorded); epochs: recorded epochs to use
    (default all: only epoch 0 for a first_epoch history). retain_guard (stored rows of retain samples
    outside the retain probe, at most retain_rows of them): "project" removes from the ascent direction its
    component in the span of their top retain_rank directions; "difference" subtracts retain_weight x their
    mean row; "fisher" divides it by their mean squared row + retain_weight x its mean. calibration: "mean",
    "per_sample" or "floor"; statistic: "loss" or "min_k" (fraction min_k), what the calibration measures. Other
    options: see the module docstring."""
    if isinstance(history, str):
        history = FirstEpochHistory.load(history)
    if not isinstance(history, FirstEpochHistory):
        raise ValueError(f"history: first_epoch_ascent needs a FirstEpochHistory (HistoryPolicy kind 'first_epoch' "
                         f"or 'all_epochs'), got {type(history).__name__}")
    _check_options(retain_guard, retain_weight, retain_rank, calibration, statistic, min_k)
    if not (isinstance(retain_rows, int) and retain_rows >= 1):
        raise ValueError(f"retain_rows must be an integer >= 1, got {retain_rows!r}")
    forget, matches = _resolve_forget(forget, train_set, threshold)
    mode = mode or ("fuzzy" if matches is not None else "iterative")
    names = history.param_names if params is None else select_params(model, params)
    history.check_params(model, names)
    top = max((int(e["index"].max()) for e in history.epochs if e["index"].numel()), default=-1)
    if top >= len(train_set):  # the stored rows are indexed by position in the recorded training set
        raise ValueError(f"train_set: has {len(train_set)} samples, but the history recorded sample {top}; "
                         "pass the training set the history was recorded on")
    for e in range(history.n_epochs) if epochs is None else epochs:  # unrecorded samples fail before any change
        if not 0 <= e < history.n_epochs:
            raise ValueError(f"epochs: epoch {e} not recorded (history has {history.n_epochs})")
        history._rows(e, forget)
    spans = history.slices(names)

    def stored_sum(indices, weights):
        full = torch.zeros(history.numel)
        if isinstance(weights, float):
            history.accumulate_(full, indices, weights, epochs)
        else:
            for i, w in zip(indices.tolist(), weights.tolist()):
                if w:
                    history.accumulate_(full, [i], w, epochs)
        return torch.cat([full[a:b] for a, b in spans])

    # center=True removes the component shared by all training samples (the mean stored row), keeping what
    # is specific to the forget samples; ascending the shared part raises every sample's loss alike.
    recorded = history.epochs[0]["index"]
    shared = stored_sum(recorded, 1.0 / recorded.numel()) if center else None
    guard = {}

    def setup_guard(pool):
        recorded_pool = pool[torch.isin(pool, recorded)][:retain_rows]
        if recorded_pool.numel() == 0:
            raise ValueError("retain_guard: no retain sample outside the retain probe was recorded in the history")
        if retain_guard == "difference":
            guard["mean"] = stored_sum(recorded_pool, 1.0 / recorded_pool.numel())
        elif retain_guard == "fisher":
            second = torch.zeros(sum(b - a for a, b in spans))
            for k in range(recorded_pool.numel()):
                second += stored_sum(recorded_pool[k : k + 1], 1.0) ** 2
            second /= recorded_pool.numel()
            guard["inverse"] = 1.0 / (second + retain_weight * float(second.mean()))
        else:
            rows = torch.stack([stored_sum(recorded_pool[k : k + 1], 1.0) for k in range(recorded_pool.numel())])
            guard["basis"] = _top_directions(rows, retain_rank)
        return {"retain_guard_rows": int(recorded_pool.numel())}

    def guarded(direction):
        if center:
            direction = direction - shared
        if retain_guard == "difference":
            return direction - retain_weight * guard["mean"]
        if retain_guard == "fisher":
            return direction * guard["inverse"]
        if retain_guard == "project":
            basis = guard["basis"]
            return direction - basis @ (basis.T @ direction)
        return direction

    def direction_fn(weights):
        raw = stored_sum(forget, weights)
        return guarded(raw), raw

    scale = history.lrs[0] if scale is None and history.lrs else (1.0 if scale is None else scale)
    model, stats = _run(model, names, direction_fn, lambda: guarded(stored_sum(forget, 1.0)), forget, train_set, matches,
                        mode=mode, heldout=heldout, retain=retain, calibrate=calibrate, scale=scale,
                        retain_tolerance=retain_tolerance, bound_sigma=bound_sigma, max_steps=max_steps,
                        retain_probe_size=retain_probe_size, seed=seed, verbose=verbose, calibration=calibration,
                        statistic=statistic, min_k=min_k, setup_guard=setup_guard if retain_guard else None)
    stats["epochs"] = list(range(history.n_epochs)) if epochs is None else list(epochs)
    stats.update(center=bool(center), retain_guard=retain_guard)
    return model, stats


@_in_eval_mode
def run_gradient_ascent(model, history, forget, train_set, loss_fn=None, *, mode="iterative", params="all",
                        heldout=None, retain=None, calibrate=True, scale=1e-3, retain_tolerance=0.05,
                        retain_guard=None, retain_weight=1.0, retain_batch=32, calibration="mean", statistic="loss",
                        min_k=0.2, tokens="all", objective="ascent", reference_order=5, bound_sigma=2.0, max_steps=20,
                        threshold=85.0, retain_probe_size=48, seed=0, verbose=False):
    """Baseline: ascent along fresh gradients of the forget loss, recomputed at every step, on `params`
    (default the whole model); history is not used. loss_fn(logits, labels) is a batch-mean loss (default:
    the per-sample mean token loss). retain_guard, from retain_batch retain samples outside the retain probe:
    "difference" adds a descent step on their loss (a new batch each step), weighted retain_weight (gradient
    difference); "project" drops the ascent direction's component along their mean gradient when it would
    raise their loss; "fisher" divides the direction by their diagonal empirical Fisher (mean squared
    per-sample gradient, once at the start) + retain_weight x its mean. tokens="reference" weights each
    forget token by how far its loss is below a retain-only n-gram reference (order reference_order);
    objective="reference_kl" moves the forget tokens towards that reference's distributions instead of
    ascending; tokens="min_k" ascends on each forget sample's min_k fraction of lowest-probability tokens only.
    statistic: "loss" or "min_k", what the calibration measures (see docs/lm_unlearning.md)."""
    _check_options(retain_guard, retain_weight, 1, calibration, statistic, min_k)
    if not (isinstance(retain_batch, int) and retain_batch >= 1):
        raise ValueError(f"retain_batch must be an integer >= 1, got {retain_batch!r}")
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be one of {TOKEN_MODES}, got {tokens!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "reference_kl" and tokens != "all":
        raise ValueError("tokens: objective='reference_kl' chooses its tokens itself; leave tokens='all'")
    if (tokens != "all" or objective == "reference_kl") and loss_fn is not None:
        raise ValueError("loss_fn: tokens='reference' / 'min_k' and objective='reference_kl' build the forget loss "
                         "per token themselves; leave loss_fn None")
    forget, matches = _resolve_forget(forget, train_set, threshold)
    names = select_params(model, params)
    named = dict(model.named_parameters())
    custom_loss = loss_fn
    reference = target = None
    if tokens == "reference" or objective == "reference_kl":  # retain-only n-gram reference (see reference.py)
        from .reference import NgramReference

        keep = torch.ones(len(train_set), dtype=torch.bool)
        keep[forget] = False
        retain_all = _probe(train_set, torch.nonzero(keep).reshape(-1))
        counts = NgramReference(retain_all.input_ids, retain_all.labels, order=reference_order,
                                vocab_size=getattr(getattr(model, "config", None), "vocab_size", None))
        forget_batch = _probe(train_set, forget)
        if objective == "reference_kl":
            # target distribution per forget token: the reference's where the reference predicts the true token
            # worse than the model does (content the model can only know from the forget sample), else the
            # model's own (unchanged)
            ref = counts.distributions(forget_batch.input_ids, forget_batch.labels)
            with torch.no_grad():
                own = torch.softmax(forward_logits(model, forget_batch.input_ids)[:, :-1].float(), dim=-1)
            truth = forget_batch.labels[:, 1:].clamp(min=0).unsqueeze(-1)
            learned = ref.gather(-1, truth) < own.gather(-1, truth)
            target = torch.where(learned, ref, own)
            target_mask = (forget_batch.labels[:, 1:] != -100).float()
        else:
            reference = counts.token_losses(forget_batch.input_ids, forget_batch.labels)

    def fresh(indices, weights, targeted=False):
        """Gradient of sum_i weights_i * loss_i over the samples `indices` (targeted: the forget samples with
        token weights from the reference)."""
        probe = _probe(train_set, indices)
        model.zero_grad(set_to_none=True)
        logits = forward_logits(model, probe.input_ids)
        if targeted and target is not None:
            # minus the KL(target || model) per sample: ascending it moves the model towards the targets
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            kl = (target * (target.clamp(min=1e-12).log() - logp)).sum(-1) * target_mask
            loss = -((kl.sum(1) / target_mask.sum(1).clamp(min=1)) * weights).sum()
        elif targeted and tokens == "min_k":
            # Min-K%-targeted: the mean loss of each sample's lowest-probability tokens (chosen at this step)
            logp, mask = token_logprobs(logits, probe.labels)
            select, k = min_k_select(logp, mask, min_k)
            loss = ((-(logp * select).sum(1) / k) * weights).sum()
        elif targeted and reference is not None:
            # token-targeted: each token weighted by how far its loss is below the retain-only reference
            logp, mask = token_logprobs(logits, probe.labels)
            excess = (reference + logp.detach()).clamp(min=0) * mask
            per_sample = -(excess * logp).sum(1) / mask.sum(1).clamp(min=1)
            loss = (per_sample * weights).sum()
        elif custom_loss is None:
            loss = (sample_losses(logits, probe.labels) * weights).sum()
        else:  # a user loss is a batch mean: weight the samples through one call per sample group
            loss = sum(w * custom_loss(logits[k : k + 1], probe.labels[k : k + 1]) for k, w in enumerate(weights.tolist()) if w)
        grads = torch.autograd.grad(loss, [named[n] for n in names])
        return torch.cat([g.reshape(-1) for g in grads]).detach()

    guard = {"step": 0}

    def setup_guard(pool):
        guard["pool"] = pool
        if retain_guard == "fisher":  # diagonal empirical Fisher of retain samples at the current parameters
            from .recording import per_sample_gradients

            batch = _probe(train_set, pool[:retain_batch])
            rows = per_sample_gradients(model, names, batch.input_ids, batch.labels)
            fisher = (rows ** 2).mean(0)
            guard["inverse"] = 1.0 / (fisher + retain_weight * float(fisher.mean()))
        return {"retain_guard_pool": int(pool.numel())}

    def direction_fn(weights):
        raw = fresh(forget, weights, targeted=True)
        if retain_guard is None:
            return raw, raw
        if retain_guard == "fisher":  # move least where retain samples are most sensitive
            return raw * guard["inverse"], raw
        pool = guard["pool"]
        start = (guard["step"] * retain_batch) % pool.numel()
        batch = torch.cat([pool, pool])[start : start + min(retain_batch, pool.numel())]
        guard["step"] += 1
        g_retain = fresh(batch, torch.full((batch.numel(),), 1.0 / batch.numel()))
        if retain_guard == "difference":
            return raw - retain_weight * g_retain, raw
        dot = float(raw @ g_retain)
        if dot > 0:  # ascending would raise the retain batch's loss to first order: drop that component
            raw_guarded = raw - dot / max(float(g_retain @ g_retain), 1e-30) * g_retain
            return raw_guarded, raw
        return raw, raw

    n = forget.numel()
    model, stats = _run(model, names, direction_fn, lambda: direction_fn(torch.ones(n))[0], forget, train_set, matches,
                        mode=mode, heldout=heldout, retain=retain, calibrate=calibrate, scale=scale,
                        retain_tolerance=retain_tolerance, bound_sigma=bound_sigma, max_steps=max_steps,
                        retain_probe_size=retain_probe_size, seed=seed, verbose=verbose, calibration=calibration,
                        statistic=statistic, min_k=min_k, setup_guard=setup_guard if retain_guard else None)
    stats.update(retain_guard=retain_guard, tokens=tokens, objective=objective)
    return model, stats
