"""Compile every Triton kernel of unlearn_fast.kernels for sm_90, with no GPU needed.

The interpreter does not run Triton's compiler, so an error that only the compiler sees (a
non-constexpr global, an unsupported cast or reduction) would first surface on a GPU. This script
runs Triton's full pipeline down to a cubin (Triton ships ptxas) and prints one JSON object: for
each kernel variant, "ok" or the error, and for the quantize kernel the PTX facts that exactness
depends on (correctly rounded division, no fused multiply-add). It must run WITHOUT
TRITON_INTERPRET=1; tests/triton/test_triton_compile.py runs it in a subprocess.
"""
import importlib
import json
import os
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET") != "1", "compile_sm90.py compiles kernels: run it without TRITON_INTERPRET=1"

from unlearn_fast.kernels import codec, lbfgs  # noqa: E402  (after the check above)

hvp_kernels = importlib.import_module("unlearn_fast.kernels.softmax_linear_hvp")  # the package re-exports a function of that name

TARGET = GPUTarget("cuda", 90, 32)


def _signature(names, types):
    return {name: types.get(name, "constexpr") for name in names}


def _variants():
    """(label, kernel, signature, constexprs, options) for each kernel's distinct code paths."""
    quant_args = ["x_ptr", "codes_ptr", "scales_ptr", "numel", "nblocks", "seed_mixed"]
    quant_params = quant_args + ["BLOCKSIZE", "ROWS", "QMAX", "PACKED", "STOCHASTIC"]
    for bits, stochastic, x_type in ((8, False, "*fp32"), (4, True, "*bf16"), (8, True, "*fp16")):
        types = dict(x_ptr=x_type, codes_ptr="*i8" if bits == 8 else "*u8", scales_ptr="*fp32", numel="i64", nblocks="i32", seed_mixed="i32")
        const = dict(BLOCKSIZE=256, ROWS=16, QMAX=reference_qmax(bits), PACKED=bits == 4, STOCHASTIC=stochastic)
        yield f"quantize bits={bits} stochastic={stochastic}", codec._quantize_kernel, _signature(quant_params, types), const, dict(enable_fp_fusion=False, num_warps=8)

    for out_type, packed in (("*bf16", True), ("*fp64", False)):
        codes = "*u8" if packed else "*i8"
        const = dict(BLOCKSIZE=256, PACKED=packed, TILE=codec.DEQUANT_TILE, BF16=out_type == "*bf16")
        names = ["codes_ptr", "scales_ptr", "out_ptr", "numel", "BLOCKSIZE", "PACKED", "TILE", "BF16"]
        types = dict(codes_ptr=codes, scales_ptr="*fp32", out_ptr=out_type, numel="i64")
        yield f"dequantize out={out_type}", codec._dequantize_kernel, _signature(names, types), const, dict(num_warps=8)
        names = ["y_ptr", "codes_ptr", "scales_ptr", "alpha_ptr", "numel", "BLOCKSIZE", "PACKED", "TILE", "BF16"]
        types = dict(y_ptr=out_type, codes_ptr=codes, scales_ptr="*fp32", alpha_ptr="*fp64" if out_type == "*fp64" else "*fp32", numel="i64")
        yield f"dequantize_axpy_ y={out_type}", codec._dequantize_axpy_kernel, _signature(names, types), const, dict(num_warps=8)

    for dtype in ("*fp32", "*fp64"):
        names = ["S_ptr", "Y_ptr", "partial_ptr", "m", "p", "chunk", "MP", "TILE"]
        types = dict(S_ptr=dtype, Y_ptr=dtype, partial_ptr="*fp64", m="i32", p="i32", chunk="i32")
        yield f"gram {dtype}", lbfgs._gram_kernel, _signature(names, types), dict(MP=8, TILE=lbfgs._reduce_tile(8, 8)), {}

        names = ["S_ptr", "Y_ptr", "V_ptr", "partial_ptr", "m", "p", "k", "chunk", "MP", "TILE", "KB"]
        types = dict(S_ptr=dtype, Y_ptr=dtype, V_ptr=dtype, partial_ptr="*fp64", m="i32", p="i32", k="i32", chunk="i32")
        const = dict(MP=4, TILE=lbfgs._reduce_tile(4, 16), KB=16)
        yield f"matvec project {dtype}", lbfgs._project_kernel, _signature(names, types), const, dict(num_warps=lbfgs.NUM_WARPS)
        names = ["S_ptr", "Y_ptr", "V_ptr", "coef_ptr", "sigma_ptr", "out_ptr", "m", "p", "k", "TILE", "KB"]
        types = dict(S_ptr=dtype, Y_ptr=dtype, V_ptr=dtype, coef_ptr="*fp64", sigma_ptr="*fp64", out_ptr=dtype, m="i32", p="i32", k="i32")
        yield f"matvec update {dtype}", lbfgs._matvec_update_kernel, _signature(names, types), dict(TILE=64, KB=16), dict(num_warps=lbfgs.NUM_WARPS)

    for quantized, packed in ((False, False), (True, False), (True, True)):
        pairs = ("*u8" if packed else "*i8") if quantized else "*fp32"
        flags = dict(QUANTIZED=quantized, PACKED=packed, BLOCKSIZE=256 if quantized else 1)
        common = dict(S_ptr=pairs, Y_ptr=pairs, S_scales_ptr="*fp32", Y_scales_ptr="*fp32", m="i32", p="i32", row_stride="i32", nblocks="i32")
        names = ["w_ptr", "w_ref_ptr", "S_ptr", "Y_ptr", "S_scales_ptr", "Y_scales_ptr", "partial_ptr", "m", "p", "row_stride",
                 "nblocks", "chunk", "MP", "TILE", "QUANTIZED", "PACKED", "BLOCKSIZE"]
        types = dict(common, w_ptr="*fp32", w_ref_ptr="*fp32", partial_ptr="*fp64", chunk="i32")
        const = dict(flags, MP=8, TILE=lbfgs._reduce_tile(8))
        yield f"qn project quantized={quantized} packed={packed}", lbfgs._qn_project_kernel, _signature(names, types), const, dict(num_warps=lbfgs.NUM_WARPS)
        names = ["w_ptr", "w_ref_ptr", "g_ref_ptr", "g_extra_ptr", "S_ptr", "Y_ptr", "S_scales_ptr", "Y_scales_ptr", "coef_ptr",
                 "square_ptr", "m", "p", "row_stride", "nblocks", "TILE", "QUANTIZED", "PACKED", "BLOCKSIZE"]
        types = dict(common, w_ptr="*fp64", w_ref_ptr="*fp64", g_ref_ptr="*fp64", g_extra_ptr="*fp64", coef_ptr="*fp64", square_ptr="*fp64")
        const = dict(flags, TILE=lbfgs.UPDATE_TILE)
        yield f"qn update quantized={quantized} packed={packed}", lbfgs._qn_update_kernel, _signature(names, types), const, dict(num_warps=lbfgs.NUM_WARPS)

    for dtype, acc in (("*fp32", "fp32"), ("*fp64", "fp64")):
        acc_type = tl.float32 if acc == "fp32" else tl.float64
        names = ["x_ptr", "w_ptr", "v_ptr", "r_ptr", "inv_n_ptr", "n", "d", "c", "k", "BLOCK_N", "BLOCK_C", "BLOCK_D", "ACC"]
        types = dict(x_ptr=dtype, w_ptr=dtype, v_ptr=dtype, r_ptr=dtype, inv_n_ptr=dtype, n="i32", d="i32", c="i32", k="i32")
        const = dict(BLOCK_N=hvp_kernels.ROWS_BLOCK_N, BLOCK_C=16, BLOCK_D=hvp_kernels.BLOCK_D, ACC=acc_type)
        yield f"softmax-linear rows {dtype}", hvp_kernels._rows_kernel, _signature(names, types), const, {}
        names = ["r_ptr", "x_ptr", "out_ptr", "n", "d", "kc", "BLOCK_N", "BLOCK_KC", "BLOCK_D", "ACC"]
        types = dict(r_ptr=dtype, x_ptr=dtype, out_ptr=dtype, n="i32", d="i32", kc="i32")
        const = dict(BLOCK_N=hvp_kernels.OUTER_BLOCK_N, BLOCK_KC=hvp_kernels.BLOCK_KC, BLOCK_D=hvp_kernels.BLOCK_D, ACC=acc_type)
        yield f"softmax-linear outer {dtype}", hvp_kernels._outer_kernel, _signature(names, types), const, {}


def reference_qmax(bits):
    from unlearn_fast import reference

    return reference.QMAX[bits]


def main():
    results = {}
    for label, kernel, signature, constexprs, options in _variants():
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options)
        except Exception as err:  # report every failing variant, not only the first
            results[label] = f"{type(err).__name__}: {err}"[:2000]
            continue
        results[label] = "ok"
        if label.startswith("quantize"):
            ptx = compiled.asm["ptx"]
            results[label + " ptx"] = dict(
                div_rn=len(re.findall(r"div\.rn\.f32", ptx)),
                div_approx=len(re.findall(r"div\.(?:full|approx)\.f32", ptx)),
                fma=len(re.findall(r"\bfma\.", ptx)),
                # mul/add without .rn may still be contracted into an FMA by ptxas.
                unrounded_mul_add=len(re.findall(r"\b(?:mul|add|sub)\.f32\b", ptx)),
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
