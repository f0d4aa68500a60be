"""Command line: `python -m unlearn_fast demo|bench|audit` (also installed as `unlearn-fast`).

demo   train on a bundled data set while recording the history, forget a random (or label-flipped) subset
       with retrain, DeltaGrad and Mini, and print the audit of each against retraining.
bench  time every op's active backend against its pure-torch reference on this machine (medians, ratios)
       and check that both agree.
audit  compare saved original / unlearned / retrained models on saved data and print (or write) the report.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from tqdm import tqdm

from . import metrics, ops, reference
from .backends import backends
from .history import HistoryPolicy
from .unlearn import unlearn
from .workloads import CONFIG, DATASETS, MODELS, load_data, make_model, train

METHODS = ("retrain", "deltagrad", "mini")


# ----------------------------------------------------------------------------- demo
def demo(args):
    torch.set_num_threads(args.threads)
    try:
        Xtr, ytr, Xte, yte = load_data(args.data)
    except ImportError as e:
        raise SystemExit(f"demo: {e}; the data sets come with the eval extra: pip install 'unlearn_fast[eval]'")
    n, c = len(Xtr), int(ytr.max()) + 1
    forget = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[: max(1, int(args.ratio * n))]
    y_used = ytr.clone()
    if args.flip:  # poison the forget set before training, so that unlearning it should repair the model
        y_used[forget] = (y_used[forget] + 1) % c
    train_set = torch.utils.data.TensorDataset(Xtr, y_used)
    model = make_model(args.model, Xtr.shape[1], c, args.seed)
    with tqdm(total=args.epochs, desc=f"training {args.model} on {args.data}, recording", unit="epoch") as bar:
        history, train_s, finish_s = train(model, train_set, HistoryPolicy(kind="full"), seed=args.seed, epochs=args.epochs,
                                           progress=lambda _: bar.update(1))
    loss_fn = torch.nn.functional.cross_entropy
    results = {}
    for method in tqdm(METHODS, desc=f"forgetting {forget.numel()} of {n} samples", unit="method"):
        results[method] = unlearn(model, history, forget, train_set, loss_fn, method=method)
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    rows = []
    for method, res in results.items():
        rep = metrics.audit(model, res.model, results["retrain"].model, test=(Xte, yte), forget=(Xtr[forget], y_used[forget]),
                            heldout=(Xte, yte), retain=(Xtr[keep], y_used[keep]), poisoned=args.flip)
        rows.append({"method": method, "seconds": res.seconds, "speedup": results["retrain"].seconds / res.seconds,
                     "test_accuracy": rep["unlearned"]["test_accuracy"], "mia_auc": rep["unlearned"]["mia_auc_loss"],
                     "relative_distance": rep["relative_distance"], "poison_recovery": rep.get("poison_recovery"),
                     "history_bytes_read": res.stats.get("history_bytes_read"), "converged": res.stats.get("converged")})
    original = metrics.accuracy(model, Xte, yte)
    print(f"\n{args.data}, {args.model}, {'label-flipped' if args.flip else 'random'} forget set of {forget.numel()} / {n} "
          f"({args.ratio:.0%}); training {train_s:.2f} s, history finish() {finish_s:.2f} s; "
          f"original test accuracy {original:.4f}")
    print("speed-up: retrain's seconds over the method's (one call each: `benchmarks/end_to_end.py` takes medians); "
          "relative distance: |w - w_retrained| / |w_original - w_retrained|\n")
    header = (f"{'method':<10} {'seconds':>8} {'speed-up':>8} {'test acc':>8} {'MIA AUC':>8} {'rel. dist':>9} {'history MB read':>15}"
              + (" poison rec." if args.flip else ""))
    print(header)
    print("-" * len(header))
    for r in rows:
        line = (f"{r['method']:<10} {r['seconds']:>8.3f} {r['speedup']:>7.1f}x {r['test_accuracy']:>8.4f} {r['mia_auc']:>8.3f} "
                f"{r['relative_distance']:>9.3f} {r['history_bytes_read'] / 1e6:>15.3f}")
        if args.flip:
            line += f" {r['poison_recovery']:>11.2f}"
        print(line + ("  (unconverged)" if r["converged"] is False else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "run"}, "config": {**CONFIG, "epochs": args.epochs}, "rows": rows}, f, indent=1)
    return rows


# ----------------------------------------------------------------------------- bench
def median_seconds(fn, reps):
    """Median wall time of `reps` calls after one warm-up (first touch of outputs, thread pool start)."""
    fn()
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _updated(inplace_fn, y, *args):
    inplace_fn(y, *args)
    return y


def bench_cases(p, k=8):
    """(name, op call, reference call) for each op, on inputs of about p elements."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(p, generator=gen)
    codes, scales = ops.quantize_blockwise(x, 256, 8)
    y = torch.randn(p, generator=gen)
    n, d, classes = max(64, p // 4096), 512, 10
    X, W, V = torch.randn(n, d, generator=gen), torch.randn(classes, d, generator=gen) / d**0.5, torch.randn(k, classes, d, generator=gen)
    return [
        ("quantize_blockwise int8/256", lambda: ops.quantize_blockwise(x, 256, 8), lambda: reference.quantize_blockwise(x, 256, 8, False, 0)),
        ("dequantize_blockwise int8/256", lambda: ops.dequantize_blockwise(codes, scales, 256, 8, p, torch.float32),
         lambda: reference.dequantize_blockwise(codes, scales, 256, 8, p, torch.float32)),
        # on a copy of y in both: the op updates y in place, and the copy is timed alike on both sides
        ("dequantize_axpy_ int8/256", lambda: ops.dequantize_axpy_(y.clone(), codes, scales, 0.5, 256, 8),
         lambda: _updated(reference.dequantize_axpy_, y.clone(), codes, scales, 0.5, 256, 8)),
        (f"softmax_linear_hvp n={n} d={d} c={classes} k={k}", lambda: ops.softmax_linear_hvp(X, W, V),
         lambda: reference.softmax_linear_hvp(X, W, V)),
    ]


def bench(args):
    torch.set_num_threads(args.threads)
    print(f"active backends: {backends()['active']}; {torch.get_num_threads()} thread(s); median of {args.reps} calls")
    rows = []
    for name, fast, slow in tqdm(bench_cases(args.size), desc="ops", unit="op"):
        got, want = fast(), slow()
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        for a, b in zip(got, want):  # the backend must agree with the reference before its time means anything
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: backend differs from the reference: {m}")
        t_fast, t_ref = median_seconds(fast, args.reps), median_seconds(slow, args.reps)
        rows.append({"op": name, "seconds": t_fast, "reference_seconds": t_ref, "speedup": t_ref / t_fast})
    print(f"\n{'op':<44} {'backend ms':>10} {'reference ms':>12} {'speed-up':>8}")
    for r in rows:
        print(f"{r['op']:<44} {r['seconds'] * 1e3:>10.3f} {r['reference_seconds'] * 1e3:>12.3f} {r['speedup']:>7.1f}x")
    return rows


# ----------------------------------------------------------------------------- audit
def _load_model(path, what):
    try:
        model = torch.load(path, weights_only=False)  # a whole pickled nn.Module, written by torch.save(model, path)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise SystemExit(f"audit: cannot read --{what} {path!r}: {e}")
    if not isinstance(model, torch.nn.Module):
        raise SystemExit(f"audit: --{what} {path!r} holds a {type(model).__name__}, expected a module saved with torch.save(model, path)")
    return model.eval()


def audit(args):
    models = {what: _load_model(getattr(args, what), what) for what in ("original", "unlearned", "retrained")}
    try:
        data = torch.load(args.data, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise SystemExit(f"audit: cannot read --data {args.data!r}: {e}")
    missing = [key for key in ("test", "forget", "heldout") if key not in data]
    if missing:
        raise SystemExit(f"audit: --data {args.data!r} lacks {missing}; expected a dict of (X, y) pairs test, forget, heldout (and optionally retain)")
    report = metrics.audit(models["original"], models["unlearned"], models["retrained"], test=data["test"], forget=data["forget"],
                           heldout=data["heldout"], retain=data.get("retain"), poisoned=args.poisoned, path=args.json)
    print(json.dumps(report, indent=1))
    return report


# ----------------------------------------------------------------------------- entry point
def parser():
    top = argparse.ArgumentParser(prog="unlearn-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="record, unlearn with every method, audit against retraining")
    p.add_argument("--data", choices=DATASETS, default="digits")
    p.add_argument("--model", choices=MODELS, default="logistic")
    p.add_argument("--ratio", type=float, default=0.1, help="fraction of the training set to forget (default 0.1)")
    p.add_argument("--flip", action="store_true", help="flip the forget set's labels before training (poison recovery)")
    p.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help="each op's backend against its pure-torch reference")
    p.add_argument("--size", type=int, default=1 << 22, help="elements per codec call (default 2^22)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=bench)
    p = sub.add_parser("audit", help="metrics of saved models (torch.save(model, path)) on saved data")
    p.add_argument("--original", required=True)
    p.add_argument("--unlearned", required=True)
    p.add_argument("--retrained", required=True)
    p.add_argument("--data", required=True, help="torch.save'd dict of (X, y) pairs: test, forget, heldout, optional retain")
    p.add_argument("--poisoned", action="store_true", help="the forget set was label-flipped: report poison recovery")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(run=audit)
    return top


def run(argv=None):
    """Parse argv and run the command; returns its rows or report (main() returns an exit status instead)."""
    args = parser().parse_args(argv)
    if args.command == "demo" and not 0 < args.ratio < 1:
        raise SystemExit(f"demo: --ratio must be in (0, 1), got {args.ratio}")
    return args.run(args)


def main(argv=None):
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
