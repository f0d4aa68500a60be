"""The end-to-end workloads: data sets that ship with packages (no download), the two models, and SGD
training that records a GradientHistory. Shared by `python -m unlearn_fast demo` and
benchmarks/end_to_end.py, so the demo runs exactly what the benchmark measures."""
import time

import torch

from .recording import HistoryRecorder

DATASETS = ("digits", "mnist1d")
MODELS = ("logistic", "mlp")


def load_data(name):
    """(X_train, y_train, X_test, y_test)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        X, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
        tr, te = perm[:1437], perm[1437:]
        return X[tr], y[tr], X[te], y[te]  # pixel intensities in [0, 1]; many pixels are constant 0
    elif name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # generated from templates, no download
        Xtr, ytr = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
        Xte, yte = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"])
        mu, sd = Xtr.mean(0), Xtr.std(0)
        return (Xtr - mu) / sd, ytr, (Xte - mu) / sd, yte  # standardised with training statistics
    raise ValueError(f"data: unknown data set {name!r}, expected one of {DATASETS}")


def make_model(kind, d, c, seed):
    """Multinomial logistic regression (a linear layer) or a 2-layer MLP with 64 hidden units."""
    if kind not in MODELS:
        raise ValueError(f"model: unknown kind {kind!r}, expected one of {MODELS}")
    torch.manual_seed(seed)
    if kind == "logistic":
        return torch.nn.Linear(d, c)
    return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, c))


CONFIG = {"epochs": 30, "batch_size": 64, "lr": 0.2, "lr_min": 0.002, "weight_decay": 1e-3, "momentum": 0.0, "schedule": "decay"}


def train(model, train_set, policy=None, seed=0, progress=None, **cfg):
    """SGD (cfg["momentum"]) with a cosine learning-rate schedule down to cfg["lr_min"] (cfg["schedule"] "decay"), a
    constant one ("constant"), or OneCycleLR up to cfg["lr"] and down ("onecycle": it also cycles the momentum between
    0.95 and 0.85, inversely to the learning rate); records a GradientHistory when a policy is given.
    Returns (history or None, training seconds, finish() seconds); `progress(epoch)` is called after each epoch."""
    cfg = {**CONFIG, **cfg}
    if cfg["schedule"] not in ("decay", "constant", "onecycle"):
        raise ValueError(f"schedule: must be 'decay', 'constant' or 'onecycle', got {cfg['schedule']!r}")
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    n, bs = len(train_set), min(cfg["batch_size"], len(train_set))
    steps = cfg["epochs"] * (n // bs)
    sched = {"decay": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=cfg["lr_min"]),
             "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=steps),
             "constant": lambda: None}[cfg["schedule"]]()
    rec = HistoryRecorder(model, opt, policy) if policy else None
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.functional.cross_entropy
    start = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(n, generator=gen)
        for b in range(n // bs):
            idx = order[b * bs : (b + 1) * bs]
            x, y = train_set[idx]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if rec:
                rec.record(idx, batch_size=len(y))
            opt.step()
            if sched:
                sched.step()
        if progress is not None:
            progress(epoch)
    train_seconds = time.perf_counter() - start
    history = rec.finish(train_set, loss_fn) if rec else None
    return history, train_seconds, time.perf_counter() - start - train_seconds
