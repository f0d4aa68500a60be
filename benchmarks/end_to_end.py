"""End-to-end unlearning benchmark: retrain vs DeltaGrad vs Mini-Unlearning on real data.

Data: MNIST-1D (generated locally by the mnist1d package) and scikit-learn's bundled digits.
Models: multinomial logistic regression with L2, and a 2-layer MLP; plain SGD with a cosine schedule.
Forget sets: random, and label-flipped (the forget set's labels are flipped before training).
For every (data, model, forget kind, ratio, method): wall time and speed-up over retrain (same run),
test accuracy, MIA AUC (loss threshold and logistic-regression attacks, forget vs held-out), parameter
distance relative to |w_original - w_retrained|, history bytes read, gradient evaluations, poison recovery.

  python benchmarks/end_to_end.py            # full grid, writes benchmarks/results/end_to_end.{md,json,png}
  python benchmarks/end_to_end.py --quick    # digits only, 3 ratios (what `make demo` runs)
"""
import argparse
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
from unlearn_fast.workloads import CONFIG, load_data, make_model, train

LOAD_BEFORE = tuple(round(x, 2) for x in os.getloadavg())
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = ("retrain", "deltagrad", "mini")
TIMING_ROUNDS = 5  # each method is timed this many times, interleaved; the median is reported


def flip_labels(y, idx, classes):
    """Systematic poison: every flipped sample of class c is labelled c + 1 (a random relabelling
    barely moves these models, so poison recovery would be undefined).

    Even this poison does not hurt logistic regression on digits at small ratios (at 10 % the poisoned
    model is one test sample better than the retrained one). uf.metrics.poison_recovery then reports
    NaN: a gain under 10 test samples cannot resolve the 0.9 goal (one sample is 0.1 of the ratio or
    more). A stronger single-target poison (every flipped sample labelled 0, or 1 if it was 0) was
    measured too: it moves digits 10 % by only 5 test samples and makes every method's task harder
    (docs/mini_unlearning.md), so the benchmark keeps this one."""
    y = y.clone()
    y[idx] = (y[idx] + 1) % classes
    return y


def run_case(data, model_kind, kind, ratio, tensors, seed, bar):
    Xtr, ytr, Xte, yte = tensors
    n, c = len(Xtr), int(ytr.max()) + 1
    forget = torch.randperm(n, generator=torch.Generator().manual_seed(seed + int(ratio * 1000)))[: max(1, int(ratio * n))]
    y_used = flip_labels(ytr, forget, c) if kind == "flipped" else ytr
    train_set = torch.utils.data.TensorDataset(Xtr, y_used)
    original = make_model(model_kind, Xtr.shape[1], c, seed)
    history, train_s, finish_s = train(original, train_set, uf.HistoryPolicy(kind="full"), seed=seed)
    loss_fn = torch.nn.functional.cross_entropy
    with warnings.catch_warnings():  # mini's "stopped unconverged" warning: the table marks those rows instead
        warnings.simplefilter("ignore", RuntimeWarning)
        seconds = {m: [] for m in METHODS}
        for _ in range(TIMING_ROUNDS):  # interleaved, so load from other processes hits every method alike
            results = {m: uf.unlearn(original, history, forget, train_set, loss_fn, method=m) for m in METHODS}
            for m, res in results.items():
                seconds[m].append(res.seconds)
        seconds = {m: statistics.median(v) for m, v in seconds.items()}
    retrained = results["retrain"].model
    mask = torch.ones(n, dtype=torch.bool)
    mask[forget] = False
    # Noise floor: the same training on the retained data with another batch order lands this far
    # (relative distance) from the same-schedule retrain; only a replay of the schedule gets closer.
    reshuffled = make_model(model_kind, Xtr.shape[1], c, seed)
    train(reshuffled, torch.utils.data.TensorDataset(Xtr[mask], y_used[mask]), seed=seed + 1)
    noise_floor = uf.metrics.relative_distance(reshuffled, retrained, original)
    rows = []
    for method, res in results.items():
        rep = uf.audit(
            original, res.model, retrained, test=(Xte, yte), forget=(Xtr[forget], y_used[forget]),
            heldout=(Xte, yte), retain=(Xtr[mask], y_used[mask]), poisoned=kind == "flipped",
        )
        rows.append({
            "data": data, "model": model_kind, "forget_kind": kind, "ratio": ratio, "method": method,
            "seconds": seconds[method], "speedup": seconds["retrain"] / seconds[method],
            "test_accuracy": rep["unlearned"]["test_accuracy"], "original_test_accuracy": rep["original"]["test_accuracy"],
            "mia_auc": rep["unlearned"]["mia_auc_loss"], "mia_auc_logistic": rep["unlearned"]["mia_auc_logistic"],
            "relative_distance": rep["relative_distance"], "poison_recovery": rep.get("poison_recovery"),
            "history_bytes": res.stats.get("history_bytes_read"), "gradient_evaluations": res.stats.get("gradient_evaluations"),
            "iterations": res.stats.get("iterations"), "contraction_factor": res.stats.get("contraction_factor"),
            "error_bound": res.stats.get("error_bound"), "converged": res.stats.get("converged"), "train_seconds": train_s, "finish_seconds": finish_s,
            "test_samples": len(yte), "checkpoints": res.stats.get("checkpoints"),
            "reshuffled_retrain_distance": noise_floor,
        })
        bar.update(1)
    return rows


