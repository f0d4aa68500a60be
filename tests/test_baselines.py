"""finetune (Descent-to-Delete) and rewind (Rewind-to-Delete): budgets, equalities with retrain, bad input."""
import copy

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.history import EncodedRows, flat_params, set_flat_params
from unlearn_fast.methods import finetune, retrain, rewind

LOSS = torch.nn.functional.cross_entropy


def make_data(n=200, d=8, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=gen, dtype=torch.float64) * 1.5
    y = torch.randint(0, c, (n,), generator=gen)
    X = centers[y] + torch.randn(n, d, generator=gen, dtype=torch.float64)
    return torch.utils.data.TensorDataset(X, y)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train(data, kind="full", epochs=5, batch=25, lr=0.5, wd=1e-2, optimizer="sgd", momentum=0.0, seed=0, decay=0.8):
    """Logistic regression with L2 (strongly convex), a per-epoch decaying learning rate; returns (model, history)."""
    X, _ = data.tensors
    torch.manual_seed(seed)
    model = torch.nn.Linear(X.shape[1], 3).double()
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=wd)
    # (27 parameters: 64 vectors' 1.7 kB would not hold w0, the step-decayed schedule and two basis vectors)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind=kind, rank=2, budget_vectors=256))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        for b in range(0, len(data), batch):
            idx = order[b : b + batch]
            opt.zero_grad()
            LOSS(model(data.tensors[0][idx]), data.tensors[1][idx]).backward()
            rec.record(idx)
            opt.step()
        for g in opt.param_groups:
            g["lr"] *= decay
    return model, rec.finish(data, LOSS)


def retained_optimum(data, forget, wd):
    """argmin of the mean retained loss + wd/2 |w|^2 by full-batch L-BFGS (an independent solver)."""
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[forget] = False
    X, y = data.tensors[0][keep], data.tensors[1][keep]
    torch.manual_seed(1)
    model = torch.nn.Linear(X.shape[1], 3).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = LOSS(model(X), y) + wd / 2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return flat_params(model)


def snapshot(history):
    """Every tensor the history holds, cloned (to check that no method writes into it)."""
    out = {key: [b.clone() for b in value] if isinstance(value, list) else {k: b.clone() for k, b in value.items()} if isinstance(value, dict)
           else value.clone() for key, value in history.schedule.items()}
    for section in ("trajectory", "summary"):
        for key, value in (getattr(history, section) or {}).items():
            if isinstance(value, uf.history.ChunkedRows):
                out[f"{section}.{key}"] = value.all().clone()
            elif isinstance(value, EncodedRows):
                out[f"{section}.{key}"] = {k: t.clone() for k, t in value.tensors.items()}
            elif isinstance(value, torch.Tensor):
                out[f"{section}.{key}"] = value.clone()
    return out


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


FORGET = torch.arange(0, 200, 7)  # 29 samples, spread over the batches


@pytest.fixture(scope="module")
def full():
    data = make_data()
    model, history = train(data, "full")
    return data, model, history


@pytest.mark.parametrize("method", ["finetune", "rewind"])
def test_zero_budget_returns_the_trained_model(full, method):
    data, model, history = full
    for budget in ({"steps": 0}, {"seconds": 0}, {"steps": 0, "seconds": 5.0}):
        res = uf.unlearn(model, history, FORGET, data, LOSS, method=method, **budget)
        assert torch.equal(flat_params(res.model), flat_params(model))
        assert res.stats["unlearned"] is False and "unchanged" in res.stats["reason"]
        assert uf.metrics.verdict(res.stats)[0] is False


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_rewind_over_the_whole_run_equals_retrain(optimizer, momentum):
    data = make_data()
    model, history = train(data, "full", optimizer=optimizer, momentum=momentum)
    ref = uf.unlearn(model, history, FORGET, data, LOSS, method="retrain")
    for steps in (history.num_steps, 10 * history.num_steps):
        res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=steps)
        assert res.stats["checkpoint_step"] == 0 and res.stats["checkpoint_source"] == "w0"
        assert torch.equal(flat_params(res.model), flat_params(ref.model))  # bit for bit
        assert res.stats["steps"] == ref.stats["steps"] and res.stats["gradient_evaluations"] == ref.stats["gradient_evaluations"]


