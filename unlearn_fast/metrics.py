"""Evaluation of an unlearned model against the original and the retrained one (uf.metrics, uf.audit).

Membership inference follows the unlearning literature: the attack separates forget samples from
held-out samples; success for unlearning is an AUC close to the retrained model's (not below it).
"""
import json
import math
import numbers
import os
from collections.abc import Mapping

import torch

from .history import flat_params


def _evaluate(model, X, batch_size, fn):
    """fn(outputs, slice) over batches in eval mode and without grad; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [fn(model(X[i : i + batch_size]), slice(i, i + batch_size)) for i in range(0, len(X), batch_size)]
    finally:
        model.train(was_training)


def per_sample_losses(model, X, y, loss=torch.nn.functional.cross_entropy, batch_size=4096):
    return torch.cat(_evaluate(model, X, batch_size, lambda out, s: loss(out, y[s], reduction="none"))).double()


def accuracy(model, X, y, batch_size=4096):
    return sum(_evaluate(model, X, batch_size, lambda out, s: int((out.argmax(-1) == y[s]).sum()))) / len(X)


def auc(scores_pos, scores_neg):
    """Area under the ROC curve: P(score_pos > score_neg) + P(tie)/2 (Mann-Whitney U, average ranks)."""
    scores = torch.cat([scores_pos, scores_neg]).double()
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mia_auc_loss_threshold(member_losses, nonmember_losses):
    """Loss-threshold attack (Yeom et al. 2018): lower loss means member."""
    return auc(-member_losses, -nonmember_losses)


def mia_auc_logistic(member_losses, nonmember_losses, folds=5, seed=0):
    """Logistic regression on per-sample losses with stratified k-fold CV (NeurIPS 2023 unlearning kit); mean AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    gen = torch.Generator().manual_seed(seed)
    n = min(len(member_losses), len(nonmember_losses))
    if n < folds:
        raise ValueError(f"mia_auc_logistic: need at least {folds} members and non-members, got {n}")
    # balance the classes so chance is 0.5
    m = member_losses[torch.randperm(len(member_losses), generator=gen)[:n]]
    h = nonmember_losses[torch.randperm(len(nonmember_losses), generator=gen)[:n]]
    losses = torch.cat([m, h])
    X = torch.stack([losses, torch.log(losses.clamp(min=0) + 1e-12)], dim=1).numpy()
    labels = torch.cat([torch.ones(n), torch.zeros(n)]).numpy()
    scores = []
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, labels):
        clf = LogisticRegression().fit(X[train], labels[train])
        scores.append(roc_auc_score(labels[test], clf.predict_proba(X[test])[:, 1]))
    return float(sum(scores) / len(scores))


def relative_distance(model, retrained, original):
    """|w_model - w_retrained| / |w_original - w_retrained|: 0 is perfect, 1 is no better than not unlearning."""
    w, wr, wo = flat_params(model).double(), flat_params(retrained).double(), flat_params(original).double()
    gap, dist = torch.linalg.vector_norm(wo - wr), torch.linalg.vector_norm(w - wr)
    if gap == 0:  # nothing to unlearn: only the retrained model itself is at distance 0
        return 0.0 if dist == 0 else float("inf")
    return float(dist / gap)


POISON_MIN_SAMPLES = 10


def poison_recovery(acc_unlearned, acc_original, acc_retrained, n_test=None, min_samples=POISON_MIN_SAMPLES):
    """(acc_unlearned - acc_original) / (acc_retrained - acc_original): 1 recovers all retraining gains.

    Undefined (NaN) when retraining gains nothing, and, given the test-set size n_test, when its gain is
    below `min_samples` test samples: one sample is then 1 / min_samples = 0.1 or more of the ratio, too
    coarse for a 0.9 goal (a gain of -1 or +1 sample makes the ratio 0, 1 or 2 by itself).
    """
    gain = acc_retrained - acc_original
    if gain == 0 or (n_test is not None and abs(gain) * n_test < min_samples - 1e-9):
        return float("nan")
    return (acc_unlearned - acc_original) / gain


NOT_UNLEARNED_DISTANCE = 0.9


