"""Benchmark plumbing for benchmarks/end_to_end.py: data sets that ship with packages (no downloads), the three
model families, SGD training in two regimes with and without momentum (recording a history), the forget sets,
and output-level metrics. Not part of the library (unlearn_fast/workloads.py serves the CLI demo)."""
import dataclasses

import torch

import unlearn_fast as uf
from unlearn_fast.workloads import load_data as load_library_data
from unlearn_fast.workloads import train as library_train

DATASETS = ("digits", "breast_cancer", "wine", "mnist1d")
MODELS = ("logistic", "mlp", "cnn")


def load_data(name):
    """(X_train, y_train, X_test, y_test) as float32 / int64; digits keeps its 64 pixels in [0, 1] (the CNN
    reads them as 8x8 images), the others are standardised with training statistics."""
    if name in ("digits", "mnist1d"):
        return load_library_data(name)
    if name not in DATASETS:
        raise ValueError(f"data: unknown data set {name!r}, expected one of {DATASETS}")
    from sklearn import datasets

    d = datasets.load_breast_cancer() if name == "breast_cancer" else datasets.load_wine()
    X, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    cut = int(0.75 * len(X))
    tr, te = perm[:cut], perm[cut:]
    mu, sd = X[tr].mean(0), X[tr].std(0).clamp(min=1e-6)
    return (X[tr] - mu) / sd, y[tr], (X[te] - mu) / sd, y[te]


class CNN(torch.nn.Module):
    """Two 3x3 convolutions on 8x8 digits, a max-pool and two linear layers: 118,346 parameters."""

    def __init__(self, c):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2))
        self.head = torch.nn.Sequential(torch.nn.Linear(64 * 4 * 4, 96), torch.nn.ReLU(), torch.nn.Linear(96, c))

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))


def make_model(kind, d, c, seed):
    torch.manual_seed(seed)
    if kind == "logistic":
        return torch.nn.Linear(d, c)
    if kind == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, c))
    if kind == "cnn":
        if d != 64:
            raise ValueError(f"model: the CNN reads 8x8 images (digits), got {d} features")
        return CNN(c)
    raise ValueError(f"model: unknown kind {kind!r}, expected one of {MODELS}")


@dataclasses.dataclass(frozen=True)
class Regime:
    """SGD settings. lr is the step size without momentum; with momentum beta it is scaled by (1 - beta) so that
    the effective step lr / (1 - beta) stays the same (0.2 with momentum 0.9 diverges on these models)."""

    schedule: str = "decay"  # "decay": cosine from lr to lr_min; "constant": lr throughout; "onecycle": OneCycleLR
    momentum: float = 0.0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.2
    lr_min: float = 0.002
    weight_decay: float = 1e-3

    @property
    def name(self):
        return f"{self.schedule}, momentum {self.momentum:g}"


CNN_LR = 0.05  # 0.2 makes the CNN's first steps diverge on digits


def train(model, train_set, regime, policy=None, seed=0, model_kind=None):
    """Train with SGD; returns (history or None, training seconds, finish() seconds)."""
    base = CNN_LR if model_kind == "cnn" else regime.lr
    lr = base * (1 - regime.momentum)
    return library_train(model, train_set, policy, seed=seed, epochs=regime.epochs, batch_size=regime.batch_size, lr=lr,
                         lr_min=regime.lr_min * lr / regime.lr, weight_decay=regime.weight_decay, momentum=regime.momentum,
                         schedule=regime.schedule)


def flip_labels(y, idx, classes):
    """Systematic poison: every flipped sample of class c is labelled c + 1 (mod classes)."""
    y = y.clone()
    y[idx] = (y[idx] + 1) % classes
    return y


MEMORISED_N = 300  # training samples of the memorised workload (fewer if the data set is smaller)
MEMORISED_EPOCHS = 150


def forget_set(n, ratio, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + int(ratio * 1000)))[: max(2, int(ratio * n))]


# ----------------------------------------------------------------------------- output-level metrics
@torch.no_grad()
def log_probs(model, X):
    was = model.training
    model.eval()
    try:
        return torch.log_softmax(model(X).double(), -1)
    finally:
        model.train(was)


def mean_kl(logp_ref, logp):
    """Mean over samples of KL(p_ref || p), p_ref the retrained model's predicted distribution."""
    return float((logp_ref.exp() * (logp_ref - logp)).sum(-1).mean())


def evaluate(model, forget, test, ref=None):
    """Accuracies, loss-threshold and logistic MIA AUC (forget vs test samples), and KL to `ref` (the retrained
    model's evaluation) on the forget and test sets."""
    (Xf, yf), (Xt, yt) = forget, test
    lf, lt = log_probs(model, Xf), log_probs(model, Xt)
    loss_f, loss_t = -lf.gather(1, yf[:, None]).squeeze(1), -lt.gather(1, yt[:, None]).squeeze(1)
    out = {
        "test_accuracy": float((lt.argmax(-1) == yt).double().mean()),
        "forget_accuracy": float((lf.argmax(-1) == yf).double().mean()),
        "mia_auc": uf.metrics.mia_auc_loss_threshold(loss_f, loss_t),
        "mia_auc_logistic": (uf.metrics.mia_auc_logistic(loss_f, loss_t) if min(len(yf), len(yt)) >= 5 else float("nan")),
        "_logp": (lf, lt),
    }
    if ref is not None:
        out["kl_forget"] = mean_kl(ref["_logp"][0], lf)
        out["kl_test"] = mean_kl(ref["_logp"][1], lt)
        for key in ("test_accuracy", "forget_accuracy", "mia_auc", "mia_auc_logistic"):
            out[key + "_gap"] = out[key] - ref[key]
    return out
