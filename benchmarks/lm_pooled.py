"""The language-model goals over many seeds: the realistic scenario of benchmarks/lm_unlearning.py, re-drawn
(corpus, initial weights, batch order) per seed, with its pooled rows (POOLED_ROWS) re-run on each.

    .venv/bin/python benchmarks/lm_pooled.py --seeds 0-23 [--workers 2]

One seed's canaries (18) cannot resolve the issue's 10 % exposure window or its 0.03 MIA AUC window (a
mean over 18 canaries spreads by about 0.34 bits, an AUC over 20 forget samples by about 0.07); pooling
seeds can. Each seed's result is kept in benchmarks/results/lm_pooled/seed_N.json as soon as it is done
(a re-run reuses them), then everything is pooled into benchmarks/results/lm_pooled.{md,json,png}. The trained
and retrained models are kept in .cache/lm_pooled/ (git-ignored): after a change to the unlearning methods,
delete the seed JSONs and re-run; only the unlearning rows are computed again.
"""
import argparse
import json
import multiprocessing
import os
import sys
import textwrap
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_unlearning as lm  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CACHE = os.path.join(RESULTS, "lm_pooled")


def config(seed):
    cfg = dict(n_layer=2, n_embd=64, n_heldout=100, n_forget=20, **lm.SCENARIOS["realistic"])
    cfg.update(n_head=4, batch_size=16, lr=3e-3, seed=seed, quick=False, scenario="realistic")
    return cfg


def one_seed(seed):
    path = os.path.join(CACHE, f"seed_{seed}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    torch.set_num_threads(1)
    start = time.perf_counter()
    out = lm.pool_seed(config(seed), seed, lm.MODEL_CACHE)  # delete a seed's JSON to re-run its rows only
    out["wall_seconds"] = time.perf_counter() - start
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)  # a seed counts once it is completely written
    print(f"seed {seed} done in {out['wall_seconds']:.0f} s", flush=True)
    return out


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    return seeds


def plot(pooled, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in pooled["rows"] if r["target"] == "set"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 2), sharey=True)
    y = np.arange(len(rows))
    rel = np.array([r["relative_diff"] for r in rows])
    ci = np.array([r["relative_diff_ci"] for r in rows])
    ax1.errorbar(rel * 100, y, xerr=[(rel - ci[:, 0]) * 100, (ci[:, 1] - rel) * 100], fmt="o", capsize=3)
    ax1.axvspan(-10, 10, color="tab:green", alpha=0.15, label="goal: within 10 %")
    ax1.set_xlabel("exposure vs retrained, % (95% bootstrap CI)")
    ax1.set_yticks(y, [textwrap.fill(r["label"], 48) for r in rows], fontsize=7)
    ax1.legend(fontsize=7)
    gap = np.array([np.mean(r["mia_auc"]) - np.mean(r["mia_auc_retrain"]) for r in rows])
    se = np.array([np.std(np.subtract(r["mia_auc"], r["mia_auc_retrain"]), ddof=1) / np.sqrt(len(r["mia_auc"])) for r in rows])
    ax2.errorbar(gap, y, xerr=1.96 * se, fmt="o", capsize=3, color="tab:orange")
    ax2.axvspan(-0.03, 0.03, color="tab:green", alpha=0.15)
    ax2.set_xlabel("MIA AUC minus retrained's, seed mean (95% CI)")
    fig.suptitle(f"Language-model unlearning over {len(pooled['seeds'])} seeds (realistic scenario)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0-23", help="e.g. 0-23 or 0,3,5-7")
    parser.add_argument("--workers", type=int, default=1, help="seeds run in parallel, one thread each")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    os.makedirs(CACHE, exist_ok=True)
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as workers:
            per_seed = workers.map(one_seed, seeds, chunksize=1)
    else:
        per_seed = [one_seed(seed) for seed in seeds]
    pooled = lm.pool(per_seed)
    lines = [
        "# Language-model unlearning over many seeds", "",
        f"Command: `python benchmarks/lm_pooled.py --seeds {args.seeds} --workers {args.workers}`  ",
        f"Realistic scenario of benchmarks/lm_unlearning.py ({config(0)}), one torch thread per seed; "
        f"wall time {time.perf_counter() - start:.0f} s (seeds already in benchmarks/results/lm_pooled/ were reused). "
        "Speed-ups are per seed, each against that seed's retraining (timed when its models were trained and cached "
        "in .cache/lm_pooled/, under the same two-worker load); each unlearning time is the median of "
        f"{lm.TIMING_RUNS} runs.",
        *lm.render_pooled(pooled),
    ]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "lm_pooled.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, "lm_pooled.json"), "w") as f:
        json.dump({k: v for k, v in pooled.items() if k != "per_seed"}, f, indent=1)
    plot(pooled, os.path.join(RESULTS, "lm_pooled.png"))
    print(text)


if __name__ == "__main__":
    main()
