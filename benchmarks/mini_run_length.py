"""Mini's costs against the length of the training run it unlearns from.

The summary is bounded by the history budget (HistoryPolicy.budget_vectors): its checkpoints K and basis k do not grow
with the number of steps, so neither should finish() nor a request's work (K corrector passes over the retained set,
the request's Krylov blocks), while retraining grows with every epoch. This script trains the same workload for
several numbers of epochs and prints, per length: training and finish() seconds (kind="minimal"), Mini's and
retrain's seconds on one random deletion (medians of interleaved rounds), the speed-up where Mini unlearned
(uf.metrics.verdict), its relative distance and forget-set KL to the retrained model, and the history's bytes.

    .venv/bin/python benchmarks/mini_run_length.py [--epochs 30 60 120 240] [--rounds 3] [--out benchmarks/results]
"""
import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workloads as wl  # noqa: E402
from machine import cpu_model  # noqa: E402

import unlearn_fast as uf  # noqa: E402

LOSS = torch.nn.functional.cross_entropy
# (data, model, momentum): one workload per model family the benchmark has, and the largest data set
WORKLOADS = [("digits", "mlp", 0.9), ("digits", "logistic", 0.0), ("mnist1d", "logistic", 0.0), ("breast_cancer", "mlp", 0.9)]


def history_bytes(history):
    """What end_to_end.py counts: the schedule, the trajectory (kind="full") and the summary (kind="minimal")."""
    return sum(history.nbytes(section) for section in ("schedule", "trajectory", "summary"))


