"""C++ CPU kernels against the pure-torch reference, in one run, at p = 2^24 float32.

For each op: median wall time of the C++ kernel and of the reference, the speed-up, and the
achieved bandwidth (bytes the kernel must read + write, listed per op) against the machine's copy
bandwidth, measured here as out.copy_(x) into a preallocated buffer (bytes read + written).
Writes benchmarks/results/ops_speed_cpu.md and .json.

    .venv/bin/python benchmarks/ops_speed.py [--log2p 24] [--reps 7] [--threads 1,2]
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
from unlearn_fast.cli import median_seconds  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GOALS = {"quantize_blockwise": 4.0, "dequantize_blockwise": 3.0, "dequantize_axpy_": 3.0, "qn_step_": 2.5}


def median_cold_seconds(fn, reps):
    """Calls whose outputs land in fresh memory: the C++ codec's cache of output blocks is emptied first."""
    times = []
    for _ in range(reps):
        uf.release_output_cache()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cases(p, m):
    """(op, description, bytes read + written, run(), backends) with inputs built once."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(p, generator=gen)
    codes, scales = uf.quantize_blockwise(x, 256, 8)
    y = torch.randn(p, generator=gen)
    w = torch.randn(p, generator=gen)
    w_ref = w + 1e-2 * torch.randn(p, generator=gen)
    g_ref, g_extra = torch.randn(p, generator=gen), torch.randn(p, generator=gen)
    S = torch.randn(m, p, generator=gen)
    Y = 2 * S + 0.1 * torch.randn(m, p, generator=gen)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    blocks = p // 256
    return [
        ("quantize_blockwise", "8-bit, blocksize 256", 4 * p + p + 4 * blocks,
         lambda: uf.quantize_blockwise(x, 256, 8)),
        ("quantize_blockwise", "8-bit stochastic, blocksize 256", 4 * p + p + 4 * blocks,
         lambda: uf.quantize_blockwise(x, 256, 8, stochastic=True, seed=1)),
        ("dequantize_blockwise", "8-bit -> float32", p + 4 * blocks + 4 * p,
         lambda: uf.dequantize_blockwise(codes, scales, 256, 8, p, torch.float32)),
        ("dequantize_axpy_", "8-bit into float32 y", p + 4 * blocks + 2 * 4 * p,
         lambda: uf.dequantize_axpy_(y, codes, scales, 1e-3, 256, 8)),
        # Two passes: S'v, Y'v reads w, w_ref, S, Y; the fused update reads w, w_ref, g_ref,
        # g_extra, S, Y and writes w.
        ("qn_step_", f"m = {m}, float32", 4 * p * ((2 + 2 * m) + (4 + 2 * m + 1)),
         lambda: uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, 1e-4, 1.0, 0.1, 1e-3)),
    ]


def measure(p, args, threads):
    """Copy bandwidth and every case, C++ then reference, at the current torch thread count."""
    src, dst = torch.randn(p), torch.empty(p)
    copy_s = median_seconds(lambda: dst.copy_(src), args.reps)
    copy_gbs = 2 * 4 * p / copy_s / 1e9
    del src, dst
    rows = []
    for op, what, nbytes, run in cases(p, args.m):
        with uf.use_backend("cpp"):
            cpp_s = median_seconds(run, args.reps)
            cold_s = median_cold_seconds(run, 3)
        with uf.use_backend("reference"):
            ref_s = median_seconds(run, args.ref_reps)
        gbs = nbytes / cpp_s / 1e9
        rows.append({
            "op": op, "case": what, "bytes": nbytes, "cpp_ms": cpp_s * 1e3, "cpp_cold_ms": cold_s * 1e3, "reference_ms": ref_s * 1e3,
            "speedup": ref_s / cpp_s, "goal_speedup": GOALS.get(op), "cpp_GBps": gbs,
            "pct_of_copy": 100 * gbs / copy_gbs,
        })
    return {"threads": threads, "copy_GBps": copy_gbs, "copy_ms": copy_s * 1e3, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2p", type=int, default=24)
    parser.add_argument("--m", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ref-reps", type=int, default=3)
    parser.add_argument("--threads", default="2", help="comma-separated torch thread counts, e.g. 1,2")
    parser.add_argument("--out", default=os.path.join(RESULTS, "ops_speed_cpu"))
    args = parser.parse_args()
    p = 2**args.log2p
    if uf.backends()["backends"]["cpp"] != "available":
        sys.exit(f"C++ backend not available: {uf.backends()['backends']['cpp']}")

    load_before = round(os.getloadavg()[0], 2)
    tables = []
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        tables.append(measure(p, args, threads))

    header = {
        "machine": f"{cpu_name()}, {os.cpu_count()} logical CPUs",
        "python": platform.python_version(), "torch": torch.__version__, "p": p,
        "command": "python " + " ".join(sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        # The machine is shared: a load above the core count slows every parallel region.
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
    }
    lines = [
        f"# C++ CPU kernels vs pure-torch reference, p = 2^{args.log2p} float32",
        "",
        f"- machine: {header['machine']}",
        f"- python {header['python']}, torch {header['torch']}, date {header['date_utc']} UTC",
        f"- command: `{header['command']}`",
        f"- median of {args.reps} runs (C++) and {args.ref_reps} runs (reference) after one warm-up; "
        f"OMP_WAIT_POLICY={header['OMP_WAIT_POLICY']}",
        f"- 1-minute load average before / after: {header['load_average_1min_before_after']} "
        f"(other jobs share this {os.cpu_count()}-core machine)",
    ]
    for table in tables:
        lines += [
            "",
            f"## {table['threads']} thread(s): copy bandwidth {table['copy_GBps']:.1f} GB/s "
            "(out.copy_(x) into a preallocated buffer, bytes read + written)",
            "",
            "| op | case | C++ ms | C++ ms, fresh output memory | reference ms | speed-up (goal) | C++ GB/s | % of copy |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in table["rows"]:
            goal = f" (>= {r['goal_speedup']:g}x)" if r["goal_speedup"] else ""
            lines.append(
                f"| {r['op']} | {r['case']} | {r['cpp_ms']:.1f} | {r['cpp_cold_ms']:.1f} | {r['reference_ms']:.1f} | "
                f"{r['speedup']:.1f}x{goal} | {r['cpp_GBps']:.1f} | {r['pct_of_copy']:.0f}% |"
            )
    lines += ["", "Bytes counted per op: quantize reads 4p and writes p codes + scales; dequantize reads p codes",
              "+ scales and writes 4p; dequantize_axpy_ reads codes, scales and y and writes y; qn_step_ counts",
              "both passes (reduction: w, w_ref, S, Y; fused update: w, w_ref, g_ref, g_extra, S, Y read, w written).",
              "",
              "Outputs of 8 MiB and more come from a cache of already-written blocks (docs/ops.md), as they do when",
              "a history is replayed; 'fresh output memory' is the median of 3 calls made right after",
              "unlearn_fast.release_output_cache(), so the OS faults in and zeroes the output pages during the call."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"header": header, "tables": tables}, f, indent=1)


if __name__ == "__main__":
    main()
