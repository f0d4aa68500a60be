"""Command line: `python -m unlearn_fast demo|bench|audit` (also installed as `unlearn-fast`).

demo   train on a bundled data set while recording the history, forget a random (or label-flipped) subset
       with retrain, DeltaGrad and Mini, and print the audit of each against retraining.
bench  time every op's active backend against its pure-torch reference on this machine (medians, ratios)
       and check that both agree.
audit  compare saved original / unlearned / retrained models (state dicts or safetensors, built with --model) on saved
       data; print a table (or strict JSON) and the verdict: whether the result unlearned at all (metrics.verdict).
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import pickle
import re
import statistics
import sys
import textwrap
import time

import torch
from tqdm import tqdm

from . import metrics, ops, reference
from .backends import backends
from .history import HistoryPolicy
from .unlearn import unlearn
from .workloads import CONFIG, DATASETS, MODELS, load_data, make_model, train

METHODS = ("retrain", "deltagrad", "mini")


class CommandError(SystemExit):
    """Bad input to a command: main() prints the message as one line on stderr and exits with status 2 (no traceback).

    A SystemExit, so that an uncaught one still ends the program with status 2 rather than a traceback."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


# ----------------------------------------------------------------------------- demo
def demo(args):
    torch.set_num_threads(args.threads)
    try:
        Xtr, ytr, Xte, yte = load_data(args.data)
    except ImportError as e:
        raise CommandError(f"demo: {e}; the data sets come with the eval extra: pip install 'unlearn_fast[eval]'")
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
                            heldout=(Xte, yte), retain=(Xtr[keep], y_used[keep]), poisoned=args.flip, stats=res.stats)
        unlearned_ok, reason = rep["verdict"]["unlearned"], rep["verdict"]["reason"]
        rows.append({"method": method, "seconds": res.seconds,
                     # no speed-up for a result that did not unlearn: being fast at returning the original model is no result
                     "speedup": results["retrain"].seconds / res.seconds if unlearned_ok else None,
                     "unlearned": unlearned_ok, "verdict": reason,
                     "test_accuracy": rep["unlearned"]["test_accuracy"], "mia_auc": rep["unlearned"]["mia_auc_loss"],
                     "relative_distance": rep["relative_distance"], "poison_recovery": rep.get("poison_recovery"),
                     "history_bytes_read": res.stats.get("history_bytes_read"), "converged": res.stats.get("converged")})
    original = metrics.accuracy(model, Xte, yte)
    print(f"\n{args.data}, {args.model}, {'label-flipped' if args.flip else 'random'} forget set of {forget.numel()} / {n} "
          f"({args.ratio:.0%}); training {train_s:.2f} s, history finish() {finish_s:.2f} s; "
          f"original test accuracy {original:.4f}")
    print("speed-up: retrain's seconds over the method's (one call each: `benchmarks/end_to_end.py` takes medians), shown only for "
          f"results that unlearned (metrics.verdict: relative distance < {metrics.NOT_UNLEARNED_DISTANCE:g} and no failure flag from the "
          "method); relative distance: |w - w_retrained| / |w_original - w_retrained|\n")
    # speed-up last: a "not unlearned (...)" note of any length takes its place without shifting the other columns
    header = (f"{'method':<10} {'seconds':>8} {'test acc':>8} {'MIA AUC':>8} {'rel. dist':>9} {'history MB read':>15}"
              + (" poison rec." if args.flip else "") + "  speed-up")
    print(header)
    print("-" * len(header))
    for r in rows:
        mb = "n/a" if r["history_bytes_read"] is None else f"{r['history_bytes_read'] / 1e6:.3f}"
        line = (f"{r['method']:<10} {r['seconds']:>8.3f} {r['test_accuracy']:>8.4f} {r['mia_auc']:>8.3f} "
                f"{_fmt(r['relative_distance'], '.3f'):>9} {mb:>15}")
        if args.flip:
            line += f" {_fmt(r['poison_recovery'], '.2f'):>11}"
        line += f"  {r['speedup']:>7.1f}x" if r["unlearned"] else f"  not unlearned ({r['verdict']})"
        print(line)
    if args.json:
        metrics.write_json({"args": {k: v for k, v in vars(args).items() if k != "run"}, "config": {**CONFIG, "epochs": args.epochs}, "rows": rows},
                           args.json)
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
SPLITS, OPTIONAL_SPLITS = ("test", "forget", "heldout"), ("retain",)
PICKLE_WARNING = (
    "A file written by torch.save(model, path) is a pickle, and unpickling runs whatever code the file names: a crafted "
    "file runs code on your machine. audit therefore reads state dicts (torch.save(model.state_dict(), path), loaded "
    "with weights_only=True) or safetensors files, and builds the model with --model; it refuses pickles unless "
    "--trust-pickle is given."
)


