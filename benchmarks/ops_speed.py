"""C++ CPU kernels against the copy bandwidth and the pure-torch reference, 1 and 2 threads, one run.

Every op is timed at p = 2^log2p float32 values in interleaved rounds: each round times the copy,
every C++ op and the eager float32 torch composition of qn_step_ once per thread count (the thread
counts alternate their order from round to round), and the tables report medians over the rounds.
On a shared machine the load changes from second to second; interleaving puts every thread count
and every op under the same mix of loads, and the '% of copy' column is the median of per-round
ratios (op bandwidth / copy bandwidth measured in the same round and thread count).

Bytes are every read and write of every pass a kernel makes (listed at the bottom of the table);
copy bandwidth is out.copy_(x) into a preallocated buffer, bytes read + written. The pure-torch
reference (float64 math for the L-BFGS ops) is timed separately with few repetitions.
Writes benchmarks/results/ops_speed_cpu.md and .json.

    .venv/bin/python benchmarks/ops_speed.py [--log2p 22] [--m 8] [--rounds 41] [--threads 1,2]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on this shared 2-core machine spinning workers
# made every short parallel region (the reference's small ops, the op's check of the scales) wait
# tens of ms for a time slice. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import unlearn_fast as uf  # noqa: E402
from machine import cpu_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GOALS = {"quantize_blockwise": 4.0, "dequantize_blockwise": 3.0, "dequantize_axpy_": 3.0, "qn_step_": 2.5}
QN_GOAL_PCT_OF_COPY = 50  # issue 14: qn_step_ at >= 50 % of the copy bandwidth on 1 and 2 threads
COEFFS = (1e-4, 1.0, 0.1, 1e-3)  # eta, alpha, beta, lam


def once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def qn_step_eager(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, eta, alpha, beta, lam):
    """qn_step_ as eager float32 torch ops (the baseline of issue 14): the same math, no fusion."""
    m = S.shape[0]
    v = w - w_ref
    sg = float(sigma)
    coef = (Minv @ torch.cat([Y @ v, sg * (S @ v)]).double()).float()
    Bv = sg * v - Y.T @ coef[:m] - sg * (S.T @ coef[m:])
    g = alpha * (Bv + g_ref + lam * w_ref) - beta * (g_extra + lam * w)
    step = eta * g
    w.sub_(step)
    return torch.linalg.vector_norm(step).double()


def cases(p, m):
    """(op, description, bytes read + written over all passes, run, eager run or None), inputs built once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(p, generator=gen)
    codes, scales = uf.quantize_blockwise(x, 256, 8)
    y = torch.randn(p, generator=gen)
    w = torch.randn(p, generator=gen)
    w_ref = w + 1e-2 * torch.randn(p, generator=gen)
    g_ref, g_extra = torch.randn(p, generator=gen), torch.randn(p, generator=gen)
    S = torch.randn(m, p, generator=gen)
    Y = 2 * S + 0.1 * torch.randn(m, p, generator=gen)
    V = torch.randn(p, generator=gen)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    blocks = p // 256
    qn_args = (w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *COEFFS)
    f = 4 * p  # bytes of one float32 vector
    return [
        ("quantize_blockwise", "8-bit, blocksize 256", f + p + 4 * blocks,
         lambda: uf.quantize_blockwise(x, 256, 8), None),
        ("quantize_blockwise", "8-bit stochastic, blocksize 256", f + p + 4 * blocks,
         lambda: uf.quantize_blockwise(x, 256, 8, stochastic=True, seed=1), None),
        ("dequantize_blockwise", "8-bit -> float32", p + 4 * blocks + f,
         lambda: uf.dequantize_blockwise(codes, scales, 256, 8, p, torch.float32), None),
        ("dequantize_axpy_", "8-bit into float32 y", p + 4 * blocks + 2 * f,
         lambda: uf.dequantize_axpy_(y, codes, scales, 1e-3, 256, 8), None),
        # One pass reading S and Y (the 2m x 2m inverse is negligible).
        ("lbfgs_compact", f"m = {m}, float32", 2 * m * f, lambda: uf.lbfgs_compact(S, Y), None),
        # Two passes: S V, Y V (reads V, S, Y); B V (reads S, Y, V, writes the output).
        ("lbfgs_matvec", f"m = {m}, float32, V (p,)", (2 * m + 1) * f + (2 * m + 2) * f,
         lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, V), None),
        # Two passes: S v, Y v reads w, w_ref, S, Y; the fused update reads w, w_ref, g_ref,
        # g_extra, S, Y and writes w.
        ("qn_step_", f"m = {m}, float32", (2 + 2 * m) * f + (4 + 2 * m + 1) * f,
         lambda: uf.qn_step_(*qn_args), lambda: qn_step_eager(*qn_args)),
    ]