def test_rewind_with_nothing_forgotten_reproduces_training(full):
    """Plain SGD keeps no optimizer state, so replaying the recorded tail from an exact (fp32) checkpoint
    reproduces the trained weights bit for bit: the replay follows the recorded batches and learning rates."""
    data, model, history = full
    for steps in (1, 13, history.num_steps - 1):
        out, stats = rewind.run(copy.deepcopy(model), history, torch.zeros(0, dtype=torch.int64), data, LOSS, steps=steps)
        assert stats["checkpoint_step"] == history.num_steps - steps and stats["checkpoint_source"] == "trajectory"
        assert torch.equal(flat_params(out), flat_params(model))


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.9), ("adam", 0.0)])
def test_rewind_goes_on_with_the_runs_optimizer_state(optimizer, momentum):
    """Momentum buffers and Adam moments are rebuilt with the checkpoint's weights (methods/trajectory.py): forgetting
    nothing from t > 0 reproduces the trained weights bit for bit; with fresh state (the caller's factory) it does not."""
    data = make_data()
    model, history = train(data, "full", optimizer=optimizer, momentum=momentum)
    nothing = torch.zeros(0, dtype=torch.int64)
    for steps in (1, 13, history.num_steps - 1):
        out, stats = rewind.run(copy.deepcopy(model), history, nothing, data, LOSS, steps=steps)
        assert stats["checkpoint_source"] == "trajectory" and torch.equal(flat_params(out), flat_params(model)), steps
    fresh = lambda params: retrain.build_optimizer(params, history.meta)  # noqa: E731 (the recorded class, fresh state)
    out, _ = rewind.run(copy.deepcopy(model), history, nothing, data, LOSS, steps=13, optimizer=fresh)
    assert not torch.allclose(flat_params(out), flat_params(model), rtol=0, atol=1e-6)


def distances(model, history, data, ref, method, budgets, **options):
    return [uf.metrics.relative_distance(uf.unlearn(model, history, FORGET, data, LOSS, method=method, steps=b, **options).model,
                                         ref, model) for b in budgets]


