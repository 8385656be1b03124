// CUDA routing index: per-chunk histograms, a scan over chunks, then stable positions, with no sort.
//
// Slots are visited in slot-major order s = k * T + t (the capacity drop priority). Each chunk of
// kChunk slots is owned by one warp, which walks it 32 slots at a time in order: __match_any_sync groups
// the lanes holding the same expert, a lane's rank is the number of such lanes below it, and the group's
// lowest lane advances the chunk's counter for that expert. Positions therefore equal a stable sort's,
// deterministically, and no atomics are needed because every counter row belongs to one warp.
#include "moe_kernels.h"

namespace moe_sys {
namespace cuda {
namespace {

constexpr int64_t kChunk = 4096;  // slots per warp: enough work per warp, few chunk rows to scan
constexpr int kWarp = 32;

struct Workspace {
  int64_t* pos_CE;    // per-chunk histogram, then the chunk's first position per expert
  int64_t* total_E;   // slots routed to each expert
  int64_t* offset_E;  // dropless: first row of each expert
};

int64_t num_chunks(int64_t T, int64_t K) { return (T * K + kChunk - 1) / kChunk; }

Workspace carve(void* workspace, int64_t chunks, int64_t E) {
  auto* p = static_cast<int64_t*>(workspace);
  return {p, p + chunks * E, p + chunks * E + E};
}

__device__ __forceinline__ int64_t expert_of(const int64_t* ids, int64_t s, int64_t T, int64_t K, int64_t E,
                                             int64_t N) {
  if (s >= N) return -1;
  const int64_t e = ids[(s % T) * K + s / T];
  return (e >= 0 && e < E) ? e : -1;
}

__global__ void chunk_histogram(const int64_t* ids, int64_t T, int64_t K, int64_t E, int64_t* pos_CE) {
  const int64_t N = T * K, chunk = blockIdx.x, lane = threadIdx.x;
  int64_t* hist = pos_CE + chunk * E;
  for (int64_t e = lane; e < E; e += kWarp) hist[e] = 0;
  __syncwarp();
  for (int64_t s0 = chunk * kChunk; s0 < min(N, (chunk + 1) * kChunk); s0 += kWarp) {
    const int64_t e = expert_of(ids, s0 + lane, T, K, E, N);
    const unsigned same = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(e));
    if (e >= 0 && lane == __ffs(same) - 1) hist[e] += __popc(same);
    __syncwarp();
  }
}

// One thread per expert: exclusive scan of its column over chunks.
__global__ void scan_chunks(int64_t chunks, int64_t E, int64_t* pos_CE, int64_t* total_E) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= E) return;
  int64_t run = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n = pos_CE[c * E + e];
    pos_CE[c * E + e] = run;
    run += n;
  }
  total_E[e] = run;
}

// A single thread: E is at most a few thousand, far below one launch's fixed cost.
__global__ void expert_offsets(int64_t E, int64_t capacity, const int64_t* total_E, int64_t* offset_E,
                               int64_t* counts_E) {
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    offset_E[e] = row;
    row += total_E[e];
    counts_E[e] = capacity < 0 ? total_E[e] : min(total_E[e], capacity);
  }
}

__global__ void assign_rows(const int64_t* ids, int64_t T, int64_t K, int64_t E, int64_t capacity,
                            const int64_t* offset_E, int64_t* pos_CE, int64_t* dest) {
  const int64_t N = T * K, chunk = blockIdx.x, lane = threadIdx.x;
  int64_t* next = pos_CE + chunk * E;
  const unsigned below = (1u << lane) - 1u;
  for (int64_t s0 = chunk * kChunk; s0 < min(N, (chunk + 1) * kChunk); s0 += kWarp) {
    const int64_t s = s0 + lane;
    const int64_t e = expert_of(ids, s, T, K, E, N);
    const unsigned same = __match_any_sync(0xffffffffu, static_cast<unsigned long long>(e));
    int64_t row = -1;
    if (e >= 0) {
      const int64_t p = next[e] + __popc(same & below);
      row = capacity < 0 ? offset_E[e] + p : (p < capacity ? e * capacity + p : -1);
    }
    __syncwarp();  // every lane has read next[e] before the group leader advances it
    if (e >= 0 && lane == __ffs(same) - 1) next[e] += __popc(same);
    __syncwarp();
    if (s < N) dest[(s % T) * K + s / T] = row;
  }
}

}  // namespace

size_t build_index_workspace_bytes(int64_t T, int64_t K, int64_t E) {
  return static_cast<size_t>(num_chunks(T, K) * E + 2 * E) * sizeof(int64_t);
}

cudaError_t launch_build_index(const int64_t* expert_ids_TK, int64_t T, int64_t K, int64_t E, int64_t capacity,
                               int64_t* dest_row_TK, int64_t* counts_E, void* workspace, cudaStream_t stream) {
  if (E == 0) return T * K == 0 ? cudaSuccess : cudaMemsetAsync(dest_row_TK, 0xff, T * K * sizeof(int64_t), stream);
  const int64_t chunks = num_chunks(T, K);
  const Workspace ws = carve(workspace, chunks, E);
  if (chunks > 0) chunk_histogram<<<chunks, kWarp, 0, stream>>>(expert_ids_TK, T, K, E, ws.pos_CE);
  scan_chunks<<<(E + 255) / 256, 256, 0, stream>>>(chunks, E, ws.pos_CE, ws.total_E);
  expert_offsets<<<1, 1, 0, stream>>>(E, capacity, ws.total_E, ws.offset_E, counts_E);
  if (chunks > 0)
    assign_rows<<<chunks, kWarp, 0, stream>>>(expert_ids_TK, T, K, E, capacity, ws.offset_E, ws.pos_CE, dest_row_TK);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moe_sys
