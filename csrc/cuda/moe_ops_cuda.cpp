// Torch binding of the CUDA kernels: checks, allocation, current stream, TORCH_LIBRARY_IMPL(moe_sys, CUDA).
//
// Built only against a CUDA build of torch (it needs torch's generated CUDA headers); the kernels
// themselves live in the torch-free .cu files behind moe_kernels.h.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../moe_ops.h"
#include "moe_kernels.h"

namespace moe_sys {
namespace {

cuda::Dtype kernel_dtype(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return cuda::Dtype::kFloat32;
    case at::kHalf: return cuda::Dtype::kFloat16;
    case at::kBFloat16: return cuda::Dtype::kBFloat16;
    case at::kDouble: return cuda::Dtype::kFloat64;
    default: TORCH_CHECK(false, "moe_sys: unsupported dtype ", dt);
  }
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> build_index_cuda(const at::Tensor& expert_ids_TK, int64_t num_experts,
                                                    std::optional<int64_t> capacity) {
  TORCH_CHECK(expert_ids_TK.dim() == 2 && expert_ids_TK.scalar_type() == at::kLong,
              "moe_sys.build_index: expert_ids_TK must be an int64 [T, K] tensor");
  TORCH_CHECK(num_experts >= 0, "moe_sys.build_index: num_experts must be >= 0");
  TORCH_CHECK(!capacity || *capacity >= 0, "moe_sys.build_index: capacity must be >= 0");
  const c10::cuda::CUDAGuard guard(expert_ids_TK.device());
  const auto ids = expert_ids_TK.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1);
  auto dest_row_TK = at::empty({T, K}, ids.options());
  auto counts_E = at::empty({num_experts}, ids.options());
  const auto bytes = static_cast<int64_t>(cuda::build_index_workspace_bytes(T, K, num_experts));
  auto workspace = at::empty({bytes}, ids.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::launch_build_index(ids.const_data_ptr<int64_t>(), T, K, num_experts, capacity.value_or(-1),
                                          dest_row_TK.mutable_data_ptr<int64_t>(),
                                          counts_E.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr(),
                                          c10::cuda::getCurrentCUDAStream()));
  return {dest_row_TK, counts_E};
}

at::Tensor permute_cuda(const at::Tensor& x_TD, const at::Tensor& dest_row_TK, int64_t num_rows,
                        const std::optional<at::Tensor>& weights_TK) {
  check_permute(x_TD, dest_row_TK, num_rows);
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const auto x = x_TD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  const auto w = opmath_weights(weights_TK, dest, x.scalar_type());
  auto x_RD = at::empty({num_rows, x.size(1)}, x.options());
  auto src_slot_R = at::empty({num_rows}, dest.options());
  C10_CUDA_CHECK(cuda::launch_permute(x.const_data_ptr(), dest.const_data_ptr<int64_t>(), ptr_or_null(w), dest.size(0),
                                      dest.size(1), x.size(1), num_rows, kernel_dtype(x.scalar_type()),
                                      x_RD.mutable_data_ptr(), src_slot_R.mutable_data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream()));
  return x_RD;
}

at::Tensor unpermute_cuda(const at::Tensor& y_RD, const at::Tensor& dest_row_TK,
                          const std::optional<at::Tensor>& weights_TK) {
  check_rows(y_RD, "y_RD");
  check_index(dest_row_TK, y_RD, "y_RD");
  const c10::cuda::CUDAGuard guard(y_RD.device());
  const auto y = y_RD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  const auto w = opmath_weights(weights_TK, dest, y.scalar_type());
  auto y_TD = at::empty({dest.size(0), y.size(1)}, y.options());
  C10_CUDA_CHECK(cuda::launch_unpermute(y.const_data_ptr(), dest.const_data_ptr<int64_t>(), ptr_or_null(w),
                                        dest.size(0), dest.size(1), y.size(1), kernel_dtype(y.scalar_type()),
                                        y_TD.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return y_TD;
}

at::Tensor row_dot_cuda(const at::Tensor& a_TD, const at::Tensor& b_RD, const at::Tensor& dest_row_TK) {
  check_row_dot(a_TD, b_RD, dest_row_TK);
  const c10::cuda::CUDAGuard guard(a_TD.device());
  const auto a = a_TD.contiguous();
  const auto b = b_RD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  auto out_TK = at::empty(dest.sizes(), a.options().dtype(at::toOpMathType(a.scalar_type())));
  C10_CUDA_CHECK(cuda::launch_row_dot(a.const_data_ptr(), b.const_data_ptr(), dest.const_data_ptr<int64_t>(),
                                      dest.size(0), dest.size(1), a.size(1), kernel_dtype(a.scalar_type()),
                                      out_TK.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()));
  return out_TK;
}

}  // namespace
}  // namespace moe_sys

TORCH_LIBRARY_IMPL(moe_sys, CUDA, m) {
  m.impl("build_index", &moe_sys::build_index_cuda);
  m.impl("permute", &moe_sys::permute_cuda);
  m.impl("unpermute", &moe_sys::unpermute_cuda);
  m.impl("row_dot", &moe_sys::row_dot_cuda);
}