def _one_line(e):
    """An exception as one line: torch's messages span several (load_state_dict lists every key)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read(path, what, trust_pickle):
    """The object in a safetensors file or a torch.save file; pickles only with --trust-pickle."""
    if not os.path.isfile(path):
        raise CommandError(f"audit: --{what} {path!r}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CommandError(f"audit: cannot read --{what} {path!r}: {_one_line(e)}")
    # torch.save writes a zip archive ("PK"); an older torch.save or a bare pickle starts with the pickle opcode 0x80;
    # anything else is read as safetensors (an 8-byte header length, then a JSON header)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CommandError(f"audit: --{what} {path!r} is not a torch.save file, and reading it as safetensors needs: pip install safetensors")
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on a bad header
            raise CommandError(f"audit: cannot read --{what} {path!r} as torch.save or safetensors: {_one_line(e)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:  # weights_only refused a global: a whole module, or a crafted file
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise CommandError(
            f"audit: refusing --{what} {path!r}: it is a pickle that names {named.group(1) if named else 'objects other than tensors'}, "
            "and unpickling it could run code. Save model.state_dict() (or safetensors) and pass --model, "
            "or pass --trust-pickle if you trust the file"
        )
    except Exception as e:  # a corrupt archive, an unreadable file; with --trust-pickle, whatever the pickle raises
        raise CommandError(f"audit: cannot read --{what} {path!r}: {_one_line(e)}")


def _factory(spec, kwargs_json):
    """The callable named by --model 'package.module:function' or 'path/to/file.py:function' (user code, never from a file)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise CommandError(f"audit: --model {spec!r} must be 'module:function' or 'file.py:function', e.g. 'torchvision.models:resnet18'")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json is not None else {}
    except json.JSONDecodeError as e:
        raise CommandError(f"audit: --model-kwargs is not valid JSON: {e}")
    if not isinstance(kwargs, dict):
        raise CommandError(f"audit: --model-kwargs must be a JSON object of keyword arguments, got {kwargs_json!r}")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise CommandError(f"audit: --model {spec!r}: no such file {module_name!r}")
            name = "_unlearn_fast_model_" + os.path.splitext(os.path.basename(module_name))[0]
            loader_spec = importlib.util.spec_from_file_location(name, module_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # dataclasses and pickling look the defining module up there
            loader_spec.loader.exec_module(module)
        else:
            # the installed `unlearn-fast` script does not put the working directory on sys.path (python -m does):
            # append it, so that a models.py next to the user is found without shadowing installed packages
            added = os.getcwd() not in sys.path
            if added:
                sys.path.append(os.getcwd())
            try:
                module = importlib.import_module(module_name)
            finally:
                if added:
                    sys.path.remove(os.getcwd())
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part)
    except CommandError:
        raise
    except Exception as e:
        raise CommandError(f"audit: --model {spec!r}: cannot import it: {_one_line(e)}")
    if not callable(fn):
        raise CommandError(f"audit: --model {spec!r} names a {type(fn).__name__}, not a callable that returns a model")
    return lambda: fn(**kwargs)