def recording_overhead(tensors, model_kind, seed=0, repeats=3):
    """Median training time without and with the recorder (same run): per-step recording and finish()."""
    Xtr, ytr = tensors[0], tensors[1]
    train_set = torch.utils.data.TensorDataset(Xtr, ytr)
    c = int(ytr.max()) + 1
    steps, finish = {"plain": [], "full": [], "minimal": []}, {"full": [], "minimal": []}
    for _ in range(repeats):
        for key in steps:
            policy = None if key == "plain" else uf.HistoryPolicy(kind=key)
            _, seconds, finish_s = train(make_model(model_kind, Xtr.shape[1], c, seed), train_set, policy, seed=seed)
            steps[key].append(seconds)
            if policy:
                finish[key].append(finish_s)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    plain = med(steps["plain"])
    out = {"plain_s": plain}
    for key in ("full", "minimal"):
        out[f"{key}_record_overhead"] = med(steps[key]) / plain - 1
        out[f"{key}_finish_s"] = med(finish[key])
    return out


def summarise(rows):
    """Goal checks for logistic regression at 10% and 30% random deletion (issue 3)."""
    lines = []
    for data in sorted({r["data"] for r in rows}):
        for ratio in (0.1, 0.3):
            sel = {r["method"]: r for r in rows if r["data"] == data and r["model"] == "logistic" and r["forget_kind"] == "random" and r["ratio"] == ratio}
            if len(sel) < 3:
                continue
            mini, dg, rt = sel["mini"], sel["deltagrad"], sel["retrain"]
            checks = {
                "acc within 0.5 pp": abs(mini["test_accuracy"] - rt["test_accuracy"]) <= 0.005,
                "MIA AUC within 0.02": abs(mini["mia_auc"] - rt["mia_auc"]) <= 0.02,
                "distance below DeltaGrad": mini["relative_distance"] < dg["relative_distance"],
                ">= 10x faster than retrain": mini["speedup"] >= 10,
                "<= 10% of DeltaGrad bytes": mini["history_bytes"] <= 0.1 * dg["history_bytes"],
            }
            detail = (f"acc {mini['test_accuracy']:.4f} vs {rt['test_accuracy']:.4f}, AUC {mini['mia_auc']:.3f} vs {rt['mia_auc']:.3f}, "
                      f"dist {mini['relative_distance']:.3f} vs DeltaGrad {dg['relative_distance']:.3f} "
                      f"(a reshuffled retrain: {mini['reshuffled_retrain_distance']:.3f}), speed-up {mini['speedup']:.1f}x, "
                      f"bytes {mini['history_bytes'] / dg['history_bytes']:.1%} of DeltaGrad")
            lines.append(f"- {data} logistic {ratio:.0%}: " + ", ".join(f"{k}: {'PASS' if v else 'MISS'}" for k, v in checks.items()) + f" ({detail})")
    for data in sorted({r["data"] for r in rows}):
        for ratio in (0.1, 0.3):
            sel = [r for r in rows if r["data"] == data and r["model"] == "logistic" and r["forget_kind"] == "flipped" and r["ratio"] == ratio and r["method"] == "mini"]
            if sel and sel[0]["poison_recovery"] is not None:
                pr, row = sel[0]["poison_recovery"], sel[0]
                if math.isnan(pr):  # uf.metrics.poison_recovery: retraining's gain is under POISON_MIN_SAMPLES test samples
                    rt = next(r for r in rows if r["data"] == data and r["model"] == "logistic" and r["forget_kind"] == "flipped" and r["ratio"] == ratio and r["method"] == "retrain")
                    gain = (rt["test_accuracy"] - row["original_test_accuracy"]) * row["test_samples"]
                    lines.append(f"- {data} logistic {ratio:.0%} label-flipped: poison recovery undefined: retraining changes test accuracy by "
                                 f"{gain:+.0f} of {row['test_samples']} test samples (< {uf.metrics.POISON_MIN_SAMPLES}), the poison does not hurt this model")
                else:
                    lines.append(f"- {data} logistic {ratio:.0%} label-flipped: poison recovery {pr:.2f} ({'PASS' if pr >= 0.9 else 'MISS'} >= 0.9)")
    return lines