def measure(data, model_kind, momentum, epochs, rounds, ratio=0.1, seed=0):
    Xtr, ytr, Xte, yte = wl.load_data(data)
    train_set = torch.utils.data.TensorDataset(Xtr, ytr)
    c, d = int(ytr.max()) + 1, Xtr.shape[1]
    regime = wl.Regime(schedule="decay", momentum=momentum, epochs=epochs)
    full_model = wl.make_model(model_kind, d, c, seed)
    full, _, _ = wl.train(full_model, train_set, regime, uf.HistoryPolicy(kind="full"), seed, model_kind)
    model = wl.make_model(model_kind, d, c, seed)
    minimal, train_s, finish_s = wl.train(model, train_set, regime, uf.HistoryPolicy(kind="minimal"), seed, model_kind)
    forget = wl.forget_set(len(train_set), ratio, seed)
    seconds = {"retrain": [], "mini": []}
    results, refusal = {}, None
    for _ in range(rounds):
        results["retrain"] = uf.unlearn(full_model, full, forget, train_set, LOSS, method="retrain")
        seconds["retrain"].append(results["retrain"].seconds)
        if refusal is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    results["mini"] = uf.unlearn(model, minimal, forget, train_set, LOSS, method="mini")
                seconds["mini"].append(results["mini"].seconds)
            except Exception as err:  # noqa: BLE001  a refusal is a measurement, not a failure of the script
                refusal = f"{type(err).__name__}: {str(err)[:160]}"
    retrain_s = statistics.median(seconds["retrain"])
    row = {"data": data, "model": model_kind, "momentum": momentum, "epochs": epochs, "steps": minimal.num_steps,
           "params": sum(p.numel() for p in model.parameters()), "train_s": train_s, "finish_s": finish_s,
           "finish_over_train": finish_s / train_s, "retrain_s": retrain_s, "bytes_minimal": history_bytes(minimal),
           "bytes_full": history_bytes(full), "mini_s": None, "speedup": None, "distance": None, "kl_forget": None,
           "kl_forget_untouched": None, "status": refusal}
    if refusal is None:
        mini = results["mini"]
        row["mini_s"] = statistics.median(seconds["mini"])
        row["distance"] = uf.metrics.relative_distance(mini.model, results["retrain"].model, model)
        unlearned, why = uf.metrics.verdict(mini.stats, row["distance"])
        row["status"] = "ok" if unlearned else f"not unlearned: {why}"
        if unlearned:
            row["speedup"] = retrain_s / row["mini_s"]
        ref = wl.evaluate(results["retrain"].model, (Xtr[forget], ytr[forget]), (Xte, yte))
        row["kl_forget"] = wl.evaluate(mini.model, (Xtr[forget], ytr[forget]), (Xte, yte), ref)["kl_forget"]
        row["kl_forget_untouched"] = wl.evaluate(model, (Xtr[forget], ytr[forget]), (Xte, yte), ref)["kl_forget"]
    return row


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def write(rows, args, out_dir, elapsed, load):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, args.stem)
    with open(stem + ".json", "w") as f:
        json.dump(uf.metrics.json_safe(rows), f, indent=1)
    lines = ["# Mini's costs against the training run's length", "",
             f"Command: `python benchmarks/mini_run_length.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {os.uname().machine}, {cpu_model()}, {os.cpu_count()} cores shared with other jobs (load average before "
             f"{load[0]}, after {load[1]}), 1 torch thread, torch {torch.__version__}. Wall time {elapsed / 60:.1f} min.  ",
             "SGD with the cosine-decaying learning rate (benchmarks/e2e_workloads.py), batch 64, weight decay 1e-3, default "
             "HistoryPolicy (kind='minimal', 64-vector budget); one random 10 % deletion per row. Seconds: median of "
             f"{args.rounds} interleaved calls (retrain, mini). Speed-up only where uf.metrics.verdict accepts Mini's result.", "",
             "| data | model | momentum | epochs | steps | params | train s | finish() s | finish / train | retrain s | mini s | "
             "speed-up | rel. dist | KL forget (untouched) | bytes minimal / full | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['model']} | {r['momentum']:g} | {r['epochs']} | {r['steps']} | {r['params']:,} | "
                     f"{r['train_s']:.2f} | {r['finish_s']:.2f} | {r['finish_over_train']:.2f}x | {r['retrain_s']:.3f} | "
                     f"{fmt(r['mini_s'], '.3f')} | {fmt(r['speedup'], '.1f')} | {fmt(r['distance'], '.3f')} | "
                     f"{fmt(r['kl_forget'], '.4f')} ({fmt(r['kl_forget_untouched'], '.4f')}) | "
                     f"{r['bytes_minimal']:,} / {r['bytes_full']:,} ({100 * r['bytes_minimal'] / r['bytes_full']:.1f} %) | {r['status']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, stem + ".png")
    print("\n".join(lines))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted({(r["data"], r["model"], r["momentum"]) for r in rows}):
        sel = [r for r in rows if (r["data"], r["model"], r["momentum"]) == key]
        label = f"{key[0]} {key[1]} (momentum {key[2]:g})"
        axes[0].plot([r["epochs"] for r in sel], [r["speedup"] if r["speedup"] else float("nan") for r in sel], "o-", label=label)
        axes[1].plot([r["epochs"] for r in sel], [r["finish_over_train"] for r in sel], "o-", label=label)
    axes[0].axhline(5, color="k", linestyle=":", label="goal 5x (MLP/CNN)")
    axes[0].axhline(10, color="k", linestyle="--", label="goal 10x (logistic)")
    axes[1].axhline(0.1, color="k", linestyle="--", label="goal 0.1")
    axes[0].set_ylabel("Mini's speed-up over retrain (x; missing: not unlearned)")
    axes[1].set_ylabel("finish() / training time")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("training epochs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[30, 60, 120, 240])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=[f"{d}:{m}:{b:g}" for d, m, b in WORKLOADS],
                        help="data:model:momentum triples (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--stem", default="mini_run_length")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), tuple(round(x, 2) for x in os.getloadavg())
    measure("wine", "mlp", 0.9, 2, 1)  # warm-up: the first finish() and request in a process pay one-time imports and dispatch setup
    rows = []
    for spec in args.workloads:
        data, model_kind, momentum = spec.split(":")
        for epochs in args.epochs:
            row = measure(data, model_kind, float(momentum), epochs, args.rounds)
            print(f"{data} {model_kind} {epochs} epochs: finish/train {row['finish_over_train']:.2f}, speed-up "
                  f"{fmt(row['speedup'], '.1f')}, distance {fmt(row['distance'], '.3f')}, {row['status']}", flush=True)
            rows.append(row)
    write(rows, args, args.out, time.perf_counter() - start, (load_before, tuple(round(x, 2) for x in os.getloadavg())))


if __name__ == "__main__":
    main()
