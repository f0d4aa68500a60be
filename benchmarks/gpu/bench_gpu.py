"""GPU kernel benchmark: CUDA and Triton kernels against the pure-torch reference and copy bandwidth.

For p = 2^28 float32 values (by default) it times each op's backend function directly (the function
ops.py dispatches to, so the argument checks and the NaN check of the public op are not counted) with
CUDA events, and reports the median, the bandwidth it achieves and its share of the device's own
device-to-device copy bandwidth (out.copy_(x) into a preallocated buffer, bytes read plus written).
Bandwidth counts the bytes the algorithm moves: every input read once and every output written
once per pass; qn_step_ and lbfgs_matvec make two passes (the S'v, Y'v reductions re-read v and the
pairs), so their byte count includes both.

    python benchmarks/gpu/bench_gpu.py --out DIR [--log2p 28] [--m 4] [--reps 20]
    python benchmarks/gpu/bench_gpu.py --replot DIR/NAME.json   # DIR/NAME.png again, no GPU needed

Writes DIR/bench_gpu.md (a markdown table), DIR/bench_gpu.json and DIR/bench_gpu.png (the share of copy
bandwidth per op and backend; needs matplotlib).
"""
import argparse
import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch

import unlearn_fast as uf
from unlearn_fast import reference

backends = importlib.import_module("unlearn_fast.backends")  # the package attribute is a function

PROVIDERS = ("cuda", "triton", "reference")


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for bench_gpu.md, bench_gpu.json and bench_gpu.png")
    parser.add_argument("--replot", metavar="JSON", help="draw NAME.png beside an earlier NAME.json and exit")
    parser.add_argument("--log2p", type=int, default=28, help="vector length p = 2^log2p (float32)")
    parser.add_argument("--m", type=int, default=4, help="curvature pairs for the L-BFGS ops")
    parser.add_argument("--blocksize", type=int, default=256)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions per kernel (reference: a quarter)")
    return parser.parse_args()


