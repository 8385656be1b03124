// Argument checks and dtype helpers shared by the CPU and CUDA bindings, so both reject the same inputs
// with the same messages.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace moe_sys {

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "moe_sys: ", name, " must be 2-D, got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "moe_sys: ", name,
              " must be float32/float16/bfloat16/float64, got ", dt);
}

inline void check_index(const at::Tensor& dest_row_TK, const at::Tensor& rows, const char* name) {
  TORCH_CHECK(dest_row_TK.dim() == 2 && dest_row_TK.scalar_type() == at::kLong,
              "moe_sys: dest_row_TK must be an int64 [T, K] tensor");
  TORCH_CHECK(dest_row_TK.device() == rows.device(), "moe_sys: dest_row_TK and ", name, " must be on the same device");
}

inline void check_build_index(const at::Tensor& expert_ids_TK, int64_t num_experts, std::optional<int64_t> capacity) {
  TORCH_CHECK(expert_ids_TK.dim() == 2 && expert_ids_TK.scalar_type() == at::kLong,
              "moe_sys.build_index: expert_ids_TK must be an int64 [T, K] tensor");
  TORCH_CHECK(num_experts >= 0, "moe_sys.build_index: num_experts must be >= 0");
  TORCH_CHECK(!capacity || *capacity >= 0, "moe_sys.build_index: capacity must be >= 0");
}

inline void check_permute(const at::Tensor& x_TD, const at::Tensor& dest_row_TK, int64_t num_rows) {
  check_rows(x_TD, "x_TD");
  check_index(dest_row_TK, x_TD, "x_TD");
  TORCH_CHECK(dest_row_TK.size(0) == x_TD.size(0), "moe_sys.permute: dest_row_TK has ", dest_row_TK.size(0),
              " tokens, x_TD has ", x_TD.size(0));
  TORCH_CHECK(num_rows >= 0, "moe_sys.permute: num_rows must be >= 0");
}

inline void check_row_dot(const at::Tensor& a_TD, const at::Tensor& b_RD, const at::Tensor& dest_row_TK) {
  check_rows(a_TD, "a_TD");
  check_rows(b_RD, "b_RD");
  check_index(dest_row_TK, b_RD, "b_RD");
  TORCH_CHECK(a_TD.scalar_type() == b_RD.scalar_type() && a_TD.size(1) == b_RD.size(1),
              "moe_sys.row_dot: a_TD and b_RD must share dtype and row width");
  TORCH_CHECK(dest_row_TK.size(0) == a_TD.size(0), "moe_sys.row_dot: dest_row_TK and a_TD disagree on T");
}

// Weights are read in the accumulation dtype (fp32 for halves), whatever dtype the router produced.
inline at::Tensor opmath_weights(const std::optional<at::Tensor>& weights_TK, const at::Tensor& dest_row_TK,
                                 at::ScalarType value_dtype) {
  if (!weights_TK.has_value()) return at::Tensor();
  TORCH_CHECK(weights_TK->sizes() == dest_row_TK.sizes(), "moe_sys: weights_TK must have the shape of dest_row_TK, got ",
              weights_TK->sizes(), " vs ", dest_row_TK.sizes());
  TORCH_CHECK(weights_TK->device() == dest_row_TK.device(), "moe_sys: weights_TK must be on dest_row_TK's device");
  return weights_TK->to(at::toOpMathType(value_dtype)).contiguous();
}

}  // namespace moe_sys
