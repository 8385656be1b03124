// CPU permute / unpermute / row_dot: rows are independent, so each op is one at::parallel_for over rows.
//
// permute is written as a gather (each output row pulls its source token) rather than a scatter, so every
// output row is written exactly once and padding rows get their zeros in the same pass, with no separate
// zero-fill of the whole buffer. Rows move as whole-row copies: memcpy, or 16-byte vector loads and
// streaming stores for outputs larger than the caches (row_store.h). The weighted and accumulating loops
// are plain loops the compiler vectorises for the ISA the build targets (moe_sys/ops/build.py passes
// AVX2/AVX-512 flags when torch reports that CPU capability).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../moe_ops.h"
#include "row_store.h"

namespace moe_sys {
namespace {

// Elements per parallel task (ATen's own GRAIN_SIZE): small inputs stay on the calling thread.
constexpr int64_t kGrain = 32768;

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)); }

// Index entries per parallel task: the inverse map costs a few ns per slot, so below this a second
// thread (one more fork/join, which a busy machine can stretch to a scheduler tick) costs more than it saves.
constexpr int64_t kIndexGrain = int64_t(1) << 18;

// src_slot_R[r] = the slot s = t * K + k that writes row r, or -1 for rows no slot writes.
at::Tensor source_slots(const at::Tensor& dest_row_TK, int64_t num_rows) {
  auto src_slot_R = at::full({num_rows}, -1, dest_row_TK.options());
  const int64_t* dest = dest_row_TK.const_data_ptr<int64_t>();
  int64_t* src = src_slot_R.mutable_data_ptr<int64_t>();
  at::parallel_for(0, dest_row_TK.numel(), kIndexGrain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r = dest[s];
      TORCH_CHECK(r < num_rows, "moe_sys.permute: destination row ", r, " >= num_rows ", num_rows);
      if (r >= 0) src[r] = s;
    }
  });
  return src_slot_R;
}

template <typename scalar_t>
void permute_rows(const scalar_t* x, const int64_t* src, const at::opmath_type<scalar_t>* w, int64_t K, int64_t D,
                  int64_t R, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row_bytes = D * sizeof(scalar_t);
  const RowStore store(out, row_bytes, R * row_bytes);
  at::parallel_for(0, R, row_grain(D), [&](int64_t r0, int64_t r1) {
    std::vector<scalar_t> scaled(w != nullptr && store.streaming() ? D : 0);
    for (int64_t r = r0; r < r1; ++r) {
      if (r + 1 < r1 && src[r + 1] >= 0) prefetch_row(x + (src[r + 1] / K) * D, row_bytes);
      const int64_t s = src[r];
      scalar_t* o = out + r * D;
      if (s < 0) {
        store.zero(o);
        continue;
      }
      const scalar_t* __restrict__ xs = x + (s / K) * D;
      if (w == nullptr) {
        store.copy(o, xs);
        continue;
      }
      const acc_t ws = w[s];
      scalar_t* __restrict__ dst = store.streaming() ? scaled.data() : o;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(ws * static_cast<acc_t>(xs[d]));
      if (store.streaming()) store.copy(o, dst);
    }
    store.fence();
  });
}

// Sums one token's kept rows into acc (the output row itself for fp32/fp64); false if none is kept.
template <typename scalar_t, typename acc_t>
bool accumulate_token(const scalar_t* y, const int64_t* dest_K, const acc_t* w_K, int64_t K, int64_t D,
                      acc_t* __restrict__ acc) {
  bool any = false;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = dest_K[k];
    if (r < 0) continue;
    const acc_t wk = w_K ? w_K[k] : acc_t(1);
    const scalar_t* __restrict__ yr = y + r * D;
    if (any) {
      for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(yr[d]);
    } else {
      for (int64_t d = 0; d < D; ++d) acc[d] = wk * static_cast<acc_t>(yr[d]);
    }
    any = true;
  }
  return any;
}

