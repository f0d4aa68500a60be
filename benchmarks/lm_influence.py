"""Influence of the forget samples before and after unlearning (issue 4's scoring): Hessian (inverse-HVP,
Gauss-Newton, conjugate gradients) influence next to the gradient dot-product score, on the original, the
unlearned and the retrained model of the realistic scenario (seed 0).

    .venv/bin/python benchmarks/lm_influence.py [--seed 0]

Writes benchmarks/results/lm_influence.{md,json}. Scores are of each forget sample on the forget set's loss, in
the embedding parameters; the curvature is that of 64 retain samples' mean loss.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_pooled  # noqa: E402
import lm_unlearning as lm  # noqa: E402

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.lm import RECOMMENDED, TextDataset, make_corpus, metrics  # noqa: E402
from unlearn_fast.lm.ascent import calibration_statistic  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DAMPING = 1e-2


def scores(model, train, forget, probe, curvature):
    start = time.perf_counter()
    hvp, report = metrics.hvp_influence(model, train, forget, probe, hessian_set=curvature, damping=DAMPING)
    hvp_seconds = time.perf_counter() - start
    grad = metrics.gradient_influence(model, train, forget, probe)
    return {"hvp_influence": hvp.tolist(), "hvp_mean": float(hvp.mean()), "cg_iterations": report.iterations,
            "hvp_seconds": hvp_seconds, "gradient_influence": grad.tolist(), "gradient_mean": float(grad.mean()),
            "forget_loss": float(metrics.losses(model, probe).mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = lm_pooled.config(args.seed)
    corpus = make_corpus(args.seed, cfg["n_train"], cfg["n_heldout"], n_variant_people=4)
    train, heldout = TextDataset(corpus.train_texts), TextDataset(corpus.heldout_texts)
    _, _, forget, _ = lm.forget_split(corpus, cfg)
    retain = [i for i in range(len(train)) if i not in set(forget)]
    probe, curvature = train.subset(forget), train.subset(retain[:64])
    # the pooled study's models of this seed (trained and cached once, see lm_unlearning.trained_pair)
    model, _, retrained, _ = lm.trained_pair(cfg, args.seed, train, forget, lm.MODEL_CACHE)
    held = calibration_statistic(model, heldout, "min_k", 0.2)
    unlearned = uf.unlearn(model, None, forget, train, None, method="gradient_ascent", heldout=held, **RECOMMENDED).model
    out = {}
    for name, m in (("original", model), ("unlearned", unlearned), ("retrained", retrained)):
        print(f"scores: {name} ...", flush=True)
        out[name] = scores(m, train, forget, probe, curvature)
    lines = [
        "# Influence of the forget samples before and after unlearning", "",
        f"Command: `python benchmarks/lm_influence.py --seed {args.seed}`  ",
        f"Realistic scenario, seed {args.seed} ({len(forget)} forget samples); unlearning: gradient ascent, fisher retain "
        "guard, floor Min-K% calibration. Scores of each forget sample on the forget set's loss, embedding parameters: "
        f"Hessian influence -g_F' (G + {DAMPING} I)^-1 g_i with G the Gauss-Newton matrix of 64 retain samples' loss "
        "(uf.ihvp, conjugate gradients), and the gradient dot product g_F' g_i (TracIn at one checkpoint). Negative "
        "Hessian influence: up-weighting the sample lowers the forget loss (the model still relies on it).", "",
        "| model | forget loss | Hessian influence, mean | gradient score, mean | CG iterations | Hessian influence s |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in out.items():
        lines.append(f"| {name} | {r['forget_loss']:.3f} | {r['hvp_mean']:.4g} | {r['gradient_mean']:.4g} | "
                     f"{r['cg_iterations']} | {r['hvp_seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(RESULTS, "lm_influence.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, "lm_influence.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
