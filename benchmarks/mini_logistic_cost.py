"""Mini on the benchmark's logistic-regression runs: training and finish() seconds of a kind="minimal" recording,
Mini's unlearning time against `retrain` and its relative distance to the retrained model, at 10 % and 30 % random
deletion (benchmarks/e2e_workloads.py, decaying lr, 1 torch thread; one run each, so seconds are noisy).

    .venv/bin/python benchmarks/mini_logistic_cost.py DATA BUDGET      (DATA: digits | mnist1d ...; BUDGET: none | vectors)
"""
import sys, time, torch
sys.path.insert(0, "benchmarks")
import e2e_workloads as wl
import unlearn_fast as uf
from unlearn_fast.history import flat_params
torch.set_num_threads(1)
name = sys.argv[1]; budget = None if sys.argv[2] == "none" else int(sys.argv[2])
Xtr, ytr, _, _ = wl.load_data(name)
train_set = torch.utils.data.TensorDataset(Xtr, ytr)
c = int(ytr.max()) + 1
loss = torch.nn.functional.cross_entropy
model = wl.make_model("logistic", Xtr.shape[1], c, 0)
full, t_train, _ = wl.train(model, train_set, wl.Regime(), uf.HistoryPolicy(kind="full"))
model2 = wl.make_model("logistic", Xtr.shape[1], c, 0)
minimal, t_train2, t_finish = wl.train(model2, train_set, wl.Regime(), uf.HistoryPolicy(kind="minimal", budget_vectors=budget))
for ratio in (0.1, 0.3):
    forget = wl.forget_set(len(train_set), ratio, 0)
    s = time.perf_counter(); ref = uf.unlearn(model, full, forget, train_set, loss, method="retrain").model; t_re = time.perf_counter() - s
    s = time.perf_counter()
    try:
        res = uf.unlearn(model2, minimal, forget, train_set, loss, method="mini"); t_mi = time.perf_counter() - s
        d = float((flat_params(res.model) - flat_params(ref)).norm() / (flat_params(model2) - flat_params(ref)).norm())
        print(f"{name} budget={budget} {ratio:.0%}: train {t_train2:.2f}s finish {t_finish:.2f}s | retrain {t_re:.2f}s mini {t_mi:.2f}s ({t_re/t_mi:.1f}x) dist {d:.4f}")
    except Exception as e:
        print(f"{name} budget={budget} {ratio:.0%}: train {t_train2:.2f}s finish {t_finish:.2f}s | refused: {type(e).__name__}: {str(e)[:100]}")
