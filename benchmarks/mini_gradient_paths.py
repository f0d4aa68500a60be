"""Mini's request time with logistic regression's closed-form gradient sums against the autograd path (a loss_fn that
is not F.cross_entropy itself takes it), paired in one process on the same minimal histories, medians of 5, with the
relative distance to the exact retrain of each (docs/mini_unlearning.md section 13; 1 torch thread).

    .venv/bin/python benchmarks/mini_gradient_paths.py digits,mnist1d,breast_cancer,wine
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch; torch.set_num_threads(1)
import unlearn_fast as uf, e2e_workloads as wl
from unlearn_fast.methods import mini
F = torch.nn.functional
def flat(m): return torch.cat([p.detach().reshape(-1) for p in m.parameters()])
for data in sys.argv[1].split(","):
    X, y, _, _ = wl.load_data(data); n, d, c = len(X), X.shape[1], int(y.max()) + 1
    ts = torch.utils.data.TensorDataset(X, y)
    om = wl.make_model("logistic", d, c, 0); hm, _, _ = wl.train(om, ts, wl.Regime(), uf.HistoryPolicy(kind="minimal"), 0, "logistic")
    of = wl.make_model("logistic", d, c, 0); hf, _, _ = wl.train(of, ts, wl.Regime(), uf.HistoryPolicy(kind="full"), 0, "logistic")
    for ratio in (0.1, 0.3):
        forget = wl.forget_set(n, ratio, 0)
        rt = [uf.unlearn(of, hf, forget, ts, F.cross_entropy, method="retrain") for _ in range(3)]
        wr = flat(rt[-1].model); gap = float((flat(om) - wr).norm())
        out = []
        for name, loss in (("closed form", F.cross_entropy), ("autograd", lambda o, t: F.cross_entropy(o, t))):
            rs = [uf.unlearn(om, hm, forget, ts, loss, method="mini") for _ in range(5)]
            out.append(f"{name} {statistics.median(r.seconds for r in rs)*1e3:.1f} ms dist {float((flat(rs[-1].model)-wr).norm())/gap:.4f}")
        print(data, ratio, f"retrain {statistics.median(r.seconds for r in rt)*1e3:.0f} ms |", " | ".join(out), flush=True)
