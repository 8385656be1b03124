// CPU routing index: per-expert histogram, prefix sum, and each slot's stable position, without a sort.
//
// Slots are visited in slot-major order s = k * T + t (all first choices before second choices, earlier
// tokens first), which is the capacity drop priority. The slots are split into one contiguous chunk per
// thread: pass 1 counts experts per chunk, a scan over chunks gives each (chunk, expert) its first
// position, pass 2 hands out positions within the chunk in order, so the result equals a stable sort.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../moe_ops.h"

namespace moe_sys {
namespace {

// Below this many slots per thread the histogram pass costs less than waking another thread (a fork/join
// that a busy machine can stretch to a scheduler tick).
constexpr int64_t kMinSlotsPerChunk = int64_t(1) << 16;

// Calls fn(t, k) for slots s in [s0, s1) of the slot-major order, without a division per slot.
template <typename Fn>
void for_each_slot(int64_t s0, int64_t s1, int64_t T, Fn&& fn) {
  if (s0 >= s1) return;  // also keeps T == 0 away from the division
  int64_t k = s0 / T, t = s0 % T;
  for (int64_t s = s0; s < s1; ++s) {
    fn(t, k);
    if (++t == T) { t = 0; ++k; }
  }
}

std::tuple<at::Tensor, at::Tensor> build_index_cpu(const at::Tensor& expert_ids_TK, int64_t num_experts,
                                                   std::optional<int64_t> capacity) {
  check_build_index(expert_ids_TK, num_experts, capacity);
  const auto ids_TK = expert_ids_TK.contiguous();
  const int64_t T = ids_TK.size(0), K = ids_TK.size(1), E = num_experts, N = T * K;
  const int64_t chunks = std::clamp<int64_t>(N / kMinSlotsPerChunk, 1, at::get_num_threads());
  auto chunk_start = [&](int64_t c) { return N * c / chunks; };

  const int64_t* ids = ids_TK.const_data_ptr<int64_t>();
  auto pos_CE = at::zeros({chunks, E}, ids_TK.options());  // histogram, then first position per chunk
  int64_t* pos = pos_CE.mutable_data_ptr<int64_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* hist = pos + c * E;
      for_each_slot(chunk_start(c), chunk_start(c + 1), T, [&](int64_t t, int64_t k) {
        const int64_t e = ids[t * K + k];
        TORCH_CHECK(e < E, "moe_sys.build_index: expert id ", e, " >= num_experts ", E);
        if (e >= 0) ++hist[e];
      });
    }
  });

  // Exclusive scan over chunks per expert: pos[c, e] becomes the position of chunk c's first slot of e.
  auto counts_E = at::empty({E}, ids_TK.options());
  int64_t* counts = counts_E.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offsets(E);  // dropless: first row of each expert
  for (int64_t e = 0, row = 0; e < E; ++e) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = pos[c * E + e];
      pos[c * E + e] = total;
      total += n;
    }
    offsets[e] = row;
    row += total;
    counts[e] = capacity ? std::min(total, *capacity) : total;
  }

  auto dest_row_TK = at::empty({T, K}, ids_TK.options());
  int64_t* dest = dest_row_TK.mutable_data_ptr<int64_t>();
  const int64_t C = capacity.value_or(-1);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* next = pos + c * E;
      for_each_slot(chunk_start(c), chunk_start(c + 1), T, [&](int64_t t, int64_t k) {
        const int64_t e = ids[t * K + k];
        int64_t row = -1;
        if (e >= 0) {
          const int64_t p = next[e]++;
          row = C < 0 ? offsets[e] + p : (p < C ? e * C + p : -1);
        }
        dest[t * K + k] = row;
      });
    }
  });
  return {dest_row_TK, counts_E};
}

}  // namespace
}  // namespace moe_sys

TORCH_LIBRARY_IMPL(moe_sys, CPU, m) { m.impl("build_index", &moe_sys::build_index_cpu); }