def test_rewind_moves_towards_the_retrained_model(full):
    """Strongly convex problem: the further back the rewind (the larger the budget), the closer to retraining;
    exact at the whole run's budget."""
    data, model, history = full
    T = history.num_steps
    ref = uf.unlearn(model, history, FORGET, data, LOSS, method="retrain").model
    rw = distances(model, history, data, ref, "rewind", [T // 4, T // 2, 3 * T // 4, T])
    assert rw[0] < 0.9 and all(a > b for a, b in zip(rw, rw[1:])) and rw[-1] == 0.0


def test_finetune_moves_towards_the_retrained_model():
    """Trained to convergence (full-batch GD), the retrained model is the retained optimum, to which full-batch
    finetune contracts: the distance to retraining falls with the budget (0.70, 0.25, 0.010 measured)."""
    data = make_data()
    model, history = train(data, "full", epochs=150, batch=len(data), decay=1.0, wd=0.1)
    ref = uf.unlearn(model, history, FORGET, data, LOSS, method="retrain").model
    ft = distances(model, history, data, ref, "finetune", [4, 16, 64], lr=0.5, batch_size=len(data))
    assert ft[0] < 0.9 and ft[1] < 0.5 * ft[0] and ft[2] < 0.05


def test_finetune_is_gradient_descent_to_the_retained_optimum():
    """Full-batch finetune at a constant learning rate is Descent-to-Delete; it converges to the unique optimum of
    the retained regularised loss, computed here independently by L-BFGS."""
    data = make_data()
    wd = 0.1  # well conditioned: a few hundred steps converge
    model, history = train(data, "full", wd=wd)
    w_opt = retained_optimum(data, FORGET, wd)
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", steps=600, lr=0.5, batch_size=len(data))
    w = flat_params(res.model)
    start = float(torch.linalg.vector_norm(flat_params(model) - w_opt))
    assert start > 1e-2  # forgetting moved the optimum measurably
    assert float(torch.linalg.vector_norm(w - w_opt)) < 1e-6 * max(1.0, float(torch.linalg.vector_norm(w_opt)))
    assert res.stats["steps"] == 600 and res.stats["batch_size"] == len(data) - len(FORGET)


def test_finetune_follows_the_tail_of_the_recorded_schedule(full):
    """Full-batch finetune with k steps takes the last k recorded learning rates: a hand-written GD loop agrees."""
    data, model, history = full
    keep = torch.ones(len(data), dtype=torch.bool)
    keep[FORGET] = False
    X, y = data.tensors[0][keep], data.tensors[1][keep]
    lrs = history.schedule["lrs"][:, 0].tolist()
    wd = history.meta["optimizer"]["groups"][0]["weight_decay"]
    T, k = history.num_steps, 7
    ref = copy.deepcopy(model)
    for j in range(k):
        ref.zero_grad()
        LOSS(ref(X), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lrs[T - k + j] * (p.grad + wd * p)
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", steps=k, batch_size=len(data))
    torch.testing.assert_close(flat_params(res.model), flat_params(ref), rtol=1e-12, atol=1e-12)


def test_optimizer_factory(full):
    data, model, history = full
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", steps=5, optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert res.stats["steps"] == 5 and not torch.equal(flat_params(res.model), flat_params(model))
    # rewind from w0 with the recorded optimizer rebuilt by the factory equals retrain
    ref = uf.unlearn(model, history, FORGET, data, LOSS, method="retrain")
    wd = history.meta["optimizer"]["groups"][0]["weight_decay"]
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=history.num_steps,
                     optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0, weight_decay=wd))
    assert torch.equal(flat_params(res.model), flat_params(ref.model))
    # without a history, finetune needs everything spelled out
    res = uf.unlearn(model, None, FORGET, data, LOSS, method="finetune", steps=3, lr=0.1, batch_size=20,
                     optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert res.stats["steps"] == 3
    with pytest.raises(ValueError, match="history"):
        uf.unlearn(model, None, FORGET, data, LOSS, method="finetune", steps=3)
    with pytest.raises(ValueError, match="optimizer"):
        uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", steps=3, optimizer=lambda ps: "sgd")
    with pytest.raises(ValueError, match="optimizer"):  # two groups against one recorded learning rate per step
        uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", steps=3,
                   optimizer=lambda ps: torch.optim.SGD([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1))


def test_seconds_budget(full):
    data, model, history = full
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="finetune", seconds=30.0, steps=6)
    assert res.stats["steps"] == 6  # the step budget binds first
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", seconds=60.0)
    assert res.stats["checkpoint_step"] == 0 and res.stats["steps"] > 0  # a minute replays this whole tiny run


def test_minimal_history_checkpoints():
    data = make_data()
    model, history = train(data, "minimal", epochs=12)
    T = history.num_steps
    steps = sorted(int(s) for s in history.summary["ckpt_steps"])
    later = [s for s in steps if s > 0]
    assert later, "the minimal history keeps checkpoints after step 0"
    before = snapshot(history)
    # a budget reaching exactly one recorded checkpoint rewinds to it
    t = later[-1]
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=T - t)
    assert res.stats["checkpoint_step"] == t and res.stats["checkpoint_source"] == "summary"
    # one step less reaches no checkpoint: refused, naming the budget
    assert T - t > 1
    with pytest.raises(ValueError, match="^steps"):
        uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=T - t - 1)
    # a budget between two checkpoints rewinds to the later one (the earliest that fits)
    if len(later) > 1:
        res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=T - later[-2] - 1)
        assert res.stats["checkpoint_step"] == later[-1]
    # the whole run from w0 equals retrain here too
    ref = uf.unlearn(model, history, FORGET, data, LOSS, method="retrain")
    res = uf.unlearn(model, history, FORGET, data, LOSS, method="rewind", steps=T)
    assert torch.equal(flat_params(res.model), flat_params(ref.model))
    assert same(snapshot(history), before)