def time_ms(fn, reps, warmup=2):
    """Median milliseconds of fn() over reps runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def kernel(provider, op):
    """The plain function of one backend, or None with the reason it is unavailable."""
    fn = backends._function(provider, op)
    return fn, (None if fn is not None else backends._load(provider)[2] or f"{provider} has no {op}")


def quantize_rows(X, blocksize):
    """8-bit row-quantized pairs, the layout qn_step_ takes (reference kernel: no backend involved)."""
    pairs = [reference.quantize_blockwise(row, blocksize, 8, False, 0) for row in X]
    return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])


def cases(p, m, blocksize):
    """(label, op, bytes moved, make_args) with make_args() -> argument tuple for the backend function."""
    dev = "cuda"
    nb = -(-p // blocksize)
    x = torch.randn(p, device=dev)
    codes8, scales8 = reference.quantize_blockwise(x, blocksize, 8, False, 0)
    codes4, scales4 = reference.quantize_blockwise(x, blocksize, 4, False, 0)
    y = torch.randn(p, device=dev)
    S = torch.randn(m, p, device=dev)
    Y = S * 1.5 + 0.05 * torch.randn(m, p, device=dev)
    SS, SY = reference.lbfgs_gram(S[:, : 1 << 20], Y[:, : 1 << 20])
    sigma, Minv = reference.lbfgs_compact_from_gram(SS, SY, False, 1e-3)
    w, w_ref, g_ref, g_extra = (torch.randn(p, device=dev) for _ in range(4))
    Sq, Sq_scales = quantize_rows(S, blocksize)
    Yq, Yq_scales = quantize_rows(Y, blocksize)
    scalars = (1e-3, 1.0, 0.1, 1e-4)
    sb = 4 * nb  # scale bytes
    rows32 = 2 * m * 4 * p
    rows8 = 2 * m * (p + sb)
    return [
        ("quantize 8-bit", "quantize_blockwise", 4 * p + p + sb, lambda: (x, blocksize, 8, False, 0)),
        ("quantize 4-bit", "quantize_blockwise", 4 * p + p // 2 + sb, lambda: (x, blocksize, 4, False, 0)),
        ("quantize 8-bit stochastic", "quantize_blockwise", 4 * p + p + sb, lambda: (x, blocksize, 8, True, 1)),
        ("dequantize 8-bit -> f32", "dequantize_blockwise", p + sb + 4 * p,
         lambda: (codes8, scales8, blocksize, 8, p, torch.float32)),
        ("dequantize 4-bit -> f32", "dequantize_blockwise", p // 2 + sb + 4 * p,
         lambda: (codes4, scales4, blocksize, 4, p, torch.float32)),
        ("dequantize_axpy_ 8-bit f32", "dequantize_axpy_", 8 * p + p + sb, lambda: (y, codes8, scales8, 1e-3, blocksize, 8)),
        ("dequantize_axpy_ 4-bit f32", "dequantize_axpy_", 8 * p + p // 2 + sb,
         lambda: (y, codes4, scales4, 1e-3, blocksize, 4)),
        (f"lbfgs_gram m={m}", "lbfgs_gram", rows32, lambda: (S, Y)),
        # two passes: [Y v; S v] reads V and the pairs, B v reads them again and writes the result
        (f"lbfgs_matvec m={m} k=1", "lbfgs_matvec", 2 * rows32 + 3 * 4 * p, lambda: (S, Y, sigma, Minv, x)),
        # reduction pass: w, w_ref, pairs; update pass: w (read + write), w_ref, g_ref, g_extra, pairs
        (f"qn_step_ m={m}", "qn_step_", (8 * p + rows32) + (20 * p + rows32),
         lambda: (w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *scalars, None, None, blocksize, 8)),
        (f"qn_step_ m={m} 8-bit pairs", "qn_step_", (8 * p + rows8) + (20 * p + rows8),
         lambda: (w, w_ref, g_ref, g_extra, Sq, Yq, sigma, Minv, *scalars, Sq_scales, Yq_scales, blocksize, 8)),
    ]


def copy_bandwidth(p, reps):
    x = torch.randn(p, device="cuda")
    out = torch.empty_like(x)
    ms = time_ms(lambda: out.copy_(x), reps)
    return 2 * 4 * p / (ms * 1e-3) / 1e9, ms


def main():
    args = parse()
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved["meta"], saved["rows"], os.path.splitext(args.replot)[0] + ".png")
        return 0
    if not args.out:
        raise SystemExit("bench_gpu: --out DIR is required (or --replot JSON)")
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing measured")
        return 0
    os.makedirs(args.out, exist_ok=True)
    p = 1 << args.log2p
    copy_gbs, copy_ms = copy_bandwidth(p, args.reps)
    print(f"device-to-device copy of {p} float32: {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s (read + write)", flush=True)
    rows = []
    for label, op, nbytes, make_args in cases(p, args.m, args.blocksize):
        times = {}
        for provider in PROVIDERS:
            fn, why = kernel(provider, op)
            row = {"op": label, "provider": provider, "bytes": nbytes}
            if fn is None:
                row["skipped"] = why
                rows.append(row)
                continue
            reps = args.reps if provider != "reference" else max(3, args.reps // 4)
            try:
                argv = make_args()
                ms = time_ms(lambda: fn(*argv), reps)
            except torch.cuda.OutOfMemoryError as err:
                row["skipped"] = f"out of memory ({str(err).splitlines()[0][:80]})"
                rows.append(row)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            gbs = nbytes / (ms * 1e-3) / 1e9
            times[provider] = ms
            row.update(ms=ms, gbs=gbs, copy_fraction=gbs / copy_gbs)
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
        for row in rows:
            if row["op"] == label and "ms" in row and "reference" in times:
                row["speedup_vs_reference"] = times["reference"] / row["ms"]
        for row in rows[-len(PROVIDERS):]:
            status = row.get("skipped") or (
                f"{row['ms']:.3f} ms  {row['gbs']:.0f} GB/s  {100 * row['copy_fraction']:.0f}% of copy"
                + (f"  {row['speedup_vs_reference']:.1f}x ref" if "speedup_vs_reference" in row else "")
            )
            print(f"{label:32s} {row['provider']:9s} {status}", flush=True)

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "p": p,
        "m": args.m,
        "blocksize": args.blocksize,
        "reps": args.reps,
        "copy_gbs": copy_gbs,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "backends": uf.backends(),
    }
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
        f.write(markdown(meta, rows))
    print(markdown(meta, rows))
    plot(meta, rows, os.path.join(args.out, "bench_gpu.png"))
    return 0


def plot(meta, rows, path):
    """Horizontal bars: each op's share of the copy bandwidth, one bar per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_gpu: matplotlib not installed, no plot")
        return
    ops = list(dict.fromkeys(row["op"] for row in rows))
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(ops) * len(PROVIDERS) / 2 + 1.5))
    height = 0.8 / len(PROVIDERS)
    for k, provider in enumerate(PROVIDERS):
        share = {row["op"]: 100 * row["copy_fraction"] for row in rows if row["provider"] == provider and "ms" in row}
        ys = [i + k * height for i, op in enumerate(ops) if op in share]
        ax.barh(ys, [share[op] for op in ops if op in share], height=height, label=provider)
    ax.set_yticks([i + height for i in range(len(ops))], ops)
    ax.invert_yaxis()
    ax.axvline(100, color="black", lw=0.8)
    ax.set_xlabel(f"% of device-to-device copy bandwidth ({meta['copy_gbs']:.0f} GB/s)")
    ax.set_title(f"{meta['device']}, p = 2^{meta['p'].bit_length() - 1} float32")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version(module):
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def markdown(meta, rows):
    lines = [
        f"# GPU kernels, p = 2^{meta['p'].bit_length() - 1} float32, m = {meta['m']}, blocksize {meta['blocksize']}",
        "",
        f"{meta['device']}; torch {meta['torch']} (CUDA {meta['cuda']}), triton {meta['triton']}, "
        f"Python {meta['python']}; {meta['date_utc']} UTC; `{meta['command']}`.",
        f"Copy bandwidth (out.copy_(x), read + write): {meta['copy_gbs']:.0f} GB/s. Median of CUDA-event timings.",
        "",
        "| op | backend | ms | GB/s | % of copy | vs reference |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['op']} | {row['provider']} | - | - | - | {row['skipped']} |")
            continue
        speed = f"{row['speedup_vs_reference']:.1f}x" if "speedup_vs_reference" in row else "-"
        lines.append(
            f"| {row['op']} | {row['provider']} | {row['ms']:.3f} | {row['gbs']:.0f} | "
            f"{100 * row['copy_fraction']:.0f}% | {speed} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