def _build(obj, path, what, make_model, spec):
    """An nn.Module in eval mode from what _read returned: a state dict (with --model) or, trusted, a whole module."""
    if isinstance(obj, torch.nn.Module):  # only reachable with --trust-pickle
        return obj.eval()
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise CommandError(f"audit: --{what} {path!r} holds a {type(obj).__name__}, expected a state dict (names to tensors, "
                           "torch.save(model.state_dict(), path) or safetensors)")
    if make_model is None:
        raise CommandError(f"audit: --{what} {path!r} holds a state dict: name the architecture with --model module:function")
    try:
        model = make_model()
    except Exception as e:  # user code: report it as one line that names the option
        raise CommandError(f"audit: --model {spec!r} failed: {_one_line(e)}")
    if not isinstance(model, torch.nn.Module):
        raise CommandError(f"audit: --model {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    try:
        model.load_state_dict(obj)
    except Exception as e:  # missing / unexpected keys, shape mismatches
        raise CommandError(f"audit: --{what} {path!r} does not fit --model {spec!r}: {_one_line(e)}")
    return model.eval()


def _pairs(obj, path):
    """{split: (X, y)} from a dict of (X, y) pairs or a flat dict with keys 'split.X', 'split.y' (safetensors)."""
    if not isinstance(obj, dict):
        raise CommandError(f"audit: --data {path!r} holds a {type(obj).__name__}, expected a dict of (X, y) pairs test, forget, heldout (optional retain)")
    data = {}
    for split in SPLITS + OPTIONAL_SPLITS:
        if split in obj:
            pair = obj[split]
        elif f"{split}.X" in obj and f"{split}.y" in obj:
            pair = (obj[f"{split}.X"], obj[f"{split}.y"])
        else:
            continue
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
            raise CommandError(f"audit: --data {path!r} key {split!r} must be a pair of tensors (X, y)")
        X, y = pair
        if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise CommandError(f"audit: --data {path!r} key {split!r}: y must be a 1-D tensor of integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
        if X.dim() == 0 or len(X) != len(y) or len(y) == 0:
            raise CommandError(f"audit: --data {path!r} key {split!r}: X of shape {tuple(X.shape)} and y of shape {tuple(y.shape)} "
                               "must have the same, non-zero number of rows")
        data[split] = (X, y.long())
    missing = [split for split in SPLITS if split not in data]
    if missing:
        raise CommandError(f"audit: --data {path!r} lacks {missing}; expected a dict of (X, y) pairs test, forget, heldout (and optionally retain), "
                           "or tensors named 'test.X', 'test.y', ... (safetensors)")
    return data


def _check_fit(models, data, path):
    """Run each model on two rows of each split: a feature-shape or label mismatch becomes one line naming both files."""
    for what, model in models.items():
        for split, (X, y) in data.items():
            try:
                with torch.no_grad():
                    out = model(X[:2])
            except Exception as e:
                raise CommandError(f"audit: --data {path!r} key {split!r} (X of shape {tuple(X.shape)}) does not fit the --{what} model: {_one_line(e)}")
            if not (isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) == len(X[:2])):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise CommandError(f"audit: the --{what} model returns {shape} on --data key {split!r}; expected logits of shape (rows, classes)")
            if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
                raise CommandError(f"audit: --data {path!r} key {split!r}: labels span {int(y.min())}..{int(y.max())}, but the --{what} model "
                                   f"has {out.shape[1]} classes")


def _fmt(value, spec):
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _print_report(report, args):
    rows = [("test accuracy", "test_accuracy", ".4f"), ("forget accuracy", "forget_accuracy", ".4f"),
            ("retain accuracy", "retain_accuracy", ".4f"), ("forget loss", "forget_loss", ".4f"),
            ("MIA AUC (loss threshold)", "mia_auc_loss", ".3f"), ("MIA AUC (logistic)", "mia_auc_logistic", ".3f")]
    names = ("original", "unlearned", "retrained")
    print(f"{'':<26}" + "".join(f"{n:>11}" for n in names))
    for label, key, spec in rows:
        if key in report["unlearned"]:
            print(f"{label:<26}" + "".join(f"{_fmt(report[n][key], spec):>11}" for n in names))
    print(f"\nrelative distance {_fmt(report['relative_distance'], '.4f')}  (|w - w_retrained| / |w_original - w_retrained|: 0 is retraining, 1 the original)")
    if "poison_recovery" in report:
        print(f"poison recovery   {_fmt(report['poison_recovery'], '.3f')}  (1 recovers all that retraining gains on test accuracy; n/a when it gains too little)")
    v = report["verdict"]
    print(f"verdict           {'unlearned' if v['unlearned'] else 'NOT UNLEARNED'} ({v['reason']})")
    if args.stats is None:
        print("                  (pass the method's result.stats with --stats to check its own flags too)")


def audit(args):
    make_model = _factory(args.model, args.model_kwargs) if args.model is not None else None
    if args.model is None and args.model_kwargs is not None:
        raise CommandError("audit: --model-kwargs needs --model")
    stats = None
    if args.stats is not None:
        try:
            with open(args.stats) as f:
                stats = json.load(f)
        except (OSError, ValueError) as e:
            raise CommandError(f"audit: cannot read --stats {args.stats!r}: {_one_line(e)}")
        if not isinstance(stats, dict):
            raise CommandError(f"audit: --stats {args.stats!r} holds a JSON {type(stats).__name__}, expected an object (the method's result.stats)")
    models = {}
    for what in ("original", "unlearned", "retrained"):
        path = getattr(args, what)
        models[what] = _build(_read(path, what, args.trust_pickle), path, what, make_model, args.model)
    data = _pairs(_read(args.data, "data", args.trust_pickle), args.data)
    _check_fit(models, data, args.data)
    try:
        report = metrics.audit(models["original"], models["unlearned"], models["retrained"], test=data["test"], forget=data["forget"],
                               heldout=data["heldout"], retain=data.get("retain"), poisoned=args.poisoned, stats=stats)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:  # what the fit check cannot foresee, e.g. a model that fails on a full batch
        raise CommandError(f"audit: computing the report failed: {_one_line(e)}")
    if args.json not in (None, "-"):
        try:
            metrics.write_json(report, args.json)
        except OSError as e:
            raise CommandError(f"audit: cannot write --json {args.json!r}: {_one_line(e)}")
    if args.json == "-":
        print(json.dumps(metrics.json_safe(report), indent=1, allow_nan=False))
    else:
        _print_report(report, args)
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
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file (nothing is written unless given)")
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help="each op's backend against its pure-torch reference")
    p.add_argument("--size", type=int, default=1 << 22, help="elements per codec call (default 2^22)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=bench)
    p = sub.add_parser(
        "audit", help="metrics of saved models (state dicts or safetensors, plus --model) on saved data",
        description="\n\n".join(textwrap.fill(paragraph, 100) for paragraph in (
            "Compare an unlearned model with the original and the retrained one on saved data, and say whether it unlearned at all "
            f"(a relative distance >= {metrics.NOT_UNLEARNED_DISTANCE:g} of the original's gap, or a failure flag in the method's own "
            "--stats, means it did not).", PICKLE_WARNING, "Bad input: one line on stderr, exit status 2.")),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--original", required=True, metavar="FILE", help="state dict (torch.save(model.state_dict(), FILE)) or .safetensors")
    p.add_argument("--unlearned", required=True, metavar="FILE", help="the same, for the unlearned model")
    p.add_argument("--retrained", required=True, metavar="FILE", help="the same, for the model retrained without the forget set")
    p.add_argument("--model", metavar="MODULE:FUNCTION",
                   help="the architecture: a callable that returns the untrained nn.Module, named as package.module:function or "
                        "path/to/file.py:function (e.g. torch.nn:Linear with --model-kwargs); the state dicts are loaded into it")
    p.add_argument("--model-kwargs", metavar="JSON", help='keyword arguments for --model as a JSON object, e.g. \'{"in_features": 5, "out_features": 3}\'')
    p.add_argument("--data", required=True, metavar="FILE",
                   help="torch.save'd dict of (X, y) pairs test, forget, heldout, optional retain; or safetensors with tensors "
                        "test.X, test.y, forget.X, ... (y: integer class labels)")
    p.add_argument("--stats", metavar="FILE", help="JSON file of the method's result.stats: its 'unlearned' / 'converged' flags enter the verdict")
    p.add_argument("--poisoned", action="store_true", help="the forget set was label-flipped: report poison recovery")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write the report as JSON (NaN and inf as null) to PATH, or with no PATH to stdout in place of the table")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled files (whole modules saved with torch.save(model, path)): unpickling runs any code the file "
                        "names, so pass this only for files you made yourself or otherwise trust")
    p.set_defaults(run=audit)
    return top


def run(argv=None):
    """Parse argv and run the command; returns its rows or report (main() returns an exit status instead).

    Bad input raises CommandError (a SystemExit with status 2 whose str() is the message)."""
    args = parser().parse_args(argv)
    if args.command == "demo" and not 0 < args.ratio < 1:
        raise CommandError(f"demo: --ratio must be in (0, 1), got {args.ratio}")
    for name in ("epochs", "threads", "size", "reps"):
        if getattr(args, name, 1) < 1:
            raise CommandError(f"{args.command}: --{name} must be at least 1, got {getattr(args, name)}")
    return args.run(args)


def main(argv=None):
    try:
        run(argv)
    except CommandError as e:
        print(f"unlearn-fast {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