@pytest.mark.parametrize("method", ["finetune", "rewind"])
@pytest.mark.parametrize("bad,name", [({"steps": -1}, "steps"), ({"steps": 2.5}, "steps"), ({"steps": "3"}, "steps"),
                                      ({"steps": True}, "steps"), ({"seconds": -1.0}, "seconds"),
                                      ({"seconds": float("nan")}, "seconds"), ({"seconds": "1"}, "seconds"),
                                      ({"lr": -0.1, "steps": 2}, "lr"), ({"lr": float("inf"), "steps": 2}, "lr")])
def test_bad_budget(full, method, bad, name):
    data, model, history = full
    before = snapshot(history)
    with pytest.raises(ValueError, match=f"^{name}"):
        uf.unlearn(model, history, FORGET, data, LOSS, method=method, **bad)
    assert same(snapshot(history), before)


def test_history_is_never_modified(full):
    data, model, history = full
    before = snapshot(history)
    for method, options in (("finetune", {"steps": 9}), ("rewind", {"steps": 9}), ("rewind", {"steps": history.num_steps})):
        uf.unlearn(model, history, FORGET, data, LOSS, method=method, **options)
    assert same(snapshot(history), before)


def test_rewind_recalibrates_batch_norm_statistics_on_the_retained_samples(monkeypatch):
    """From a later checkpoint rewind starts with step 0's running statistics (the history keeps no later ones); it
    recomputes them at its result from the retained trained samples, so they land near the retrain's instead of
    between step 0's and it (a few replayed steps at momentum 0.1)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(240, 8, generator=gen) * 3 + 5  # statistics far from step 0's (mean 0, variance 1)
    y = (X[:, 0] > 5).long()
    data = torch.utils.data.TensorDataset(X, y)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = uf.HistoryRecorder(model, opt, uf.HistoryPolicy(kind="full"))
    for epoch in range(4):
        order = torch.randperm(240, generator=gen)
        for b in range(0, 240, 24):
            idx = order[b : b + 24]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.record(idx)
            opt.step()
    history = rec.finish(data, torch.nn.functional.cross_entropy)
    forget = torch.arange(0, 240, 9)
    stats_of = lambda m: torch.cat([m[1].running_mean, m[1].running_var])  # noqa: E731
    retrained = uf.unlearn(model, history, forget, data, torch.nn.functional.cross_entropy, method="retrain").model
    result = uf.unlearn(model, history, forget, data, torch.nn.functional.cross_entropy, method="rewind", steps=3)
    assert result.stats["checkpoint_step"] > 0 and result.stats["batch_norm_recalibrated"] == 240 - forget.numel()
    # the recalibrated statistics are the retained samples' own at the result's weights (a plain average over batches)
    keep = torch.ones(240, dtype=torch.bool)
    keep[forget] = False
    with torch.no_grad():
        h = result.model[0](X[keep])
    mean = torch.stack([h[i : i + 256].mean(0) for i in range(0, len(h), 256)]).mean(0)
    assert torch.allclose(result.model[1].running_mean, mean, atol=1e-4)
    # and far closer to the retrain's than step 0's statistics replayed for 3 steps
    gap = lambda s: float((s - stats_of(retrained)).norm() / stats_of(retrained).norm())  # noqa: E731
    monkeypatch.setattr(rewind, "recalibrate_batch_norm", lambda *args: 0)  # what rewind returned before: step 0's, 3 steps on
    with_step0 = uf.unlearn(model, history, forget, data, torch.nn.functional.cross_entropy, method="rewind", steps=3).model
    assert gap(stats_of(result.model)) < 0.5 * gap(stats_of(with_step0))  # measured 0.21 against 0.59
    assert result.model[1].momentum == 0.1  # the module's own settings are back
