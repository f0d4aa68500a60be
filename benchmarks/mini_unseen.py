"""Mini on logistic-regression workloads the benchmark matrix does not hold (other data sets from sklearn, schedules,
batch sizes, Nesterov momentum, no weight decay, float64): relative distance |w - w_retrain| / |w* - w_retrain| of
DeltaGrad, Mini on a kind="minimal" history and Mini on a kind="full" one (its summary prepared before the timed call),
each method's speed-up over the exact retrain (one call each, 1 torch thread), and Mini's a-posteriori check ratio and
SGD-noise estimate. A refusal prints its reason.

    .venv/bin/python benchmarks/mini_unseen.py [CASE ...]     (default: every case; prints a markdown table)
"""
import os, sys, time, warnings
import torch
import unlearn_fast as uf
from unlearn_fast.history import flat_params
from unlearn_fast.methods import mini
from sklearn import datasets
from machine import cpu_model
torch.set_num_threads(1)
warnings.simplefilter("ignore")
LOSS = torch.nn.functional.cross_entropy

def std(X):
    X = torch.as_tensor(X, dtype=torch.float32); return (X - X.mean(0)) / X.std(0).clamp(min=1e-6)

def data(name):
    if name == "iris":
        d = datasets.load_iris(); return std(d.data), torch.as_tensor(d.target)
    if name == "imbalanced":
        X, y = datasets.make_classification(3000, 20, n_informative=8, n_classes=3, weights=[0.8, 0.15, 0.05], random_state=1)
        return std(X), torch.as_tensor(y)
    if name == "blobs8":
        X, y = datasets.make_blobs(4000, 16, centers=8, cluster_std=4.0, random_state=2); return std(X), torch.as_tensor(y)
    if name == "linnerud_like":
        X, y = datasets.make_classification(1200, 50, n_informative=30, n_redundant=10, n_classes=5, class_sep=0.7, random_state=3)
        return std(X), torch.as_tensor(y)
    raise ValueError(name)

def train(X, y, kind, epochs, batch, lr, wd, momentum=0.0, nesterov=False, sched=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], int(y.max()) + 1).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum, nesterov=nesterov)
    steps = epochs * (len(X) // batch)
    s = sched(opt, steps) if sched else None
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind))
    gen = torch.Generator().manual_seed(seed)
    X = X.to(dtype)
    t = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=gen)
        for b in range(len(X) // batch):
            idx = order[b * batch:(b + 1) * batch]
            opt.zero_grad(); LOSS(model(X[idx]), y[idx]).backward(); rec.record(idx); opt.step()
            if s: s.step()
    tt = time.perf_counter() - t
    return model, rec.finish(torch.utils.data.TensorDataset(X, y), LOSS), tt

SCHED = {
    "const": None,
    "cosine": lambda o, T: torch.optim.lr_scheduler.CosineAnnealingLR(o, T, eta_min=0.0),
    "step": lambda o, T: torch.optim.lr_scheduler.StepLR(o, max(1, T // 3), gamma=0.3),
    "warmup-linear": lambda o, T: torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / (0.1 * T)) * max(0.0, 1 - t / T)),
    "onecycle": lambda o, T: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=o.param_groups[0]["lr"], total_steps=T),
}
CASES = [
    # name, data, epochs, batch, lr, wd, momentum, nesterov, sched, dtype
    ("iris cosine b16", "iris", 40, 16, 0.1, 1e-3, 0.0, False, "cosine", torch.float32),
    ("imbalanced wd0 cosine b64", "imbalanced", 20, 64, 0.2, 0.0, 0.0, False, "cosine", torch.float32),
    ("imbalanced nesterov step b32", "imbalanced", 15, 32, 0.05, 5e-4, 0.9, True, "step", torch.float32),
    ("blobs8 warmup-linear b256", "blobs8", 40, 256, 0.5, 1e-4, 0.0, False, "warmup-linear", torch.float32),
    ("blobs8 onecycle b128 f64", "blobs8", 20, 128, 0.3, 1e-3, 0.9, False, "onecycle", torch.float64),
    ("p50c5 const b100 wd1e-2", "linnerud_like", 30, 100, 0.1, 1e-2, 0.0, False, "const", torch.float32),
]
sel = sys.argv[1:] or [c[0] for c in CASES]
print(f"`python benchmarks/mini_unseen.py {' '.join(sys.argv[1:])}` on {cpu_model()}, {os.cpu_count()} cores, 1 torch thread, torch {torch.__version__}; "
      f"load average {os.getloadavg()[0]:.2f}\n")
print("| case | forget | T | gap | DeltaGrad | Mini (minimal) | Mini (full history) |")
print("|---|---|---|---|---|---|---|")
for name, dn, ep, b, lr, wd, mom, nest, sch, dt in CASES:
    if name not in sel: continue
    X, y = data(dn)
    ts = torch.utils.data.TensorDataset(X.to(dt), y)
    m_full, h_full, tt = train(X, y, "full", ep, b, lr, wd, mom, nest, SCHED[sch], dt)
    m_min, h_min, _ = train(X, y, "minimal", ep, b, lr, wd, mom, nest, SCHED[sch], dt)
    mini.prepare(h_full, m_full, ts, LOSS)  # (once per history; timed apart in docs section 13)
    for ratio in (0.1, 0.3):
        forget = torch.randperm(len(X), generator=torch.Generator().manual_seed(7))[: int(ratio * len(X))]
        t = time.perf_counter(); ref = uf.unlearn(m_full, h_full, forget, ts, LOSS, method="retrain").model; t_re = time.perf_counter() - t
        w0, wr = flat_params(m_full), flat_params(ref)
        gap = float((w0 - wr).norm())
        row = [name, f"{ratio:.0%}", str(h_full.num_steps), f"{gap:.3g}"]
        for label, m, h, meth in (("DG", m_full, h_full, "deltagrad"), ("mini", m_min, h_min, "mini"), ("mini-full", m_full, h_full, "mini")):
            try:
                t = time.perf_counter(); res = uf.unlearn(m, h, forget, ts, LOSS, method=meth); dtm = time.perf_counter() - t
                d = float((flat_params(res.model) - wr).norm()) / gap
                extra = ""
                if meth == "mini":
                    st = res.stats
                    extra = f", check {st.get('retained_gradient_ratio', float('nan')):.2f}, noise {st.get('sgd_noise_estimate', float('nan')):.2f}"
                    extra += ", batch term" if "batch_shift" in st else ""
                row.append(f"{d:.3f} ({t_re / dtm:.1f}x{extra})")
            except Exception as e:
                row.append(f"refused: {type(e).__name__}: {str(e)[:90]}")
        print("| " + " | ".join(row) + " |", flush=True)
