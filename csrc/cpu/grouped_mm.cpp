// CPU grouped GEMM over expert-sorted rows: expert e multiplies its contiguous slice of rows by its own
// weight, each product written straight into its slice of one preallocated output.
//
// Why in C++: with many small experts (E=256, tens of rows each) a Python loop spends more time in
// per-call and autograd overhead than in the matmuls, and stitching the pieces back together (cat of the
// outputs, stack of the weight gradients) copies every byte once more. Here each expert is one
// at::mm_out into a view, and the weight gradient is one [E, D, F] tensor written in place.
//
// Threads: with many rows per expert, experts run one after another and each GEMM uses every thread;
// with few rows per expert the GEMMs are too small to thread well, so the experts are split between
// threads instead (contiguous runs of experts holding about equal numbers of rows), each GEMM on one thread.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../moe_ops.h"

namespace moe_sys {
namespace {

// Mean rows per expert below which experts, not GEMMs, are spread over threads. Measured on a 2-core
// AVX-512 VM (64 experts, D x F from 256 x 128 to 1024 x 512, forward + backward): splitting experts was
// 5-40% faster at 16-64 rows per expert and within noise of threaded GEMMs at 256-1024.
constexpr int64_t kRowsPerThreadedGemm = 256;

// Exclusive prefix sum of counts_E: expert e owns rows [offsets[e], offsets[e + 1]).
std::vector<int64_t> row_offsets(const at::Tensor& counts_E, int64_t num_rows, const char* op) {
  TORCH_CHECK(counts_E.dim() == 1 && counts_E.scalar_type() == at::kLong && counts_E.device().is_cpu(),
              "moe_sys.", op, ": counts_E must be a 1-D int64 CPU tensor");
  const auto counts = counts_E.contiguous();
  const int64_t* c = counts.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(counts.numel() + 1, 0);
  for (int64_t e = 0; e < counts.numel(); ++e) {
    TORCH_CHECK(c[e] >= 0, "moe_sys.", op, ": counts_E[", e, "] = ", c[e], " is negative");
    offsets[e + 1] = offsets[e] + c[e];
  }
  TORCH_CHECK(offsets.back() == num_rows, "moe_sys.", op, ": counts_E sums to ", offsets.back(), " but there are ",
              num_rows, " rows");
  return offsets;
}

// Calls fn(e) for every expert, threaded as the header comment says.
template <typename Fn>
void for_each_expert(const std::vector<int64_t>& offsets, const Fn& fn) {
  const int64_t E = static_cast<int64_t>(offsets.size()) - 1, R = offsets.back();
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || E < 2 || R >= kRowsPerThreadedGemm * E) {
    for (int64_t e = 0; e < E; ++e) fn(e);
    return;
  }
  // Thread t takes the experts from the first one starting in its equal share of rows up to the next
  // thread's first, so uneven expert sizes still balance by rows and every expert (empty ones too) runs once.
  std::vector<int64_t> first(threads + 1, E);
  for (int64_t t = 0; t < threads; ++t)
    first[t] = std::lower_bound(offsets.begin(), offsets.end() - 1, R * t / threads) - offsets.begin();
  // Worker threads start without the caller's dispatch state (the autograd exclusion the op runs under),
  // without which at::mm_out on views of a tensor that requires grad refuses to run.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t e = first[t0]; e < first[t1]; ++e) fn(e);
  });
}

void check_operands(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "moe_sys.", op, ": the CPU kernel needs CPU tensors");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "moe_sys.", op, ": ", a_name, " and ", b_name,
              " must share a dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

}  // namespace

at::Tensor grouped_mm_cpu(const at::Tensor& x_RD, const at::Tensor& w_EDF, const at::Tensor& counts_E) {
  check_rows(x_RD, "x_RD");
  check_operands(x_RD, "x_RD", w_EDF, "w_EDF", "grouped_mm");
  TORCH_CHECK(w_EDF.dim() == 3 && w_EDF.size(0) == counts_E.numel() && w_EDF.size(1) == x_RD.size(1),
              "moe_sys.grouped_mm: w_EDF must be [E, D, F] with E = len(counts_E) = ", counts_E.numel(),
              " and D = x_RD.size(1) = ", x_RD.size(1), ", got ", w_EDF.sizes());
  const auto offsets = row_offsets(counts_E, x_RD.size(0), "grouped_mm");
  auto y_RF = at::empty({x_RD.size(0), w_EDF.size(2)}, x_RD.options());
  for_each_expert(offsets, [&](int64_t e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    if (n == 0) return;
    auto out = y_RF.narrow(0, offsets[e], n);
    at::mm_out(out, x_RD.narrow(0, offsets[e], n), w_EDF.select(0, e));
  });
  return y_RF;
}

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& x_RD, const at::Tensor& grad_RF, const at::Tensor& counts_E) {
  check_rows(x_RD, "x_RD");
  check_rows(grad_RF, "grad_RF");
  check_operands(x_RD, "x_RD", grad_RF, "grad_RF", "grouped_mm_wgrad");
  TORCH_CHECK(x_RD.size(0) == grad_RF.size(0), "moe_sys.grouped_mm_wgrad: x_RD has ", x_RD.size(0),
              " rows, grad_RF has ", grad_RF.size(0));
  const auto offsets = row_offsets(counts_E, x_RD.size(0), "grouped_mm_wgrad");
  auto grad_EDF = at::empty({counts_E.numel(), x_RD.size(1), grad_RF.size(1)}, x_RD.options());
  const auto x_DR = x_RD.t();
  for_each_expert(offsets, [&](int64_t e) {
    const int64_t n = offsets[e + 1] - offsets[e];
    auto out = grad_EDF.select(0, e);
    if (n == 0) {
      out.zero_();
    } else {
      at::mm_out(out, x_DR.narrow(1, offsets[e], n), grad_RF.narrow(0, offsets[e], n));
    }
  });
  return grad_EDF;
}

}  // namespace moe_sys

TORCH_LIBRARY_IMPL(moe_sys, CPU, m) {
  m.impl("grouped_mm", &moe_sys::grouped_mm_cpu);
  m.impl("grouped_mm_wgrad", &moe_sys::grouped_mm_wgrad_cpu);
}
