// Torch glue for the CUDA codec kernels (codec.cu): checks, output allocation, device guard and
// current stream, then one launcher call. Registers quantize_blockwise_cuda,
// dequantize_blockwise_cuda and dequantize_axpy__cuda; arguments as the ops in unlearn_fast/ops.py.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <tuple>

#include "bindings.h"
#include "codec.h"

namespace unlearn_fast::cuda {
namespace {

int launcher_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return UF_FLOAT32;
    case at::kDouble:
      return UF_FLOAT64;
    case at::kBFloat16:
      return UF_BFLOAT16;
    case at::kHalf:
      return UF_FLOAT16;
    default:
      return -1;
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_codec(const char* op, int64_t blocksize, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, op, ": bits must be 4 or 8, got ", bits);
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, op,
              ": blocksize must be a power of two in [32, 4096], got ", blocksize);
}

void check_codes(const char* op, const at::Tensor& codes, const at::Tensor& scales, int64_t blocksize, int64_t bits,
                 int64_t numel, const at::Device& device) {
  check_codec(op, blocksize, bits);
  TORCH_CHECK(numel > 0, op, ": numel must be positive, got ", numel);
  TORCH_CHECK(codes.device() == device && scales.device() == device, op, ": codes and scales must be on ", device);
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte), op,
              ": codes must be int8 (bits=8) or uint8 (bits=4), got ", codes.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous(), op, ": codes and scales must be contiguous");
  TORCH_CHECK(codes.numel() == (bits == 8 ? numel : (numel + 1) / 2), op, ": codes has ", codes.numel(),
              " elements, wrong for ", numel, " values at ", bits, " bits");
  TORCH_CHECK(scales.numel() == (numel + blocksize - 1) / blocksize, op, ": scales has ", scales.numel(),
              " elements, wrong for ", numel, " values in blocks of ", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x, int64_t blocksize, int64_t bits,
                                                           bool stochastic, int64_t seed) {
  const char* op = "quantize_blockwise_cuda";
  check_codec(op, blocksize, bits);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.numel() > 0, op, ": x is empty");
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kHalf, op,
              ": x must be float32, bfloat16 or float16, got ", type);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  auto codes = at::empty({bits == 8 ? n : (n + 1) / 2}, x.options().dtype(bits == 8 ? at::kChar : at::kByte));
  auto scales = at::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(at::kFloat));
  check_launch(uf_quantize_blockwise(x.data_ptr(), launcher_dtype(type), n, blocksize, static_cast<int>(bits),
                                     stochastic, seed, codes.data_ptr(), scales.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream()),
               op);
  return {codes, scales};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& scales, int64_t blocksize,
                                     int64_t bits, int64_t numel, at::ScalarType dtype) {
  const char* op = "dequantize_blockwise_cuda";
  TORCH_CHECK(codes.is_cuda(), op, ": codes must be a CUDA tensor");
  check_codes(op, codes, scales, blocksize, bits, numel, codes.device());
  TORCH_CHECK(launcher_dtype(dtype) >= 0, op, ": dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = at::empty({numel}, codes.options().dtype(dtype));
  check_launch(uf_dequantize_blockwise(codes.data_ptr(), scales.data_ptr<float>(), numel, blocksize,
                                       static_cast<int>(bits), out.data_ptr(), launcher_dtype(dtype),
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

void dequantize_axpy__cuda(at::Tensor& y, const at::Tensor& codes, const at::Tensor& scales, double alpha,
                           int64_t blocksize, int64_t bits) {
  const char* op = "dequantize_axpy__cuda";
  TORCH_CHECK(y.is_cuda(), op, ": y must be a CUDA tensor");
  TORCH_CHECK(y.is_contiguous(), op, ": y must be contiguous (it is updated in place)");
  TORCH_CHECK(launcher_dtype(y.scalar_type()) >= 0, op, ": y must be float32, float64, bfloat16 or float16, got ",
              y.scalar_type());
  check_codes(op, codes, scales, blocksize, bits, y.numel(), y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(uf_dequantize_axpy(y.data_ptr(), launcher_dtype(y.scalar_type()), codes.data_ptr(),
                                  scales.data_ptr<float>(), y.numel(), blocksize, static_cast<int>(bits), alpha,
                                  c10::cuda::getCurrentCUDAStream()),
               op);
}

}  // namespace

void bind_codec(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("quantize_blockwise_cuda", &quantize_blockwise_cuda, "blockwise absmax quantization (CUDA)", release());
  m.def("dequantize_blockwise_cuda", &dequantize_blockwise_cuda, "blockwise dequantization (CUDA)", release());
  m.def("dequantize_axpy__cuda", &dequantize_axpy__cuda, "y += alpha * dequantize(codes) in place (CUDA)",
        release());
}

}  // namespace unlearn_fast::cuda