template <typename scalar_t>
void combine_rows(const scalar_t* y, const int64_t* dest, const at::opmath_type<scalar_t>* w, int64_t T, int64_t K,
                  int64_t D, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kAccIsOut = std::is_same_v<acc_t, scalar_t>;
  const int64_t row_bytes = D * sizeof(scalar_t);
  const RowStore store(out, row_bytes, T * row_bytes);
  at::parallel_for(0, T, row_grain(D * K), [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(kAccIsOut ? 0 : D);
    std::vector<scalar_t> staged(store.streaming() ? D : 0);  // streaming stores go out a whole row at once
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; t + 1 < t1 && k < K; ++k) {
        const int64_t r = dest[(t + 1) * K + k];
        if (r >= 0) prefetch_row(y + r * D, row_bytes);
      }
      scalar_t* o = out + t * D;
      scalar_t* __restrict__ row = store.streaming() ? staged.data() : o;
      acc_t* a;
      if constexpr (kAccIsOut) a = row; else a = acc.data();
      if (!accumulate_token(y, dest + t * K, w ? w + t * K : nullptr, K, D, a)) {
        store.zero(o);
        continue;
      }
      if constexpr (!kAccIsOut) {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<scalar_t>(a[d]);
      }
      if (store.streaming()) store.copy(o, row);
    }
    store.fence();
  });
}

// dot(a, b) with kLanes independent partial sums: a single running sum is a serial dependency chain
// the compiler may not reorder (no -ffast-math), lanes let it vectorise and stay deterministic.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t dot(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t D) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int j = 0; j < kLanes; ++j) part[j] += static_cast<acc_t>(a[d + j]) * static_cast<acc_t>(b[d + j]);
  }
  acc_t sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += part[j];
  for (; d < D; ++d) sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return sum;
}

template <typename scalar_t>
void dot_rows(const scalar_t* a, const scalar_t* b, const int64_t* dest, int64_t T, int64_t K, int64_t D,
              at::opmath_type<scalar_t>* out) {
  at::parallel_for(0, T, row_grain(D * K), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = dest[t * K + k];
        out[t * K + k] = r < 0 ? 0 : dot(a + t * D, b + r * D, D);
      }
    }
  });
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

at::Tensor permute_cpu(const at::Tensor& x_TD, const at::Tensor& dest_row_TK, int64_t num_rows,
                       const std::optional<at::Tensor>& weights_TK) {
  check_permute(x_TD, dest_row_TK, num_rows);
  const auto x = x_TD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  const auto w = opmath_weights(weights_TK, dest, x.scalar_type());
  const auto src = source_slots(dest, num_rows);
  auto x_RD = at::empty({num_rows, x.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moe_sys_permute", [&] {
    permute_rows<scalar_t>(x.const_data_ptr<scalar_t>(), src.const_data_ptr<int64_t>(),
                           ptr_or_null<at::opmath_type<scalar_t>>(w), dest.size(1), x.size(1), num_rows,
                           x_RD.mutable_data_ptr<scalar_t>());
  });
  return x_RD;
}

at::Tensor unpermute_cpu(const at::Tensor& y_RD, const at::Tensor& dest_row_TK,
                         const std::optional<at::Tensor>& weights_TK) {
  check_rows(y_RD, "y_RD");
  check_index(dest_row_TK, y_RD, "y_RD");
  const auto y = y_RD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  const auto w = opmath_weights(weights_TK, dest, y.scalar_type());
  const int64_t T = dest.size(0), K = dest.size(1), D = y.size(1);
  auto y_TD = at::empty({T, D}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "moe_sys_unpermute", [&] {
    combine_rows<scalar_t>(y.const_data_ptr<scalar_t>(), dest.const_data_ptr<int64_t>(),
                           ptr_or_null<at::opmath_type<scalar_t>>(w), T, K, D, y_TD.mutable_data_ptr<scalar_t>());
  });
  return y_TD;
}

at::Tensor row_dot_cpu(const at::Tensor& a_TD, const at::Tensor& b_RD, const at::Tensor& dest_row_TK) {
  check_row_dot(a_TD, b_RD, dest_row_TK);
  const auto a = a_TD.contiguous();
  const auto b = b_RD.contiguous();
  const auto dest = dest_row_TK.contiguous();
  const int64_t T = dest.size(0), K = dest.size(1), D = a.size(1);
  auto out_TK = at::empty({T, K}, a.options().dtype(at::toOpMathType(a.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "moe_sys_row_dot", [&] {
    dot_rows<scalar_t>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), dest.const_data_ptr<int64_t>(), T,
                       K, D, out_TK.mutable_data_ptr<at::opmath_type<scalar_t>>());
  });
  return out_TK;
}

}  // namespace
}  // namespace moe_sys

TORCH_LIBRARY_IMPL(moe_sys, CPU, m) {
  m.impl("permute", &moe_sys::permute_cpu);
  m.impl("unpermute", &moe_sys::unpermute_cpu);
  m.impl("row_dot", &moe_sys::row_dot_cpu);
}
