"""Every Triton kernel compiles for sm_90, with no GPU, and quantize's PTX keeps the exact arithmetic.

The interpreted tests check the numbers; this checks what only the compiler sees. compile_sm90.py runs
in a subprocess without TRITON_INTERPRET (Triton reads it at import) and a fresh cache directory.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_kernel_compiles_for_sm90_and_quantize_is_exact(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "compile_sm90.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    failed = {label: status for label, status in results.items() if not label.endswith(" ptx") and status != "ok"}
    assert not failed, failed
    assert len(results) >= 20
    for label, ptx in results.items():
        if label.endswith(" ptx"):
            # Correctly rounded divisions only, and no FMA contraction of x * inv + 0.5 (or + u).
            assert ptx["div_rn"] > 0 and ptx["div_approx"] == 0, (label, ptx)
            assert ptx["fma"] == 0 and ptx["unrounded_mul_add"] == 0, (label, ptx)


def test_every_constexpr_global_equals_itself():
    """At each launch Triton compares, with ==, every global a kernel read against its value at compile
    time; a NaN global never equals itself, so every compiled launch raised (seen on an H200,
    triton 3.6). The interpreter does not make that check, hence this one."""
    import importlib
    import math

    import triton.language as tl

    names = ("codec", "lbfgs", "softmax_linear_hvp")
    for name in names:
        module = importlib.import_module(f"unlearn_fast.kernels.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, tl.constexpr) and isinstance(value.value, float):
                assert not math.isnan(value.value), f"kernels/{name}.py: global {attr} is NaN"