def measure(p, args, thread_counts):
    """Interleaved rounds of copy, C++ ops and eager baselines; then cold and reference timings."""
    src, dst = torch.randn(p), torch.empty(p)
    table = cases(p, args.m)
    samples = {t: {"copy": [], "cpp": [[] for _ in table], "eager": [[] for _ in table]} for t in thread_counts}
    with uf.use_backend("cpp"):
        for t in thread_counts:  # warm-up: thread pool, output cache, first touch
            torch.set_num_threads(t)
            dst.copy_(src)
            for _, _, _, run, eager in table:
                run()
                if eager:
                    eager()
        for r in range(args.rounds):
            order = thread_counts if r % 2 == 0 else thread_counts[::-1]
            for t in order:
                torch.set_num_threads(t)
                s = samples[t]
                s["copy"].append(once(lambda: dst.copy_(src)))
                for i, (_, _, _, run, eager) in enumerate(table):
                    s["cpp"][i].append(once(run))
                    if eager:
                        s["eager"][i].append(once(eager))
    del src, dst

    results = []
    for t in thread_counts:
        torch.set_num_threads(t)
        s = samples[t]
        copy_gbs = [2 * 4 * p / c / 1e9 for c in s["copy"]]
        rows = []
        for i, (op, what, nbytes, run, eager) in enumerate(table):
            cpp = s["cpp"][i]
            with uf.use_backend("cpp"):
                cold = []
                for _ in range(3):  # outputs in fresh memory: the C++ codec's cache of output blocks emptied
                    uf.release_output_cache()
                    cold.append(once(run))
            with uf.use_backend("reference"):
                run()
                ref_s = statistics.median(once(run) for _ in range(args.ref_reps))
            cpp_s = statistics.median(cpp)
            row = {
                "op": op, "case": what, "bytes": nbytes, "cpp_ms": cpp_s * 1e3,
                "cpp_ms_quartiles": [q * 1e3 for q in statistics.quantiles(cpp, n=4)],
                "cpp_cold_ms": statistics.median(cold) * 1e3, "reference_ms": ref_s * 1e3,
                "speedup": ref_s / cpp_s, "goal_speedup": GOALS.get(op), "cpp_GBps": nbytes / cpp_s / 1e9,
                # Per round: this op's bandwidth over the copy bandwidth of the same round.
                "pct_of_copy": statistics.median(100 * nbytes / c / g / 1e9 for c, g in zip(cpp, copy_gbs)),
                "cpp_ms_rounds": [c * 1e3 for c in cpp],
            }
            if eager:
                eager_s = statistics.median(s["eager"][i])
                row.update(eager_ms=eager_s * 1e3, speedup_vs_eager=eager_s / cpp_s,
                           eager_ms_rounds=[e * 1e3 for e in s["eager"][i]])
            rows.append(row)
        results.append({
            "threads": t, "copy_GBps": statistics.median(copy_gbs),
            "copy_GBps_quartiles": statistics.quantiles(copy_gbs, n=4),
            "copy_ms_rounds": [c * 1e3 for c in s["copy"]], "rows": rows,
        })
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2p", type=int, default=22)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--ref-reps", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, e.g. 1,2")
    parser.add_argument("--out", default=os.path.join(RESULTS, "ops_speed_cpu"))
    args = parser.parse_args()
    p = 2**args.log2p
    if uf.backends()["backends"]["cpp"] != "available":
        sys.exit(f"C++ backend not available: {uf.backends()['backends']['cpp']}")
    from unlearn_fast import _C

    thread_counts = [int(t) for t in args.threads.split(",")]
    load_before = round(os.getloadavg()[0], 2)
    start = time.time()
    tables = measure(p, args, thread_counts)
    header = {
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs",
        "cpu_model": cpu_model(),
        "python": platform.python_version(), "torch": torch.__version__, "p": p, "m": args.m,
        "command": "python " + " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "rounds": args.rounds, "seconds": round(time.time() - start, 1),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "nice": os.nice(0),  # a negative value: run raised above the other jobs' priority
        "parallel_runtime": _C.parallel_runtime(),
        # The machine is shared: a load above the core count slows every parallel region.
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    lines = [
        f"# C++ CPU kernels: bandwidth against copy, speed against the pure-torch reference, p = 2^{args.log2p} float32",
        "",
        f"- machine: {header['machine']}",
        f"- python {header['python']}, torch {header['torch']}, date {header['date_utc']} UTC, "
        f"kernels' thread runtime: {header['parallel_runtime']}",
        f"- command: `{header['command']}`",
        f"- {args.rounds} interleaved rounds (each times the copy, every C++ op and the eager baseline once "
        f"per thread count; thread counts alternate order): medians over rounds, [quartiles]; "
        f"reference: median of {args.ref_reps} runs after one warm-up. OMP_WAIT_POLICY={header['OMP_WAIT_POLICY']}",
        f"- 1-minute load average before / after: {header['load_average_1min_before_after']} on this "
        f"{os.cpu_count()}-core machine, which other jobs share; the run took {header['seconds']} s "
        f"at nice {header['nice']}",
    ]
    for table in tables:
        cq = table["copy_GBps_quartiles"]
        lines += [
            "",
            f"## {table['threads']} thread(s): copy bandwidth {table['copy_GBps']:.1f} GB/s "
            f"[{cq[0]:.1f}, {cq[2]:.1f}] (out.copy_(x) into a preallocated buffer, bytes read + written)",
            "",
            "| op | case | C++ ms [quartiles] | C++ ms, fresh output memory | reference ms | speed-up (goal) | C++ GB/s | % of copy |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in table["rows"]:
            goal = f" (>= {r['goal_speedup']:g}x)" if r["goal_speedup"] else ""
            q = r["cpp_ms_quartiles"]
            lines.append(
                f"| {r['op']} | {r['case']} | {r['cpp_ms']:.1f} [{q[0]:.1f}, {q[2]:.1f}] | {r['cpp_cold_ms']:.1f} | "
                f"{r['reference_ms']:.1f} | {r['speedup']:.1f}x{goal} | {r['cpp_GBps']:.1f} | {r['pct_of_copy']:.0f}% |"
            )
        for r in table["rows"]:
            if "eager_ms" in r:
                lines += ["", f"{r['op']} ({r['case']}) against the eager float32 torch composition "
                          f"(`qn_step_eager` in this script), same rounds: {r['eager_ms']:.1f} ms, "
                          f"eager time / C++ time = {r['speedup_vs_eager']:.2f}x."]
    qn = {t["threads"]: next(r for r in t["rows"] if r["op"] == "qn_step_") for t in tables}
    lines += ["", "## qn_step_ against the goal (>= " f"{QN_GOAL_PCT_OF_COPY} % of copy bandwidth, every pass counted)", "",
              "| threads | C++ ms | C++ GB/s | copy GB/s | % of copy | met |", "|---:|---:|---:|---:|---:|---|"]
    for t in tables:
        r = qn[t["threads"]]
        lines.append(f"| {t['threads']} | {r['cpp_ms']:.1f} | {r['cpp_GBps']:.1f} | {t['copy_GBps']:.1f} | "
                     f"{r['pct_of_copy']:.0f}% | {'yes' if r['pct_of_copy'] >= QN_GOAL_PCT_OF_COPY else 'NO'} |")
    if len(tables) > 1:
        a, b = tables[0], tables[-1]
        lines += ["", f"Scaling {a['threads']} -> {b['threads']} threads (median time ratio): "
                  + ", ".join(f"{ra['op']} ({ra['case']}) {ra['cpp_ms'] / rb['cpp_ms']:.2f}x"
                              for ra, rb in zip(a["rows"], b["rows"]))
                  + f"; copy {b['copy_GBps'] / a['copy_GBps']:.2f}x."]
    if max(header["load_average_1min_before_after"]) > os.cpu_count():
        lines += ["", f"The load average exceeded the {os.cpu_count()} cores: a second thread finds no free core, so these",
                  "times show the scheduler more than the kernels, and 1 -> 2 thread ratios near 1 say nothing about",
                  "scaling. That every C++ kernel runs on the threads torch is given is tested without timing:",
                  "tests/test_ops.py::test_cpu_kernels_run_on_torch_threads counts the threads of a region."]
    lines += ["", "Bytes counted per op (every read and write of every pass): quantize reads 4p and writes p codes + scales;",
              "dequantize reads p codes + scales and writes 4p; dequantize_axpy_ reads codes, scales and y and writes y;",
              "lbfgs_compact reads S and Y once; lbfgs_matvec reads V, S, Y (reductions) then S, Y, V and writes B V;",
              "qn_step_ reads w, w_ref, S, Y (reductions) then w, w_ref, g_ref, g_extra, S, Y and writes w (fused update):",
              f"4p (4m + 7) bytes, {(4 * args.m + 7) * 4 * p / 1e6:.0f} MB at m = {args.m}.",
              "",
              "Outputs of 8 MiB and more come from a cache of already-written blocks (docs/ops.md), as they do when",
              "a history is replayed; 'fresh output memory' is the median of 3 calls made right after",
              "unlearn_fast.release_output_cache(), so the OS faults in and zeroes the output pages during the call.",
              "Per-round times are in the .json file."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"header": header, "tables": tables}, f, indent=1)


if __name__ == "__main__":
    main()
