"""pytest-benchmark: every op on every CPU backend (C++ and the pure-torch reference).

    .venv/bin/python -m pytest benchmarks/bench_ops.py --benchmark-enable [--benchmark-group-by=param:op]

The size is 2^UNLEARN_FAST_BENCH_LOG2P float32 values (default 2^22, so a run stays short);
benchmarks/ops_speed.py prints the p = 2^24 table with bandwidths.
"""
import os

import pytest
import torch

import unlearn_fast as uf

P = 2 ** int(os.environ.get("UNLEARN_FAST_BENCH_LOG2P", "22"))
M = 8
BLOCKSIZE = 256


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(P, generator=gen)
    codes, scales = uf.quantize_blockwise(x, BLOCKSIZE, 8)
    S = torch.randn(M, P, generator=gen)
    Y = 2 * S + 0.1 * torch.randn(M, P, generator=gen)
    sigma, Minv = uf.lbfgs_compact(S, Y)
    w = torch.randn(P, generator=gen)
    return dict(
        x=x, codes=codes, scales=scales, y=torch.randn(P, generator=gen), S=S, Y=Y, sigma=sigma, Minv=Minv,
        w=w, w_ref=w + 1e-2 * torch.randn(P, generator=gen), g_ref=torch.randn(P, generator=gen),
        g_extra=torch.randn(P, generator=gen), V=torch.randn(P, generator=gen),
        # softmax_linear_hvp at the size (n 4096, d 512, c 10, k 32), not scaled with P
        X=torch.randn(4096, 512, generator=gen), W=torch.randn(10, 512, generator=gen) / 512**0.5,
        Vs=torch.randn(32, 10, 512, generator=gen),
    )


OPS = {
    "quantize_blockwise": lambda d: uf.quantize_blockwise(d["x"], BLOCKSIZE, 8),
    "quantize_blockwise_stochastic": lambda d: uf.quantize_blockwise(d["x"], BLOCKSIZE, 8, True, 1),
    "dequantize_blockwise": lambda d: uf.dequantize_blockwise(d["codes"], d["scales"], BLOCKSIZE, 8, P),
    "dequantize_axpy_": lambda d: uf.dequantize_axpy_(d["y"], d["codes"], d["scales"], 1e-3, BLOCKSIZE, 8),
    "lbfgs_compact": lambda d: uf.lbfgs_compact(d["S"], d["Y"]),
    "lbfgs_matvec": lambda d: uf.lbfgs_matvec(d["S"], d["Y"], d["sigma"], d["Minv"], d["V"]),
    "qn_step_": lambda d: uf.qn_step_(
        d["w"], d["w_ref"], d["g_ref"], d["g_extra"], d["S"], d["Y"], d["sigma"], d["Minv"], 1e-4, 1.0, 0.1, 1e-3
    ),
    "softmax_linear_hvp": lambda d: uf.softmax_linear_hvp(d["X"], d["W"], d["Vs"]),
}


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", list(OPS))
def test_op(benchmark, data, op, backend):
    benchmark.group = op
    with uf.use_backend(backend):
        benchmark(OPS[op], data)
