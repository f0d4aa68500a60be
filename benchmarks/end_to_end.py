"""End-to-end unlearning benchmark (issue 12): retrain, DeltaGrad, Mini, fine-tune and rewind on real data.

Data: scikit-learn's digits, breast_cancer and wine, and MNIST-1D (generated locally), all shipped with
packages. Models: logistic regression, a 2-layer MLP, and a 118k-parameter CNN on digits as 8x8 images.
Training: SGD, cosine-decaying or constant learning rate, momentum 0 or 0.9 (benchmarks/e2e_workloads.py).
Forget sets: random (10 %, 30 %), label-flipped (the labels are flipped before training), and memorised (a
300-sample training set trained 150 epochs, 10 % forgotten). Methods: retrain (the reference), deltagrad,
mini, and finetune / rewind at the same wall time as mini (their step budget is mini's median seconds over
retrain's median seconds per step, measured in the same run); rewind reads the full history's checkpoints,
`rewind (minimal)` only the minimal history's few; `mini (full history)` runs Mini on the full history (its summary
computed by mini.prepare before the timed calls; logistic regression only), where the batch order lets it add the batch
term when the SGD-noise estimate exceeds mini.BATCH_NOISE.
Metrics against the retrained model: test and forget-set accuracy gaps, MIA AUC gaps (loss threshold and
logistic regression on losses, forget vs test samples), mean KL(p_retrain || p) on the forget and test sets,
relative parameter distance, poison recovery; the same figures for a retrain with another seed and batch
order (the noise floor) and for the untouched model. A result that uf.metrics.verdict does not accept as
unlearned, or a method that refused, gets no speed-up.

  python benchmarks/end_to_end.py --quick          # `make demo`: digits, three models, one regime; writes out/
  python benchmarks/end_to_end.py                  # the whole matrix (hours on 2 cores); benchmarks/results/
  python benchmarks/end_to_end.py --data wine --models logistic mlp --regimes decay-0 constant-0.9 --forget random10
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
from tqdm import tqdm

import unlearn_fast as uf
from unlearn_fast.history import flat_params
from unlearn_fast.methods import mini
from machine import cpu_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workloads as wl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD_BEFORE = tuple(round(x, 2) for x in os.getloadavg())
METHODS = ("retrain", "deltagrad", "mini", "mini (full history)", "finetune", "rewind", "rewind (minimal)")
REFERENCES = ("retrain, other seed", "untouched")
FORGET_KINDS = {"random10": ("random", 0.1), "random30": ("random", 0.3), "flipped10": ("flipped", 0.1),
                "flipped30": ("flipped", 0.3), "memorised": ("memorised", 0.1)}
REGIMES = {f"{s}-{m:g}": wl.Regime(schedule=s, momentum=m) for s in ("decay", "constant") for m in (0.0, 0.9)}
REGIMES["onecycle-0.9"] = wl.Regime(schedule="onecycle", momentum=0.9)  # momentum cycled 0.95 -> 0.85 -> 0.95 (OneCycleLR)
SKIP_MINI_NOTE = ("skipped: no minimal history recorded (--skip-mini; --quick skips the CNN's: its finish() takes 4-9x the "
                  "CNN's training, 36-102 s against 9-15 s, and Mini unlearned none of the CNN rows measured, benchmarks/results/end_to_end_cnn_mini.md)")
FULL_HISTORY_MINI_NOTE = ("skipped: logistic regression only (on the MLP and CNN mini.prepare's summary costs what the minimal "
                          "run's finish() did, 38x training on the digits MLP, for the same model unless the batch term fires)")
FALLBACK_BUDGET = 5  # finetune / rewind get T / 5 steps where mini gives no time to match (the 5x goal of issue 12)
LOSS = torch.nn.functional.cross_entropy


def attempt(model, history, forget, train_set, method, **options):
    """(UnlearnResult or None, error text): a method that refuses (or fails) is recorded, not fatal."""
    name = method.split(" (")[0]  # "rewind (minimal)", "mini (full history)": the method on another history
    try:
        with warnings.catch_warnings():  # mini's "stopped unconverged" warning: its stats say so and the verdict reads them
            warnings.simplefilter("ignore", RuntimeWarning)
            return uf.unlearn(model, history, forget, train_set, LOSS, method=name, **options), None
    except Exception as err:  # noqa: BLE001  a refusal (ValueError, mini's NotUnlearnedError) or a failure: recorded, the run goes on
        return None, f"{type(err).__name__}: {err}"


def timed(calls, rounds):
    """Run every (name -> thunk) `rounds` times, interleaved; {name: (last result, error, median seconds)}."""
    out = {name: [None, None, []] for name in calls}
    for _ in range(rounds):
        for name, thunk in calls.items():
            if out[name][1] is not None:  # refused once: refused every time
                continue
            res, err = thunk()
            out[name][0], out[name][1] = res, err
            if res is not None:
                out[name][2].append(res.seconds)
    return {k: (r, e, statistics.median(s) if s else None) for k, (r, e, s) in out.items()}


def run_case(data, model_kind, regime_key, forget_key, tensors, seed, rounds, skip_mini=(), budget_vectors=None):
    regime = REGIMES[regime_key]
    kind, ratio = FORGET_KINDS[forget_key]
    Xtr, ytr, Xte, yte = tensors
    c = int(ytr.max()) + 1
    if kind == "memorised":  # a small training set trained long: the model memorises it
        sub = torch.randperm(len(Xtr), generator=torch.Generator().manual_seed(seed))[: wl.MEMORISED_N]
        Xtr, ytr = Xtr[sub], ytr[sub]
        regime = dataclasses.replace(regime, epochs=wl.MEMORISED_EPOCHS)
    n = len(Xtr)
    forget = wl.forget_set(n, ratio, seed)
    y_used = wl.flip_labels(ytr, forget, c) if kind == "flipped" else ytr
    train_set = torch.utils.data.TensorDataset(Xtr, y_used)
    d = Xtr.shape[1]
    original = wl.make_model(model_kind, d, c, seed)
    h_full, train_s, finish_full = wl.train(original, train_set, regime, uf.HistoryPolicy(kind="full"), seed, model_kind)
    original_min = wl.make_model(model_kind, d, c, seed)  # the same run again (deterministic on CPU), recording minimal
    h_min = finish_min = min_error = None
    if model_kind in skip_mini:
        min_error = SKIP_MINI_NOTE
    else:
        try:
            h_min, _, finish_min = wl.train(original_min, train_set, regime, uf.HistoryPolicy(kind="minimal", budget_vectors=budget_vectors), seed, model_kind)
        except Exception as err:  # noqa: BLE001  mini's recording may refuse a workload: its rows say so
            min_error = f"minimal recording failed: {type(err).__name__}: {err}"
    same_run = None if h_min is None else bool(torch.equal(flat_params(original), flat_params(original_min)))
    no_history = lambda: (None, min_error)  # noqa: E731

    if h_min is not None and model_kind == "logistic":  # mini (full history): its summary once, before the timed calls
        try:
            mini.prepare(h_full, original, train_set, LOSS)
        except ValueError:  # (an optimizer Mini does not model: its calls say so)
            pass
    calls = {
        "retrain": lambda: attempt(original, h_full, forget, train_set, "retrain"),
        "deltagrad": lambda: attempt(original, h_full, forget, train_set, "deltagrad"),
        "mini": (lambda: attempt(original_min, h_min, forget, train_set, "mini")) if h_min else no_history,
        "mini (full history)": ((lambda: attempt(original, h_full, forget, train_set, "mini (full history)")) if h_min and model_kind == "logistic"
                                else (lambda: (None, FULL_HISTORY_MINI_NOTE)) if h_min else no_history),
    }
    first = timed(calls, rounds)
    retrain_res, _, retrain_s = first["retrain"]
    T = h_full.num_steps
    per_step = retrain_s / max(1, retrain_res.stats["steps"])
    mini_res, mini_err, mini_s = first["mini"]
    mini_ok = mini_res is not None and uf.metrics.verdict(mini_res.stats)[0]
    if mini_ok:
        budget, budget_note = int(mini_s / per_step), "mini's wall time"
    else:
        budget, budget_note = T // FALLBACK_BUDGET, f"T/{FALLBACK_BUDGET} (mini gave no result to match)"
    second = timed({
        "finetune": lambda: attempt(original, h_full, forget, train_set, "finetune", steps=budget),
        "rewind": lambda: attempt(original, h_full, forget, train_set, "rewind", steps=budget),
        "rewind (minimal)": (lambda: attempt(original_min, h_min, forget, train_set, "rewind (minimal)", steps=budget)) if h_min else no_history,
    }, rounds)
    results = {**first, **second}

    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    other = wl.make_model(model_kind, d, c, seed + 1)  # noise floor: another initialisation and batch order
    wl.train(other, torch.utils.data.TensorDataset(Xtr[keep], y_used[keep]), regime, None, seed + 1, model_kind)
    fset, tset = (Xtr[forget], y_used[forget]), (Xte, yte)
    ref = wl.evaluate(retrain_res.model, fset, tset)
    orig_eval = wl.evaluate(original, fset, tset, ref)
    train_acc = float((wl.log_probs(original, Xtr).argmax(-1) == y_used).double().mean())
    workload = {
        "data": data, "model": model_kind, "regime": regime_key, "forget_kind": forget_key, "n_train": n, "forgotten": len(forget),
        "parameters": sum(p.numel() for p in original.parameters()), "steps": T, "train_seconds": train_s,
        "finish_seconds_full": finish_full, "finish_seconds_minimal": finish_min, "minimal_error": min_error,
        "history_bytes_full": h_full.nbytes("schedule") + h_full.nbytes("trajectory") + h_full.nbytes("summary"),
        "history_bytes_minimal": None if h_min is None else h_min.nbytes("schedule") + h_min.nbytes("summary"),
        "minimal_same_weights": same_run, "original_train_accuracy": train_acc,
        "original_forget_mia_auc": orig_eval["mia_auc"], "budget_steps": budget, "budget_from": budget_note,
        "retrain_seconds": retrain_s, "retrain_seconds_per_step": per_step,
    }
    rows = []

    def row(method, model, status, seconds=None, stats=None):
        r = {"data": data, "model": model_kind, "regime": regime_key, "forget_kind": forget_key, "method": method,
             "status": status, "seconds": seconds, "speedup": None}
        if model is not None:
            ev = wl.evaluate(model, fset, tset, ref)
            r.update({k: v for k, v in ev.items() if not k.startswith("_")})
            r["relative_distance"] = uf.metrics.relative_distance(model, retrain_res.model, original)
            if kind == "flipped":
                r["poison_recovery"] = uf.metrics.poison_recovery(ev["test_accuracy"], orig_eval["test_accuracy"], ref["test_accuracy"], len(yte))
        if stats is not None:
            r.update({k: stats.get(k) for k in ("steps", "gradient_evaluations", "history_bytes_read", "checkpoint_step", "converged", "iterations")})
        return r

    for method in METHODS:
        res, err, secs = results[method]
        if res is None:
            rows.append(row(method, None, (err if err.startswith("skipped") else "refused: " + err.splitlines()[0])[:300]))
            continue
        r = row(method, res.model, "ok", secs, res.stats)
        ok, reason = uf.metrics.verdict(res.stats, None if method == "retrain" else r["relative_distance"])
        if not ok:
            r["status"] = "not unlearned: " + reason
        elif method != "retrain":
            r["speedup"] = retrain_s / secs
        rows.append(r)
    rows.append(row("retrain, other seed", other, "reference"))
    rows.append(row("untouched", original, "reference"))
    return workload, rows


# ----------------------------------------------------------------------------- report
def med(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def f(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def poison(r):
    """Poison recovery cell: '-' without poison, 'undef.' where retraining changes fewer than POISON_MIN_SAMPLES test
    predictions (uf.metrics.poison_recovery is NaN then, stored as null in the JSON)."""
    if not r["forget_kind"].startswith("flipped") or r.get("test_accuracy") is None:
        return "-"
    v = r.get("poison_recovery")
    return "undef." if v is None or math.isnan(v) else f"{v:.2f}"


def headline(rows):
    """Per model family and method: how many rows it unlearned, and medians of speed-up and gaps over those rows."""
    lines = ["| model | method | unlearned / not / refused or skipped | median speed-up | \\|test acc gap\\| | \\|forget acc gap\\| | \\|MIA AUC gap\\| | KL forget | KL test |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in wl.MODELS:
        sel = [r for r in rows if r["model"] == model]
        if not sel:
            continue
        for method in METHODS + REFERENCES:
            rs = [r for r in sel if r["method"] == method]
            if not rs:
                continue
            good = [r for r in rs if r["status"] in ("ok", "reference")]
            bad = sum(r["status"].startswith("not unlearned") for r in rs)
            refused = sum(r["status"].startswith(("refused", "skipped")) for r in rs)
            absmed = lambda key: med([abs(r[key]) for r in good if r.get(key) is not None])  # noqa: E731
            lines.append(
                f"| {model} | {method} | {len(good)} / {bad} / {refused} | {f(med([r['speedup'] for r in good]), '.1f')}{'x' if med([r['speedup'] for r in good]) else ''} | "
                f"{f(absmed('test_accuracy_gap'))} | {f(absmed('forget_accuracy_gap'))} | {f(absmed('mia_auc_gap'))} | "
                f"{f(med([r.get('kl_forget') for r in good]), '.4f')} | {f(med([r.get('kl_test') for r in good]), '.4f')} |")
    return lines


def command_line():
    return " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])


def write_outputs(workloads, rows, args, elapsed, out_dir, stem, commands):
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        f"# End-to-end unlearning benchmark{' (quick)' if args.quick else ''}",
        "",
        "Commands (run one after the other, each adding its rows):  ",
        *[f"`{c}`  " for c in commands],
        f"Machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores shared with other jobs (load average before "
        f"{LOAD_BEFORE}, after {tuple(round(x, 2) for x in os.getloadavg())}), {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}. Wall time {elapsed / 60:.1f} min.  ",
        f"Regimes: {', '.join(f'{k} = {v.name}' for k, v in REGIMES.items())}; lr 0.2 (CNN {wl.CNN_LR}) times (1 - momentum), "
        f"cosine to 1 % of it for 'decay', OneCycleLR up to it and down for 'onecycle' (momentum cycled 0.95 -> 0.85 -> 0.95), "
        "batch 64, 30 epochs, weight decay 1e-3.  ",
        f"Seconds: median of {args.rounds} interleaved calls. Speed-up: retrain's median over the method's, same run; given only "
        "where uf.metrics.verdict accepts the result (not 'not unlearned') and the method did not refuse.  ",
        "Gaps and KL are against the retrained model (KL(p_retrain || p), mean over samples). MIA: loss threshold, forget vs "
        "test samples. 'retrain, other seed': another initialisation and batch order on the retained data (the noise floor); "
        "'untouched': the original model.  ",
        "finetune and rewind get the step budget that matches mini's median wall time (retrain's seconds per step); where mini "
        f"refused or did not unlearn, T/{FALLBACK_BUDGET}.",
        "",
        "## Headline per model family (medians over the rows each method unlearned)",
        "",
        *headline(rows),
        "",
        "## Workloads: recording cost and history size",
        "",
        "| data | model | regime | forget | n | params | steps | train s | finish() full s | finish() minimal s | minimal / train | bytes full | bytes minimal | train acc | forget MIA (untouched) | budget (steps, from) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        fm = w["finish_seconds_minimal"]
        lines.append(
            f"| {w['data']} | {w['model']} | {w['regime']} | {w['forget_kind']} | {w['n_train']} | {w['parameters']:,} | {w['steps']} | "
            f"{w['train_seconds']:.2f} | {w['finish_seconds_full']:.2f} | {f(fm, '.2f')} | {f(None if fm is None else fm / w['train_seconds'], '.1f')}x | "
            f"{w['history_bytes_full']:,} | {f(w['history_bytes_minimal'], ',')} | {w['original_train_accuracy']:.3f} | "
            f"{w['original_forget_mia_auc']:.3f} | {w['budget_steps']} ({w['budget_from']}) |")
    lines += [
        "",
        "## All rows",
        "",
        f"'poison rec.' is undef. where retraining changes test accuracy by fewer than {uf.metrics.POISON_MIN_SAMPLES} test samples.",
        "",
        "| data | model | regime | forget | method | status | seconds | speed-up | test acc (gap) | forget acc (gap) | MIA AUC gap | MIA AUC (LR) gap | KL forget | KL test | rel. dist | poison rec. | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] in ("ok", "reference") else r["status"].replace("|", "/")
        lines.append(
            f"| {r['data']} | {r['model']} | {r['regime']} | {r['forget_kind']} | {r['method']} | {status} | {f(r['seconds'], '.3f')} | "
            f"{f(r['speedup'], '.1f')} | {f(r.get('test_accuracy'), '.4f')} ({f(r.get('test_accuracy_gap'), '+.4f')}) | "
            f"{f(r.get('forget_accuracy'), '.3f')} ({f(r.get('forget_accuracy_gap'), '+.3f')}) | {f(r.get('mia_auc_gap'), '+.3f')} | "
            f"{f(r.get('mia_auc_logistic_gap'), '+.3f')} | {f(r.get('kl_forget'), '.4f')} | {f(r.get('kl_test'), '.4f')} | "
            f"{f(r.get('relative_distance'), '.3f')} | {poison(r)} | {f(r.get('steps'), 'd')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, stem + ".md"), "w") as fh:
        fh.write(text)
    uf.metrics.write_json({"commands": commands, "elapsed_seconds": elapsed, "cpu": cpu_model(), "regimes": {k: dataclasses.asdict(v) for k, v in REGIMES.items()},
                           "workloads": workloads, "rows": rows}, os.path.join(out_dir, stem + ".json"))
    plot(rows, os.path.join(out_dir, stem + ".png"))
    return text


STYLE = {"deltagrad": ("s", "tab:orange"), "mini": ("o", "tab:blue"), "mini (full history)": ("P", "tab:cyan"), "finetune": ("^", "tab:green"),
         "rewind": ("v", "tab:red"), "rewind (minimal)": ("D", "tab:purple")}


def plot(rows, path):
    """Per model family: forget-set and test KL to retrain against speed-up, one marker per unlearned row; the
    noise floor (other-seed retrain) and the untouched model as horizontal lines (medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = [m for m in wl.MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(2, len(models), figsize=(4.8 * len(models), 7.5), squeeze=False)
    for j, model in enumerate(models):
        sel = [r for r in rows if r["model"] == model]
        for i, key in enumerate(("kl_forget", "kl_test")):
            ax = axes[i, j]
            for method, (marker, color) in STYLE.items():
                pts = [(r["speedup"], max(r[key], 1e-7)) for r in sel if r["method"] == method and r["speedup"]]
                missed = sum(1 for r in sel if r["method"] == method and not r["speedup"])
                if pts or missed:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, alpha=0.75,
                               label=f"{method} ({len(pts)} rows; {missed} refused / not unlearned)")
            for method, ls in (("retrain, other seed", "k--"), ("untouched", "k:")):
                v = med([r.get(key) for r in sel if r["method"] == method])
                if v is not None:
                    ax.axhline(max(v, 1e-7), color="k", linestyle=ls[1:], label=f"{method} (median)")
            if not any(r["method"] in STYLE and r["speedup"] for r in sel):  # nothing to place on log axes
                ax.text(0.5, 0.5, "no row of this family was accepted as unlearned", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            else:
                ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # narrow ranges label every minor tick otherwise
            ax.set_xlabel("speed-up over retrain (x)")
            ax.set_ylabel(f"{'forget-set' if key == 'kl_forget' else 'test'} KL to retrain")
            ax.set_title(f"{model}: {'forget set' if key == 'kl_forget' else 'test set'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
    fig.suptitle("Quality (lower is better) against speed-up; only rows accepted as unlearned are plotted", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits, three models, decaying lr without momentum, random 10%% and memorised forget sets, one timing round (make demo)")
    parser.add_argument("--data", nargs="+", choices=wl.DATASETS, default=None)
    parser.add_argument("--models", nargs="+", choices=wl.MODELS, default=None)
    parser.add_argument("--regimes", nargs="+", choices=sorted(REGIMES), default=None)
    parser.add_argument("--forget", nargs="+", choices=sorted(FORGET_KINDS), default=None)
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (these small models run fastest on one)")
    parser.add_argument("--out", default=None, help="output directory (default: out/ with --quick, else benchmarks/results)")
    parser.add_argument("--stem", default=None, help="file name stem (default end_to_end_quick / end_to_end)")
    parser.add_argument("--skip-mini", nargs="*", choices=wl.MODELS, default=None,
                        help="model families recorded without a minimal history (mini and rewind (minimal) skipped); default: none, cnn with --quick")
    parser.add_argument("--budget-vectors", type=int, default=None,
                        help="the minimal history's summary budget (HistoryPolicy.budget_vectors; default: mini.DEFAULT_BUDGET_VECTORS, 64)")
    parser.add_argument("--append", action="store_true", help="add to the rows already in OUT/STEM.json (several subset runs, one report)")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    args.data = args.data or (["digits"] if args.quick else list(wl.DATASETS))
    args.models = args.models or list(wl.MODELS)
    args.regimes = args.regimes or (["decay-0"] if args.quick else sorted(REGIMES))
    args.skip_mini = (["cnn"] if args.quick else []) if args.skip_mini is None else args.skip_mini
    args.forget = args.forget or (["random10", "memorised"] if args.quick else ["random10", "random30", "flipped30", "memorised"])
    if args.quick and "--rounds" not in sys.argv:
        args.rounds = 1  # a demo, not a measurement
    out_dir = args.out or os.path.join(ROOT, "out" if args.quick else os.path.join("benchmarks", "results"))
    stem = args.stem or ("end_to_end_quick" if args.quick else "end_to_end")
    start = time.perf_counter()
    data = {name: wl.load_data(name) for name in args.data}
    cases = [(d, m, g, k) for d in args.data for m in args.models if m != "cnn" or d == "digits" for g in args.regimes for k in args.forget]
    workloads, rows, commands = [], [], []
    previous = os.path.join(out_dir, stem + ".json")
    if args.append and os.path.exists(previous):
        with open(previous) as fh:
            old = json.load(fh)
        workloads, rows, commands = old["workloads"], old["rows"], old.get("commands", [])
        start -= old.get("elapsed_seconds", 0)
    commands.append(command_line())
    for case in tqdm(cases, desc="workloads", unit="case"):
        tqdm.write(f"{'/'.join(case)} ...")
        w, rs = run_case(*case, data[case[0]], args.seed, args.rounds, tuple(args.skip_mini), args.budget_vectors)
        workloads.append(w)
        rows.extend(rs)
        write_outputs(workloads, rows, args, time.perf_counter() - start, out_dir, stem, commands)  # partial results survive an interruption
    print(write_outputs(workloads, rows, args, time.perf_counter() - start, out_dir, stem, commands))


if __name__ == "__main__":
    main()
