"""Mini's finish() summary (mini.final_summary) on the benchmark's runs (logistic regression unless --model), timed in one process against
the training run and, with --against, against another version of unlearn_fast/methods/mini.py (for example
`git show REV:unlearn_fast/methods/mini.py > /tmp/mini_rev.py`): both summaries computed on the same recorded run, calls
alternated, medians; the largest relative difference between the two summaries' tensors is printed too.

    .venv/bin/python benchmarks/mini_finish.py [--against FILE] [--rounds 7] [--model mlp] [--momentum 0.9] DATA ...
    (DATA: digits mnist1d breast_cancer wine; the CNN reads digits only)
"""
import argparse, importlib.util, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.dirname(__file__))
import e2e_workloads as wl
import unlearn_fast as uf
from unlearn_fast.methods import mini
from machine import cpu_model

parser = argparse.ArgumentParser()
parser.add_argument("data", nargs="+")
parser.add_argument("--against", default=None, help="another mini.py to time on the same runs")
parser.add_argument("--rounds", type=int, default=7)
parser.add_argument("--model", default="logistic", choices=wl.MODELS)
parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum of the decaying-lr regime")
args = parser.parse_args()
torch.set_num_threads(1)
other = None
if args.against:  # loaded inside the package so that its relative imports resolve
    spec = importlib.util.spec_from_file_location("unlearn_fast.methods.mini_against", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
print(f"`python benchmarks/mini_finish.py {' '.join(sys.argv[1:])}` on {cpu_model()}, {os.cpu_count()} cores, 1 torch thread, "
      f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}\n")
print("| data | training s | final_summary s (median) | / training | against: final_summary s | speed-up | largest relative difference |")
print("|---|---|---|---|---|---|---|")
for name in args.data:
    Xtr, ytr, _, _ = wl.load_data(name)
    train_set = torch.utils.data.TensorDataset(Xtr, ytr)
    model = wl.make_model(args.model, Xtr.shape[1], int(ytr.max()) + 1, 0)
    captured, summary = {}, mini.final_summary
    mini.final_summary = lambda *a, **k: captured.update(a=a, k=k) or summary(*a, **k)  # the recorder's own call
    try:
        _, train_s, _ = wl.train(model, train_set, wl.Regime(momentum=args.momentum), uf.HistoryPolicy(kind="minimal"), model_kind=args.model)
    finally:
        mini.final_summary = summary
    versions = {"this": summary} | ({"against": other.final_summary} if other else {})
    seconds, results = {v: [] for v in versions}, {}
    for r in range(args.rounds):
        for v in (list(versions) if r % 2 == 0 else list(versions)[::-1]):
            start = time.perf_counter()
            results[v] = versions[v](*captured["a"], **captured["k"])
            seconds[v].append(time.perf_counter() - start)
    this = statistics.median(seconds["this"])
    row = [f"{name} {args.model}" + (f" momentum {args.momentum:g}" if args.momentum else ""), f"{train_s:.3f}", f"{this:.4f}", f"{this / train_s:.3f}"]
    if other:
        them = statistics.median(seconds["against"])
        a, b = results["this"], results["against"]
        diff = max(float((a[key].double() - b[key].double()).abs().max() / b[key].double().abs().max().clamp(min=1e-30))
                   for key in a if isinstance(a[key], torch.Tensor) and a[key].is_floating_point())
        row += [f"{them:.4f}", f"{them / this:.2f}x", f"{diff:.1e}"]
    else:
        row += ["-", "-", "-"]
    print("| " + " | ".join(row) + " |", flush=True)