def write_outputs(rows, overhead, args, elapsed, stem):
    os.makedirs(RESULTS, exist_ok=True)
    header = [
        f"# End-to-end unlearning benchmark{' (quick)' if args.quick else ''}",
        "",
        f"Command: `{' '.join(['python'] + sys.argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch thread), torch {torch.__version__}, "
        f"backends {uf.backends()['active']}, load average before {LOAD_BEFORE}  ",
        f"Training: SGD, {CONFIG}; all methods start from the same recorded run. Wall time {elapsed:.0f} s.  ",
        f"Seconds: median of {TIMING_ROUNDS} interleaved calls per method. Speed-up is retrain's median wall time over the method's, measured in the same run. Relative distance is",
        "|w - w_retrained| / |w_original - w_retrained|. MIA AUC: loss-threshold attack, forget vs held-out (test) samples.",
        "'reshuffled' is the relative distance of a model trained on the retained data with another batch order:",
        "the SGD-noise floor that any method not replaying the recorded schedule faces.",
        "'mini (unconverged)': the fixed-point iteration stopped before its error bound was met (mini warns the caller).",
        "",
        "## Goal checks (issue 3)",
        *summarise(rows),
        "",
        "## Recording overhead (median of 3 trainings, logistic regression, same run)",
        *[
            f"- {d}: plain training {o['plain_s']:.2f} s; per-step recording adds {o['full_record_overhead']:+.0%} (full) / "
            f"{o['minimal_record_overhead']:+.0%} (minimal); finish() takes {o['full_finish_s']:.2f} s / {o['minimal_finish_s']:.2f} s"
            for d, o in overhead.items()
        ],
        "",
        "## All rows",
        f"'poison rec.' is undef. where retraining changes test accuracy by fewer than {uf.metrics.POISON_MIN_SAMPLES} samples (see the goal checks).",
        "",
        "| data | model | forget | ratio | method | seconds | speed-up | test acc | MIA AUC | MIA AUC (LR) | rel. dist | reshuffled | poison rec. | history bytes | grad evals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # poison recovery: "-" where there is no poison, "undef." where retraining's gain is too small to divide by
    fmt = lambda v, f: "-" if v is None else "undef." if math.isnan(v) else format(v, f)  # noqa: E731
    for r in rows:
        header.append(
            f"| {r['data']} | {r['model']} | {r['forget_kind']} | {r['ratio']:.0%} | {r['method']}{' (unconverged)' if r.get('converged') is False else ''} | {r['seconds']:.3f} | {r['speedup']:.1f}x | "
            f"{r['test_accuracy']:.4f} | {r['mia_auc']:.3f} | {r['mia_auc_logistic']:.3f} | {r['relative_distance']:.3f} | {r['reshuffled_retrain_distance']:.3f} | "
            f"{fmt(r['poison_recovery'], '.2f')} | {r['history_bytes']:,} | {r['gradient_evaluations']:,} |"
        )
    with open(os.path.join(RESULTS, stem + ".md"), "w") as f:
        f.write("\n".join(header) + "\n")
    with open(os.path.join(RESULTS, stem + ".json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "config": CONFIG, "overhead": overhead, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(RESULTS, stem + ".png"))
    return "\n".join(header)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(r["data"], r["model"]) for r in rows})
    fig, axes = plt.subplots(2, len(combos), figsize=(4.2 * len(combos), 7), squeeze=False)
    for j, (data, model) in enumerate(combos):
        for method, style in (("deltagrad", "s-"), ("mini", "o-")):
            sel = sorted((r for r in rows if (r["data"], r["model"], r["method"], r["forget_kind"]) == (data, model, method, "random")), key=lambda r: r["ratio"])
            ratios = [100 * r["ratio"] for r in sel]
            axes[0, j].plot(ratios, [r["speedup"] for r in sel], style, label=method)
            axes[1, j].plot(ratios, [r["relative_distance"] for r in sel], style, label=method)
        axes[1, j].plot(ratios, [r["reshuffled_retrain_distance"] for r in sel], "k:", label="retrain, other batch order")
        axes[0, j].set_title(f"{data} / {model} (random forget)")
        axes[0, j].set_ylabel("speed-up over retrain (x)")
        axes[0, j].set_yscale("log")
        axes[1, j].set_ylabel("|w - w_retrain| / |w_orig - w_retrain|")
        axes[1, j].set_yscale("log")  # DeltaGrad diverges on some MLP runs
        axes[1, j].set_xlabel("unlearning ratio (%)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits only, ratios 1/10/30%% (make demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = ["digits"] if args.quick else ["digits", "mnist1d"]
    ratios = (0.01, 0.1, 0.3) if args.quick else (0.01, 0.05, 0.1, 0.2, 0.3)
    models, kinds = ("logistic", "mlp"), ("random", "flipped")
    start = time.perf_counter()
    data = {name: load_data(name) for name in datasets}
    rows = []
    total = len(datasets) * len(models) * len(kinds) * len(ratios) * len(METHODS)
    with tqdm(total=total, desc="unlearning runs", unit="run") as bar:
        for name in datasets:
            for model_kind in models:
                for kind in kinds:
                    for ratio in ratios:
                        bar.set_postfix_str(f"{name}/{model_kind}/{kind}/{ratio:.0%}")
                        rows.extend(run_case(name, model_kind, kind, ratio, data[name], args.seed, bar))
    overhead = {name: recording_overhead(data[name], "logistic") for name in tqdm(datasets, desc="recording overhead")}
    text = write_outputs(rows, overhead, args, time.perf_counter() - start, "end_to_end_quick" if args.quick else "end_to_end")
    print(text)


if __name__ == "__main__":
    main()
