"""Mini's batch term (docs/mini_unlearning.md section 13) on one workload: a kind="full" recording, mini.prepare, then
Mini with batch_effect=False and True on the same history, against the exact retrain and DeltaGrad (relative distance,
request seconds; 1 torch thread).

    .venv/bin/python benchmarks/mini_batch_term.py DATA SCHEDULE:MOMENTUM:EPOCHS:LR:BATCH FORGET[,FORGET...]
      DATA: digits | mnist1d | breast_cancer | wine | gen:N:FEATURES:CLASSES (sklearn make_classification, seed 0)
      FORGET: 0.1, 0.3 (random) or f0.3 (label-flipped)
    e.g. benchmarks/mini_batch_term.py gen:50000:50:10 decay:0:10:0.1:64 0.1,0.3,f0.3
"""
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch; torch.set_num_threads(1)
import unlearn_fast as uf, e2e_workloads as wl
from unlearn_fast.methods import mini
from sklearn.datasets import make_classification
LOSS = torch.nn.functional.cross_entropy
def flat(m): return torch.cat([p.detach().reshape(-1) for p in m.parameters()])
spec, regname = sys.argv[1], sys.argv[2]
if spec.startswith("gen"):
    _, n, d, c = spec.split(":"); n, d, c = int(n), int(d), int(c)
    X, y = make_classification(n_samples=n, n_features=d, n_informative=min(30, d), n_classes=c, n_clusters_per_class=2, flip_y=0.05, random_state=0)
    X = torch.tensor(X, dtype=torch.float32); X = (X - X.mean(0)) / X.std(0); y = torch.tensor(y)
else:
    X, y, _, _ = wl.load_data(spec); n, d, c = len(X), X.shape[1], int(y.max()) + 1
sched, mom, ep, lr, bs = regname.split(":")
R = wl.Regime(schedule=sched, momentum=float(mom), epochs=int(ep), lr=float(lr), lr_min=float(lr) / 100, batch_size=int(bs))
for rspec in sys.argv[3].split(","):
    flip = rspec.startswith("f"); ratio = float(rspec.lstrip("f"))
    forget = wl.forget_set(n, ratio, 0)
    ts = torch.utils.data.TensorDataset(X, wl.flip_labels(y, forget, c) if flip else y)
    orig = wl.make_model("logistic", d, c, 0)
    hf, tt, _ = wl.train(orig, ts, R, uf.HistoryPolicy(kind="full"), 0, "logistic")
    mini.prepare(hf, orig, ts, LOSS)
    rr = uf.unlearn(orig, hf, forget, ts, LOSS, method="retrain"); wr = flat(rr.model); w0 = flat(orig); gap = float((w0 - wr).norm())
    dg = uf.unlearn(orig, hf, forget, ts, LOSS, method="deltagrad")
    out = [f"{spec} {regname} {rspec}: T {hf.num_steps} retrain {rr.seconds:.2f}s DG {float((flat(dg.model)-wr).norm())/gap:.3f} ({dg.seconds:.2f}s)"]
    for name in ("mini", "batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                t = time.perf_counter(); res = uf.unlearn(orig, hf, forget, ts, LOSS, method="mini", batch_effect=name != "mini"); tm = time.perf_counter() - t
                st = res.stats
                out.append(f"{name} {float((flat(res.model)-wr).norm())/gap:.3f} ({tm:.2f}s, noise {st.get('sgd_noise_estimate', 0):.2f}, chk {st['retained_gradient_ratio']:.2f}, shift {st.get('batch_shift', 0):.2f})")
            except Exception as e:
                out.append(f"{name} refused: {str(e)[:90]}")
    print(" | ".join(out), flush=True)
