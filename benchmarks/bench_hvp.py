"""Benchmarks for issue 5: batched HVPs, the fused softmax-linear Hessian op, batched CG.

    .venv/bin/python benchmarks/bench_hvp.py [--device cpu|cuda] [--repeats 3] [--out benchmarks/results/hvp_cpu]

Every timing is the median over --repeats interleaved runs after one warm-up run (the minimum is
reported too); every fast path is checked against its baseline (max relative difference reported).
Writes <out>.md and <out>.json.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import ops
from unlearn_fast.backends import use_backend
from unlearn_fast.hvp import batched_cg, flat_products, make_problem


def race(cases, repeats, device):
    """{name: (median seconds, result, min seconds)}: one warm-up each, then `repeats` rounds over all
    cases in turn, so load from other processes on a shared machine hits every case alike."""

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    results, times = {}, {name: [] for name in cases}
    for name, fn in cases.items():
        results[name] = fn()  # warm-up; its result is the one checked
        sync()
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name], min(times[name])) for name in cases}


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- MLP hvp
def bench_mlp(device, repeats, k=32, batch=256):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    ).to(device)
    X, y = torch.randn(batch, 256, device=device), torch.randint(0, 10, (batch,), device=device)
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    p = sum(t.numel() for t in params)
    V = torch.randn(k, p, device=device)

    def split(v):
        out, start = [], 0
        for t in params:
            out.append(v[start : start + t.numel()].view_as(t))
            start += t.numel()
        return tuple(out)

    def loss_of(*ps):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (X,)), y)

    def loop_functional_hvp():
        rows = []
        for v in V:
            _, hv = torch.autograd.functional.hvp(loss_of, params, split(v))
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)

    def loop_double_backward():  # the usual single-vector HVP: grad with create_graph, then grad of g.v
        rows = []
        for v in V:
            ps = tuple(t.clone().requires_grad_(True) for t in params)
            g = torch.autograd.grad(loss_of(*ps), ps, create_graph=True)
            hv = torch.autograd.grad(g, ps, grad_outputs=split(v))
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)

    def plain_vmap():  # vmap over a per-vector jvp-of-grad: no explicit sharing
        g = torch.func.grad(lambda ps: loss_of(*ps))
        hv = torch.func.vmap(lambda *v: torch.func.jvp(g, (params,), (v,))[1])(*[t.reshape(k, *q.shape) for t, q in zip(torch.split(V, [q.numel() for q in params], 1), params)])
        return torch.cat([h.reshape(k, -1) for h in hv], 1)

    cases = {
        "loop of torch.autograd.functional.hvp": loop_functional_hvp,
        "loop of double-backward HVP": loop_double_backward,
        "plain vmap(jvp(grad))": plain_vmap,
        "uf.hvp rev-rev (default: 8 vectors per pass)": lambda: uf.hvp(F.cross_entropy, model, V, (X, y), mode="rev-rev"),
        "uf.hvp fwd-rev": lambda: uf.hvp(F.cross_entropy, model, V, (X, y), mode="fwd-rev"),
        "uf.hvp rev-rev chunk_size=None (all 32 in one pass)": lambda: uf.hvp(F.cross_entropy, model, V, (X, y), mode="rev-rev", chunk_size=None),
        "uf.hvp rev-rev data_chunk_size=64": lambda: uf.hvp(F.cross_entropy, model, V, (X, y), mode="rev-rev", data_chunk_size=64),
    }
    timings = race(cases, repeats, device)
    baseline = timings["loop of torch.autograd.functional.hvp"]
    rows = [
        {"case": name, "seconds": s, "min_seconds": s_min, "speedup_vs_loop": baseline[0] / s,
         "max_rel_diff": rel_diff(r, baseline[1])}
        for name, (s, r, s_min) in timings.items()
    ]
    return {"setup": f"MLP 256-1024-512-10 ({p} params), batch {batch}, k = {k}, float32", "rows": rows}


# ----------------------------------------------------------------------------- fused op
def eager_composition(X, W, V):
    """The closed-form product as a plain torch expression, in the input dtype."""
    P = torch.softmax(X @ W.T, dim=1)
    Z = torch.einsum("nd,kcd->knc", X, V)
    PZ = P * Z
    R = PZ - P * PZ.sum(dim=-1, keepdim=True)
    return torch.einsum("knc,nd->kcd", R, X) / X.shape[0]


def eager_composition_onednn(X, W, V):
    """The eager composition with its two large products through oneDNN, as csrc/cpu/gemm.h routes
    the kernel's: how much of the kernel's lead over eager is the GEMM library's (CPU only)."""
    linear = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")  # a b'
    (n, d), (k, c, _) = X.shape, V.shape
    P = torch.softmax(X @ W.T, dim=1).unsqueeze(1)
    Z = linear(X, V.reshape(k * c, d)).view(n, k, c)
    PZ = P * Z
    R = PZ - P * PZ.sum(dim=-1, keepdim=True)
    return linear(R.reshape(n, k * c).T, X.T).view(k, c, d) / n