def verdict(stats=None, relative_distance=None, threshold=NOT_UNLEARNED_DISTANCE):
    """(unlearned, reason): whether a result may be reported as an unlearned model at all.

    Every report (the demo table, `audit`, the benchmarks) asks this before printing a speed-up, so
    that a method that gave up is never credited with being fast. The rule, in order:

    1. `stats` (the method's result.stats) says so: ``stats["unlearned"] is False`` (reason from
       ``stats["reason"]`` when it is a string), or, when the method sets no "unlearned" key,
       ``stats["converged"] is False`` (Mini's stopped-unconverged flag). An explicit "unlearned"
       key wins over "converged".
    2. The model is essentially the original: `relative_distance` (|w - w_retrained| /
       |w_original - w_retrained|, see relative_distance) is >= `threshold` (0.9), or is NaN
       (nothing shows that it moved towards the retrained model).

    Otherwise the result counts as unlearned. Either argument may be None (not known); with both
    None the answer is (True, ...) with a reason that says nothing was checked.
    """
    if stats is not None and not isinstance(stats, Mapping):
        raise TypeError(f"verdict: stats must be a dict (the method's result.stats) or None, got {type(stats).__name__}")
    if relative_distance is not None and (isinstance(relative_distance, bool) or not isinstance(relative_distance, numbers.Real)):
        raise TypeError(f"verdict: relative_distance must be a real number or None, got {relative_distance!r}")
    if not (isinstance(threshold, numbers.Real) and 0 < threshold <= 1):
        raise ValueError(f"verdict: threshold must be in (0, 1], got {threshold!r}")
    stats = stats or {}
    if "unlearned" in stats:
        if stats["unlearned"] is False:
            reason = stats.get("reason")
            return False, reason if isinstance(reason, str) and reason else "the method reports that it did not unlearn"
    elif stats.get("converged") is False:
        return False, "the method stopped unconverged"
    if relative_distance is not None:
        d = float(relative_distance)
        if math.isnan(d):
            return False, "relative distance to the retrained model is undefined (NaN)"
        if d >= threshold:
            return False, f"essentially the original model: relative distance {d:.3g} >= {threshold:g}"
    checked = (["method stats"] if stats else []) + ([f"relative distance {float(relative_distance):.3g} < {threshold:g}"]
                                                     if relative_distance is not None else [])
    noise = stats.get("sgd_noise_estimate")
    if isinstance(noise, numbers.Real) and math.isfinite(noise):  # Mini: how close its model can get at best
        checked.append(f"SGD noise leaves about {float(noise):.2g} of the move to the exact retrain")
    return True, ("passed: " + ", ".join(checked)) if checked else "nothing checked: neither stats nor relative distance given"


def json_safe(obj):
    """obj with every non-finite float (NaN, inf) replaced by None, recursively, so that json.dump
    writes valid JSON (the standard has no NaN; Python's default writes a bare NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj, path):
    """Write obj as strict JSON (non-finite floats as null) to path, creating its directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)


def check_classification(model, data, who):
    """The metrics here are a classifier's (accuracy, cross-entropy losses for membership inference): data must be
    (X, y) with y integer class labels, one per sample, and the model must map X to class scores [n, classes >= 2]
    (cross-entropy over one output is 0 for every sample: a regression model would score as "no leakage")."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise ValueError(f"{who}: must be a pair (X, y) of tensors, got {type(data).__name__}")
    X, y = data
    if len(X) != len(y) or len(y) == 0:
        raise ValueError(f"{who}: X and y must hold the same number (> 0) of samples, got {len(X)} and {len(y)}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{who}: y must be integer class labels, one per sample (these metrics are a classifier's: accuracy and "
                         f"cross-entropy membership inference), got {y.dtype} of shape {tuple(y.shape)}")
    out = _evaluate(model, X[:2], 2, lambda out, s: out)[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] < 2:
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{who}: the model must return class scores of shape [samples, classes >= 2] for these metrics (a "
                         f"classifier's), got {got}")


def audit(original, unlearned, retrained, test, forget, heldout, retain=None, poisoned=False, path=None, stats=None):
    """All metrics for one unlearning result; (X, y) pairs for test, forget, held-out and retain data.

    Returns {"original": {...}, "unlearned": {...}, "retrained": {...}, "relative_distance": ...,
    "poison_recovery": ... (when poisoned), "verdict": {"unlearned": bool, "reason": str}}; the verdict
    is verdict(stats, relative_distance), so pass the method's result.stats when you have them. With
    `path`, also writes the dict as strict JSON (NaN and inf as null).
    """
    if stats is not None and not isinstance(stats, Mapping):  # before the metrics, which take a while
        raise TypeError(f"audit: stats must be a dict (the method's result.stats) or None, got {type(stats).__name__}")
    for name, data in (("test", test), ("forget", forget), ("heldout", heldout), ("retain", retain)):
        if data is not None:
            for model in (original, unlearned, retrained):
                check_classification(model, data, f"audit: {name}")
    report = {}
    for name, model in (("original", original), ("unlearned", unlearned), ("retrained", retrained)):
        f_loss = per_sample_losses(model, *forget)
        h_loss = per_sample_losses(model, *heldout)
        row = {
            "test_accuracy": accuracy(model, *test),
            "forget_accuracy": accuracy(model, *forget),
            "mia_auc_loss": mia_auc_loss_threshold(f_loss, h_loss),
            "mia_auc_logistic": mia_auc_logistic(f_loss, h_loss) if min(len(f_loss), len(h_loss)) >= 5 else float("nan"),
            "forget_loss": float(f_loss.mean()),
        }
        if retain is not None:
            row["retain_accuracy"] = accuracy(model, *retain)
        report[name] = row
    report["relative_distance"] = relative_distance(unlearned, retrained, original)
    if poisoned:
        report["poison_recovery"] = poison_recovery(
            report["unlearned"]["test_accuracy"], report["original"]["test_accuracy"], report["retrained"]["test_accuracy"], n_test=len(test[0])
        )
    unlearned_ok, reason = verdict(stats, report["relative_distance"])
    report["verdict"] = {"unlearned": unlearned_ok, "reason": reason}
    if path is not None:
        write_json(report, path)
    return report
