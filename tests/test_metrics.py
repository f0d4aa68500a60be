"""metrics.verdict (the one rule every report uses before it prints a speed-up), strict JSON, and uf.audit's verdict."""
import json
import math

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import metrics


def _no_constant(name):
    raise ValueError(f"invalid JSON constant {name}")


@pytest.mark.parametrize("stats, distance, unlearned, reason", [
    ({"unlearned": False, "reason": "budget spent"}, 0.05, False, "budget spent"),
    ({"unlearned": False}, None, False, "the method reports that it did not unlearn"),
    ({"converged": False}, 0.05, False, "the method stopped unconverged"),  # Mini's flag, while methods lack "unlearned"
    ({"converged": False, "unlearned": True}, 0.05, True, "passed"),  # an explicit "unlearned" wins over "converged"
    ({"converged": True}, 1.0, False, "essentially the original model"),  # stats cannot vouch for the original model
    ({}, 0.9, False, "essentially the original model"),
    (None, float("inf"), False, "essentially the original model"),
    (None, float("nan"), False, "undefined"),
    (None, 0.5, True, "relative distance 0.5 < 0.9"),
    ({"converged": True}, None, True, "method stats"),
    ({"unlearned": True, "sgd_noise_estimate": 0.12}, None, True, "SGD noise leaves about 0.12 of the move"),  # Mini's estimate
    (None, None, True, "nothing checked"),
])
def test_verdict_rule(stats, distance, unlearned, reason):
    got, why = metrics.verdict(stats, distance)
    assert got is unlearned and reason in why


def test_verdict_names_its_bad_arguments():
    with pytest.raises(TypeError, match="stats must be a dict"):
        metrics.verdict([("converged", False)])
    with pytest.raises(TypeError, match="relative_distance must be a real number"):
        metrics.verdict(None, "0.5")
    with pytest.raises(ValueError, match="threshold must be in"):
        metrics.verdict(None, 0.5, threshold=0)


def test_json_safe_writes_null_for_non_finite_floats(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2, "x"), "e": None, "f": True}
    assert metrics.json_safe(obj) == {"a": None, "b": [1.0, None, {"c": None}], "d": [2, "x"], "e": None, "f": True}
    metrics.write_json(obj, tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text(), parse_constant=_no_constant)["b"] == [1.0, None, {"c": None}]


@pytest.fixture
def three_models():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(90, 4, generator=gen), torch.randint(0, 3, (90,), generator=gen)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(torch.nn.Linear(4, 3))
    # 3 forget samples: the logistic attack needs 5, so its AUC is NaN
    return models, {"test": (X[:30], y[:30]), "forget": (X[30:33], y[30:33]), "heldout": (X[40:70], y[40:70])}


def test_audit_carries_the_verdict_and_writes_strict_json(three_models, tmp_path):
    (original, unlearned, retrained), data = three_models
    report = uf.audit(original, unlearned, retrained, **data, path=tmp_path / "r.json")
    assert report["verdict"] == dict(zip(("unlearned", "reason"), metrics.verdict(None, report["relative_distance"])))
    assert math.isnan(report["unlearned"]["mia_auc_logistic"])
    written = json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constant)  # the old writer put a bare NaN here
    assert written["unlearned"]["mia_auc_logistic"] is None
    # the original handed back as the "unlearned" model, with stats that claim success: not unlearned
    same = uf.audit(original, original, retrained, **data, stats={"converged": True})
    assert same["relative_distance"] == 1.0 and same["verdict"]["unlearned"] is False
    flagged = uf.audit(original, retrained, retrained, **data, stats={"converged": False})
    assert flagged["relative_distance"] == 0.0 and flagged["verdict"] == {"unlearned": False, "reason": "the method stopped unconverged"}
    with pytest.raises(TypeError, match="stats must be a dict"):
        uf.audit(original, unlearned, retrained, **data, stats="converged")
