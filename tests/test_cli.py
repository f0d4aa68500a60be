"""The command line (`python -m unlearn_fast demo|bench|audit`): each command against an independent computation."""
import json
import math
import pickle
import re
import subprocess
import sys
from types import SimpleNamespace

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
    assert json.loads((tmp_path / "demo.json").read_text(), parse_constant=_no_constant)["rows"] == json.loads(json.dumps(rows))
    assert all(r["unlearned"] and r["speedup"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "rel. dist" in printed and "mini" in printed and "not unlearned" not in printed


def test_demo_prints_no_speedup_for_a_result_that_did_not_unlearn(monkeypatch, capsys):
    real = cli.unlearn

    def rigged(model, history, forget, train_set, loss_fn, method):
        res = real(model, history, forget, train_set, loss_fn, method=method)
        if method == "deltagrad":  # claims nothing, but hands back the original model: the distance rule must catch it
            return SimpleNamespace(model=model, seconds=res.seconds / 100, stats={"history_bytes_read": 0})
        if method == "mini":  # a fine model, but the method itself says it gave up
            return SimpleNamespace(model=res.model, seconds=res.seconds / 100, stats={**res.stats, "unlearned": False, "reason": "gave up"})
        return res

    monkeypatch.setattr(cli, "unlearn", rigged)
    rows = {r["method"]: r for r in cli.run(["demo", "--epochs", "3"])}
    printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["retrain"], ["deltagrad"], ["mini"])}
    assert rows["retrain"]["unlearned"] and rows["retrain"]["speedup"] > 0 and printed["retrain"].endswith("x")
    assert rows["deltagrad"]["relative_distance"] == 1.0 and not rows["deltagrad"]["unlearned"] and rows["deltagrad"]["speedup"] is None
    assert "not unlearned (essentially the original model" in printed["deltagrad"]
    assert not rows["mini"]["unlearned"] and rows["mini"]["speedup"] is None and printed["mini"].endswith("not unlearned (gave up)")
    assert not re.search(r"\d\.\dx", printed["deltagrad"] + printed["mini"])  # no speed-up anywhere on those lines


def _no_constant(name):
    raise ValueError(f"invalid JSON constant {name}")


def test_demo_rejects_a_ratio_outside_0_1_and_no_epochs(capsys):
    with pytest.raises(SystemExit, match="--ratio"):
        cli.run(["demo", "--ratio", "1.5"])
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert capsys.readouterr().err.strip() == "unlearn-fast demo: --epochs must be at least 1, got 0"


def test_no_default_output_path_points_into_the_repository():
    for command in ("demo", "bench", "audit"):
        args = cli.parser().parse_args([command] + (["--original=a", "--unlearned=b", "--retrained=c", "--data=d"] if command == "audit" else []))
        assert getattr(args, "json", None) is None  # written only where the user says


def test_bench_checks_each_backend_against_its_reference(monkeypatch):
    rows = cli.run(["bench", "--size", "5003", "--reps", "1"])
    assert [r["op"].split()[0] for r in rows] == ["quantize_blockwise", "dequantize_blockwise", "dequantize_axpy_", "softmax_linear_hvp"]
    assert all(r["seconds"] > 0 and r["reference_seconds"] > 0 for r in rows)
    monkeypatch.setattr(ops, "softmax_linear_hvp", lambda X, W, V: torch.zeros_like(V))  # a broken backend must stop the benchmark
    with pytest.raises(AssertionError, match="softmax_linear_hvp.*differs from the reference"):
        cli.run(["bench", "--size", "5003", "--reps", "1"])


LINEAR = ["--model", "torch.nn:Linear", "--model-kwargs", '{"in_features": 5, "out_features": 3}']


