"""The command line (`python -m unlearn_fast demo|bench|audit`): each command against an independent computation."""
import json
import subprocess
import sys

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import cli, ops


def test_module_entry_point_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "unlearn_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(command in out.stdout for command in ("demo", "bench", "audit"))


def test_demo_unlearns_close_to_retraining(tmp_path, capsys):
    rows = cli.run(["demo", "--data", "digits", "--ratio", "0.1", "--json", str(tmp_path / "demo.json")])
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"retrain", "deltagrad", "mini"}
    assert by_method["retrain"]["relative_distance"] == 0.0
    # benchmarks/results/end_to_end.md, digits logistic 10 %: DeltaGrad 0.073, Mini 0.061 (different forget set here)
    assert by_method["deltagrad"]["relative_distance"] < 0.2 and by_method["mini"]["relative_distance"] < 0.2
    assert abs(by_method["mini"]["test_accuracy"] - by_method["retrain"]["test_accuracy"]) <= 0.01
    assert json.loads((tmp_path / "demo.json").read_text())["rows"] == json.loads(json.dumps(rows))
    printed = capsys.readouterr().out
    assert "rel. dist" in printed and "mini" in printed


def test_demo_rejects_a_ratio_outside_0_1():
    with pytest.raises(SystemExit, match="--ratio"):
        cli.run(["demo", "--ratio", "1.5"])


def test_bench_checks_each_backend_against_its_reference(monkeypatch):
    rows = cli.run(["bench", "--size", "5003", "--reps", "1"])
    assert [r["op"].split()[0] for r in rows] == ["quantize_blockwise", "dequantize_blockwise", "dequantize_axpy_", "softmax_linear_hvp"]
    assert all(r["seconds"] > 0 and r["reference_seconds"] > 0 for r in rows)
    monkeypatch.setattr(ops, "softmax_linear_hvp", lambda X, W, V: torch.zeros_like(V))  # a broken backend must stop the benchmark
    with pytest.raises(AssertionError, match="softmax_linear_hvp.*differs from the reference"):
        cli.run(["bench", "--size", "5003", "--reps", "1"])


@pytest.fixture
def saved_models(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 5, generator=gen), torch.randint(0, 3, (120,), generator=gen)
    paths = {}
    for i, name in enumerate(("original", "unlearned", "retrained")):
        torch.manual_seed(i)
        model = torch.nn.Linear(5, 3)
        paths[name] = model, tmp_path / f"{name}.pt"
        torch.save(model, paths[name][1])
    data = {"test": (X[:40], y[:40]), "forget": (X[40:60], y[40:60]), "heldout": (X[60:90], y[60:90]), "retain": (X[90:], y[90:])}
    torch.save(data, tmp_path / "data.pt")
    return paths, data, tmp_path


def test_audit_reports_what_uf_audit_computes(saved_models):
    paths, data, tmp = saved_models
    argv = ["audit", "--data", str(tmp / "data.pt"), "--poisoned", "--json", str(tmp / "report.json")]
    for name, (_, path) in paths.items():
        argv += [f"--{name}", str(path)]
    report = cli.run(argv)
    expected = uf.audit(*(paths[n][0] for n in ("original", "unlearned", "retrained")), poisoned=True, **data)
    assert json.dumps(report) == json.dumps(expected)
    assert json.loads((tmp / "report.json").read_text()) == json.loads(json.dumps(expected))


def test_audit_names_the_bad_argument(saved_models):
    paths, data, tmp = saved_models
    torch.save({"test": data["test"]}, tmp / "partial.pt")
    torch.save(torch.zeros(3), tmp / "tensor.pt")
    base = [f"--{n}={p}" for n, (_, p) in paths.items()]
    with pytest.raises(SystemExit, match=r"--data .*lacks \['forget', 'heldout'\]"):
        cli.run(["audit", "--data", str(tmp / "partial.pt"), *base])
    with pytest.raises(SystemExit, match="--original .*holds a Tensor"):
        cli.run(["audit", "--data", str(tmp / "data.pt"), *base, f"--original={tmp / 'tensor.pt'}"])
    with pytest.raises(SystemExit, match="cannot read --unlearned"):
        cli.run(["audit", "--data", str(tmp / "data.pt"), *base, f"--unlearned={tmp / 'missing.pt'}"])
