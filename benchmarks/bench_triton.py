"""Per-kernel benchmark of the Triton backend against the other providers on one CUDA GPU.

For each op it times the Triton kernels, the pure-torch reference and (when the extension was built
with CUDA) the CUDA kernels through the public ops with the backend forced, and reports the time and
the bandwidth it achieves against the device's own copy bandwidth (dst.copy_(src), bytes read plus
written). Bandwidth counts the bytes an op must move at least: each input read once, each output
written once. Triton timings on CPU under TRITON_INTERPRET=1 mean nothing, so on a machine without a
CUDA device this script says so and exits 0.

    python benchmarks/bench_triton.py [--p 16777216] [--m 8] [--json results.json]
"""
import argparse
import json
import sys

import torch


def _parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=int, default=1 << 24, help="vector length (parameters)")
    parser.add_argument("--m", type=int, default=8, help="curvature pairs for lbfgs_matvec and qn_step_")
    parser.add_argument("--blocksize", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    return parser.parse_args()


def _cases(p, m, blocksize):
    """(name, bytes moved at least, {provider-independent call})."""
    import unlearn_fast as uf

    dev = "cuda"
    x = torch.randn(p, device=dev)
    nblocks = -(-p // blocksize)
    codes8, scales8 = uf.quantize_blockwise(x, blocksize, 8)
    codes4, scales4 = uf.quantize_blockwise(x, blocksize, 4)
    y = torch.randn(p, device=dev)
    S = torch.randn(m, p, device=dev)
    Y = S * (0.5 + torch.rand(p, device=dev)) + 0.05 * torch.randn(m, p, device=dev)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    w, w_ref, g_ref, g_extra = (torch.randn(p, device=dev) for _ in range(4))
    Sq, Sq_scales = uf.quantize_rows(S, blocksize, 8)
    Yq, Yq_scales = uf.quantize_rows(Y, blocksize, 8)
    scalars = (1e-3, 1.0, 0.1, 1e-4)
    scale_bytes = 4 * nblocks
    return [
        ("quantize 8-bit", 4 * p + p + scale_bytes, lambda: uf.quantize_blockwise(x, blocksize, 8)),
        ("quantize 4-bit", 4 * p + p // 2 + scale_bytes, lambda: uf.quantize_blockwise(x, blocksize, 4)),
        ("quantize 8-bit stochastic", 4 * p + p + scale_bytes, lambda: uf.quantize_blockwise(x, blocksize, 8, True, 1)),
        ("dequantize 8-bit", p + scale_bytes + 4 * p, lambda: uf.dequantize_blockwise(codes8, scales8, blocksize, 8, p)),
        ("dequantize 4-bit", p // 2 + scale_bytes + 4 * p, lambda: uf.dequantize_blockwise(codes4, scales4, blocksize, 4, p)),
        ("dequantize_axpy_ 8-bit", 8 * p + p + scale_bytes, lambda: uf.dequantize_axpy_(y, codes8, scales8, 1e-3, blocksize, 8)),
        (f"lbfgs_compact m={m}", 8 * m * p, lambda: uf.lbfgs_compact(S, Y)),
        (f"lbfgs_matvec m={m}", 8 * m * p + 8 * p, lambda: uf.lbfgs_matvec(S, Y, sigma, Minv, x)),
        (f"qn_step_ m={m}", 8 * m * p + 20 * p, lambda: uf.qn_step_(w, w_ref, g_ref, g_extra, S, Y, sigma, Minv, *scalars)),
        (
            f"qn_step_ m={m} 8-bit pairs",
            2 * m * (p + scale_bytes) + 20 * p,
            lambda: uf.qn_step_(w, w_ref, g_ref, g_extra, Sq, Yq, sigma, Minv, *scalars, Sq_scales, Yq_scales, blocksize, 8),
        ),
    ]


def main():
    args = _parse()
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device here; Triton kernels only run interpreted on CPU, where timings "
              "mean nothing. Run this on a GPU machine (see benchmarks/gpu/). Nothing measured.")
        return 0
    import triton.testing

    import unlearn_fast as uf

    info = uf.backends()
    providers = [name for name in ("triton", "cuda", "reference") if info["backends"][name] == "available"]
    src = torch.empty(args.p, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src))
    copy_gbs = 8 * args.p / copy_ms / 1e6
    rows = []
    print(f"{torch.cuda.get_device_name()}  p = {args.p}  m = {args.m}  blocksize = {args.blocksize}  "
          f"torch {torch.__version__}  triton {triton.__version__}")
    print(f"device copy (dst.copy_(src), read + write): {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s")
    print(f"{'op':32s} {'provider':10s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s} {'vs reference':>12s}")
    for name, nbytes, call in _cases(args.p, args.m, args.blocksize):
        times = {}
        for provider in providers:
            try:
                with uf.use_backend(provider):
                    times[provider] = triton.testing.do_bench(call)
            except RuntimeError as err:  # a backend without this op
                print(f"{name:32s} {provider:10s} n/a ({err})")
        for provider, ms in times.items():
            gbs = nbytes / ms / 1e6
            speedup = times["reference"] / ms if "reference" in times else float("nan")
            rows.append(dict(op=name, provider=provider, ms=ms, gbs=gbs, copy_fraction=gbs / copy_gbs, vs_reference=speedup))
            print(f"{name:32s} {provider:10s} {ms:9.3f} {gbs:8.0f} {100 * gbs / copy_gbs:6.0f}% {speedup:11.1f}x")
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    p=args.p, m=args.m, blocksize=args.blocksize, copy_ms=copy_ms, copy_gbs=copy_gbs,
                    command=" ".join(sys.argv))
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