def bench_fused(device, repeats, n=4096, d=512, c=10, k=32):
    torch.manual_seed(0)
    X, W, V = torch.randn(n, d, device=device), torch.randn(c, d, device=device) / d**0.5, torch.randn(k, c, d, device=device)
    y = torch.randint(0, c, (n,), device=device)

    def loop_autograd():
        loss = lambda w: F.cross_entropy(X @ w.T, y)
        return torch.stack([torch.autograd.functional.hvp(loss, W, v)[1] for v in V])

    def gemms_only():  # the two n x d x (k c) products of the eager composition: its floor, not a method
        return (X @ V.view(k * c, d).T).T @ X

    fast_backend = "cuda" if device == "cuda" else "cpp"
    layer = torch.nn.Linear(d, c, bias=False).to(device)
    with torch.no_grad():
        layer.weight.copy_(W)
    flat_V = V.reshape(k, c * d)
    cases = {
        "loop of torch.autograd.functional.hvp": loop_autograd,
        "eager closed-form composition": lambda: eager_composition(X, W, V),
        "the two full-width GEMMs alone (eager's floor, wrong result)": gemms_only,
        "reference backend (float64 math)": lambda: _with_backend("reference", X, W, V),
        f"{fast_backend} backend": lambda: _with_backend(fast_backend, X, W, V),
        "uf.hvp on the nn.Linear (routed to the op)": lambda: uf.hvp(F.cross_entropy, layer, flat_V, (X, y)).view(k, c, d),
        "uf.hvp on nn.Sequential(that layer) (generic torch.func path)":
            lambda: uf.hvp(F.cross_entropy, torch.nn.Sequential(layer), flat_V, (X, y)).view(k, c, d),
    }
    if device == "cpu":  # attribution: the GEMM library alone, and the kernel without it
        cases["eager closed form, GEMMs through oneDNN"] = lambda: eager_composition_onednn(X, W, V)
        cases["cpp backend, oneDNN off (GEMMs by at::mm)"] = lambda: _with_mkldnn_off("cpp", X, W, V)
    if device == "cuda":
        cases["triton backend"] = lambda: _with_backend("triton", X, W, V)
    times = race(cases, repeats, device)
    loop_s, loop_r, _ = times["loop of torch.autograd.functional.hvp"]
    eager_s = times["eager closed-form composition"][0]
    rows = []
    for name, (seconds, result, min_seconds) in times.items():
        rows.append({
            "case": name, "seconds": seconds, "min_seconds": min_seconds, "speedup_vs_loop": loop_s / seconds,
            "speedup_vs_eager": eager_s / seconds,
            "max_rel_diff": None if name.startswith("the two full-width GEMMs") else rel_diff(result, loop_r),
        })
    return {"setup": f"softmax_linear_hvp n = {n}, d = {d}, c = {c}, k = {k}, float32", "rows": rows}


def _with_backend(name, X, W, V):
    with use_backend(name):
        return ops.softmax_linear_hvp(X, W, V)


def _with_mkldnn_off(name, X, W, V):
    with torch.backends.mkldnn.flags(enabled=False):
        return _with_backend(name, X, W, V)


# ----------------------------------------------------------------------------- batched CG
def bench_cg(device, repeats, k=32, damping=1e-2, tol=1e-6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).to(device)
    X, y = torch.randn(512, 64, device=device), torch.randint(0, 10, (512,), device=device)
    problem = make_problem(F.cross_entropy, model)
    B = torch.randn(k, problem.numel, device=device)
    # Gauss-Newton: PSD for this non-convex model (its Hessian is indefinite); graphs kept across iterations.
    cache = {}
    matvec = lambda M: flat_products(problem, (X, y), M, kind="ggn", cache=cache)
    info = {}

    def batched():
        sol, report = batched_cg(matvec, B, damping, tol, 500)
        info["batched"] = report
        return sol

    def separate():
        sols, iters = [], 0
        for b in B:
            sol, report = batched_cg(matvec, b[None], damping, tol, 500)
            sols.append(sol[0])
            iters += report.iterations
        info["separate_iterations"] = iters
        return torch.stack(sols)

    timings = race({"separate": separate, "batched": batched}, repeats, device)
    (t_sep, x_sep, _), (t_bat, x_bat, _) = timings["separate"], timings["batched"]
    return {
        "setup": f"CG on (G + {damping} I) x = b, G the Gauss-Newton matrix, MLP 64-256-10 ({problem.numel} params), batch 512, k = {k}, tol {tol}, float32",
        "rows": [
            {"case": f"{k} separate CG solves", "seconds": t_sep, "iterations": info["separate_iterations"]},
            {"case": f"batched CG on {k} right-hand sides", "seconds": t_bat, "iterations": info["batched"].iterations,
             "speedup_vs_separate": t_sep / t_bat, "max_rel_diff": rel_diff(x_bat, x_sep), "max_residual": float(info["batched"].residuals.max())},
        ],
    }


def to_markdown(results):
    lines = [f"# HVP benchmarks ({results['device']})", "", f"Command: `{results['command']}`  ", results["machine"], ""]
    for section in ("mlp_hvp", "fused_softmax_linear_hvp", "cg"):
        block = results[section]
        lines += [f"## {block['setup']}", ""]
        keys = [k for k in block["rows"][0] if k != "case"] + sorted({k for r in block["rows"] for k in r} - set(block["rows"][0]))
        lines.append("| case | " + " | ".join(keys) + " |")
        lines.append("|---" * (len(keys) + 1) + "|")
        for row in block["rows"]:
            cells = []
            for key in keys:
                v = row.get(key)
                cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
            lines.append(f"| {row['case']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/hvp_cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "device": args.device,
        "command": " ".join(["python"] + sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average before {tuple(round(x, 2) for x in os.getloadavg())}"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""),
    }
    for key, bench in (("mlp_hvp", bench_mlp), ("fused_softmax_linear_hvp", bench_fused), ("cg", bench_cg)):
        results[key] = bench(args.device, args.repeats)
        print(json.dumps(results[key], indent=1), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(to_markdown(results) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
