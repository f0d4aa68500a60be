"""Rewind with the run's own optimizer state (rebuilt with the checkpoint, methods/trajectory.py) against fresh state,
same checkpoints and budgets: relative distance to the retrained model (0 = retrain, 1 = the untouched model).
Logistic regression, SGD momentum 0.9, lr 0.02, 30 epochs of batch 64, 10 % random forget set.

    python benchmarks/rewind_state.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_workloads as wl  # noqa: E402

import unlearn_fast as uf  # noqa: E402
from unlearn_fast.methods import retrain  # noqa: E402
from unlearn_fast.workloads import train  # noqa: E402

for data in ("wine", "breast_cancer", "digits"):
    for regime in ({"schedule": "constant", "momentum": 0.9, "lr": 0.02}, {"schedule": "decay", "momentum": 0.9, "lr": 0.02}):
        Xtr, ytr, Xte, yte = wl.load_data(data)
        ds = torch.utils.data.TensorDataset(Xtr, ytr)
        model = wl.make_model("logistic", Xtr.shape[1], int(ytr.max()) + 1, 0)
        history, _, _ = train(model, ds, uf.HistoryPolicy(kind="full"), seed=0, epochs=30, batch_size=64, **regime)
        forget = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[: len(ds) // 10]
        ref = uf.unlearn(model, history, forget, ds, torch.nn.functional.cross_entropy, method="retrain").model
        T = history.num_steps
        def fresh(params, meta=history.meta):  # the recorded optimizer class, empty state
            return retrain.build_optimizer(params, meta)

        out = []
        for frac in (0.2, 0.5):
            B = int(frac * T)
            a = uf.unlearn(model, history, forget, ds, torch.nn.functional.cross_entropy, method="rewind", steps=B).model
            b = uf.unlearn(model, history, forget, ds, torch.nn.functional.cross_entropy, method="rewind", steps=B, optimizer=fresh).model
            da, db = (uf.metrics.relative_distance(m, ref, model) for m in (a, b))
            out.append(f"budget {frac:.0%} of T: state {da:.3f} fresh {db:.3f}")
        print(data, regime["schedule"], "T", T, " | ".join(out), flush=True)
