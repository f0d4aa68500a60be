"""DeltaGrad on the weights rebuilt from w0 and the recorded gradients (plain SGD: w_{t+1} = w_t - eta_t (g_t + lam w_t)).

Since commit 5b4b568's measurement (results/trajectory_reconstruction.md, first table: the stored int8 w_t against
the rebuilt ones, DeltaGrad otherwise unchanged) methods/deltagrad.py rebuilds w_t itself and reads only g_t. This
script records the benchmark's logistic regression runs (benchmarks/e2e_workloads.py, decaying lr, no momentum) with
each codec and reports DeltaGrad's relative distance |w - w_retrain| / |w* - w_retrain| at 10 % random deletion
against method="retrain", and the history bytes it read.

    .venv/bin/python benchmarks/trajectory_reconstruction.py [--data digits mnist1d] [--codecs int8 fp32]

Prints a markdown table (appended by hand to results/trajectory_reconstruction.md with the command and machine).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workloads as wl  # noqa: E402

import unlearn_fast as uf  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--codecs", nargs="+", default=["int8", "fp32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    loss = torch.nn.functional.cross_entropy
    print("| data | codec | T | DeltaGrad distance | history bytes read (trajectory + schedule) |")
    print("|---|---|---|---|---|")
    for name in args.data:
        Xtr, ytr, _, _ = wl.load_data(name)
        train_set = torch.utils.data.TensorDataset(Xtr, ytr)
        forget = wl.forget_set(len(train_set), 0.1, 0)
        for codec in args.codecs:
            model = wl.make_model("logistic", Xtr.shape[1], int(ytr.max()) + 1, 0)
            history, _, _ = wl.train(model, train_set, wl.Regime(), uf.HistoryPolicy(kind="full", codec=codec))
            ref = uf.unlearn(model, history, forget, train_set, loss, method="retrain").model
            dg = uf.unlearn(model, history, forget, train_set, loss, method="deltagrad")
            dist = uf.metrics.relative_distance(dg.model, ref, model)
            print(f"| {name} | {codec} | {history.num_steps} | {dist:.4f} | {dg.stats['history_bytes_read'] / 1e6:.1f} MB |", flush=True)


if __name__ == "__main__":
    main()