class Marker:
    """A crafted pickle: unpickling it writes a file (any code could run there instead)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('code ran')",)


@pytest.fixture
def saved(tmp_path):
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(120, 5, generator=gen), torch.randint(0, 3, (120,), generator=gen)
    models, paths = {}, {}
    for i, name in enumerate(("original", "unlearned", "retrained")):
        torch.manual_seed(i)
        models[name] = torch.nn.Linear(5, 3)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(models[name].state_dict(), paths[name])
    # 4 forget samples: too few for the logistic attack, whose AUC is then NaN (the JSON must say null)
    data = {"test": (X[:40], y[:40]), "forget": (X[40:44], y[40:44]), "heldout": (X[60:90], y[60:90]), "retain": (X[90:], y[90:])}
    torch.save(data, tmp_path / "data.pt")
    argv = ["audit", "--data", str(tmp_path / "data.pt"), *LINEAR] + [f"--{n}={p}" for n, p in paths.items()]
    return SimpleNamespace(models=models, paths=paths, data=data, tmp=tmp_path, argv=argv)


def _expected(s, **kw):
    return uf.audit(s.models["original"], s.models["unlearned"], s.models["retrained"], **s.data, **kw)


def test_audit_reports_what_uf_audit_computes_as_strict_json(saved, capsys):
    report = cli.run(saved.argv + ["--poisoned", "--json", str(saved.tmp / "out" / "report.json")])
    expected = _expected(saved, poisoned=True)
    assert math.isnan(expected["unlearned"]["mia_auc_logistic"])  # the case that used to print a bare NaN
    assert json.dumps(report) == json.dumps(expected)
    written = json.loads((saved.tmp / "out" / "report.json").read_text(), parse_constant=_no_constant)
    assert written["unlearned"]["mia_auc_logistic"] is None and written["verdict"] == expected["verdict"]
    assert written["relative_distance"] == pytest.approx(expected["relative_distance"])
    table = capsys.readouterr().out  # with a PATH the table is still printed, and it is not JSON
    assert "relative distance" in table and "verdict" in table and "n/a" in table and not table.lstrip().startswith("{")


def test_audit_json_without_a_path_prints_strict_json_only(saved, capsys):
    cli.run(saved.argv + ["--json"])
    out = json.loads(capsys.readouterr().out, parse_constant=_no_constant)
    assert out["unlearned"]["mia_auc_logistic"] is None
    assert out["unlearned"]["test_accuracy"] == pytest.approx(_expected(saved)["unlearned"]["test_accuracy"])
    assert out["verdict"]["unlearned"] in (True, False) and isinstance(out["verdict"]["reason"], str)


def test_audit_carries_the_verdict_of_the_method_stats(saved, capsys):
    (saved.tmp / "stats.json").write_text(json.dumps({"converged": False, "iterations": 100}))
    report = cli.run(saved.argv + ["--stats", str(saved.tmp / "stats.json")])
    assert report["verdict"] == {"unlearned": False, "reason": "the method stopped unconverged"}
    assert "NOT UNLEARNED (the method stopped unconverged)" in capsys.readouterr().out
    # the unlearned model is the original itself: not unlearned whatever the stats say
    argv = [a if not a.startswith("--unlearned=") else f"--unlearned={saved.paths['original']}" for a in saved.argv]
    assert cli.run(argv)["verdict"]["unlearned"] is False


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_audit_refuses_a_crafted_pickle_and_runs_it_only_with_trust_pickle(saved, capsys, writer):
    marker, evil = saved.tmp / "MARKER", saved.tmp / "evil.pt"
    if writer == "torch.save":
        torch.save(Marker(marker), evil)
    else:
        with open(evil, "wb") as f:
            pickle.dump(Marker(marker), f)
    argv = saved.argv + [f"--original={evil}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and "refusing --original" in err and "--trust-pickle" in err and "Traceback" not in err
    with pytest.raises(SystemExit, match="--original"):  # it ran, then was no model (or, bare pickle, no torch file)
        cli.run(argv + ["--trust-pickle"])
    assert marker.read_text() == "code ran"


def test_audit_whole_module_pickles_need_trust_pickle(saved):
    for name, model in saved.models.items():
        torch.save(model, saved.tmp / f"{name}_module.pt")
    argv = ["audit", "--data", str(saved.tmp / "data.pt")] + [f"--{n}={saved.tmp / (n + '_module.pt')}" for n in saved.models]
    with pytest.raises(SystemExit, match="refusing --original .*torch.nn.modules.linear.Linear"):
        cli.run(argv)
    assert json.dumps(cli.run(argv + ["--trust-pickle"])) == json.dumps(_expected(saved))


def test_audit_reads_safetensors_and_a_factory_in_a_file(saved):
    safetensors = pytest.importorskip("safetensors.torch")
    for name, model in saved.models.items():
        safetensors.save_file(model.state_dict(), saved.tmp / f"{name}.safetensors")
    flat = {f"{split}.{part}": t.contiguous() for split, pair in saved.data.items() for part, t in zip("Xy", pair)}
    safetensors.save_file(flat, saved.tmp / "data.safetensors")
    (saved.tmp / "arch.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(5, 3)\n")
    argv = ["audit", "--data", str(saved.tmp / "data.safetensors"), "--model", f"{saved.tmp / 'arch.py'}:make"]
    report = cli.run(argv + [f"--{n}={saved.tmp / (n + '.safetensors')}" for n in saved.models])
    assert json.dumps(report) == json.dumps(_expected(saved))


def test_audit_errors_are_one_line_naming_the_argument(saved, capsys):
    torch.save({"test": saved.data["test"]}, saved.tmp / "partial.pt")
    torch.save({**saved.data, "test": (saved.data["test"][0][:, :4], saved.data["test"][1])}, saved.tmp / "narrow.pt")
    torch.save({**saved.data, "forget": (saved.data["forget"][0], saved.data["forget"][1] + 3)}, saved.tmp / "labels.pt")
    torch.save(torch.zeros(3), saved.tmp / "tensor.pt")
    (saved.tmp / "notes.json").write_text("[1, 2]")
    cases = [
        ([f"--data={saved.tmp / 'partial.pt'}"], r"--data .*lacks \['forget', 'heldout'\]"),
        ([f"--data={saved.tmp / 'narrow.pt'}"], r"--data .*key 'test' \(X of shape \(40, 4\)\) does not fit the --original model"),
        ([f"--data={saved.tmp / 'labels.pt'}"], r"--data .*key 'forget': labels span .* 3 classes"),
        ([f"--original={saved.tmp / 'tensor.pt'}"], r"--original .*holds a Tensor, expected a state dict"),
        ([f"--unlearned={saved.tmp / 'missing.pt'}"], r"--unlearned .*missing.pt': no such file"),
        (["--model-kwargs", '{"in_features": 5, "out_features": 4}'], r"--original .*does not fit --model 'torch.nn:Linear'.*size mismatch"),
        (["--model-kwargs", "{in_features: 5}"], r"--model-kwargs is not valid JSON"),
        (["--model", "torch.nn.Linear"], r"--model 'torch.nn.Linear' must be 'module:function'"),
        (["--model", "no_such_module_xyz:make"], r"--model 'no_such_module_xyz:make': cannot import it"),
        (["--stats", str(saved.tmp / "notes.json")], r"--stats .*holds a JSON list"),
    ]
    for extra, pattern in cases:
        assert cli.main(saved.argv + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(pattern, err), (pattern, err)
    no_model = [a for a in saved.argv if a not in LINEAR]
    assert cli.main(no_model) == 2 and "name the architecture with --model" in capsys.readouterr().err


def test_audit_as_a_process_exits_2_with_one_line_and_no_traceback(saved):
    argv = [a if not a.startswith("--unlearned=") else f"--unlearned={saved.tmp / 'missing.pt'}" for a in saved.argv]
    out = subprocess.run([sys.executable, "-m", "unlearn_fast", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"unlearn-fast audit: --unlearned {str(saved.tmp / 'missing.pt')!r}: no such file"]
    help_text = subprocess.run([sys.executable, "-m", "unlearn_fast", "audit", "--help"], capture_output=True, text=True, timeout=120).stdout
    assert "--trust-pickle" in help_text and "runs whatever code the file" in " ".join(help_text.split())
