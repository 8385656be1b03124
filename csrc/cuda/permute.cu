// CUDA permute / unpermute / row_dot over 16-byte packs of a row.
//
// Each block owns a chunk of rows and its threads stride over (row, pack) pairs, so narrow rows still
// give every thread work. When a row's byte width and the base pointers are 16-byte aligned, a pack is
// 16 bytes (one vector load/store); otherwise it falls back to one element. permute is a gather through
// src_slot_R (built by a scatter of dest_row_TK), so every output row is written exactly once and padding
// rows get their zeros in the same pass.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_kernels.h"

namespace moe_sys {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kPacksPerBlock = 4 * kThreads;  // (row, pack) pairs per block: 4 per thread
constexpr int kWarp = 32;

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Conversions by intrinsic: torch's nvcc flags disable the __half/__nv_bfloat16 operators.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Walks a thread's (row, pack) pairs from the block's first row in steps of blockDim, dividing once:
// 64-bit division per pack would cost more than the 16-byte load it indexes.
struct RowPacks {
  int64_t row, pack, step_rows, step_packs, P;
  __device__ RowPacks(int64_t first_row, int64_t packs_per_row)
      : row(first_row + threadIdx.x / packs_per_row),
        pack(threadIdx.x % packs_per_row),
        step_rows(blockDim.x / packs_per_row),
        step_packs(blockDim.x % packs_per_row),
        P(packs_per_row) {}
  __device__ void next(int64_t& r, int64_t& p) const {
    r += step_rows;
    p += step_packs;
    if (p >= P) {
      p -= P;
      ++r;
    }
  }
};

__global__ void scatter_slots(const int64_t* dest, int64_t N, int64_t R, int64_t* src_slot_R) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= N) return;
  const int64_t r = dest[s];
  if (r >= 0 && r < R) src_slot_R[r] = s;
}

template <typename T, int V>
__global__ void permute_rows(const T* x, const int64_t* src, const typename Acc<T>::type* w, int64_t K, int64_t P,
                             int64_t R, T* out) {
  using P_t = Pack<T, V>;
  const int64_t rows_per_block = (kPacksPerBlock + P - 1) / P;
  const int64_t r0 = blockIdx.x * rows_per_block, r1 = min(R, r0 + rows_per_block);
  RowPacks it(r0, P);
  for (int64_t r = it.row, p = it.pack; r < r1; it.next(r, p)) {
    const int64_t s = src[r];
    P_t pack;
    if (s < 0) {
      for (int j = 0; j < V; ++j) pack.v[j] = from_acc<T>(0);
    } else {
      pack = reinterpret_cast<const P_t*>(x)[(s / K) * P + p];
      if (w != nullptr) {
        const auto ws = w[s];
        for (int j = 0; j < V; ++j) pack.v[j] = from_acc<T>(ws * to_acc(pack.v[j]));
      }
    }
    reinterpret_cast<P_t*>(out)[r * P + p] = pack;
  }
}

template <typename T, int V>
__global__ void combine_rows(const T* y, const int64_t* dest, const typename Acc<T>::type* w, int64_t num_tokens,
                             int64_t K, int64_t P, T* out) {
  using P_t = Pack<T, V>;
  using A = typename Acc<T>::type;
  const int64_t rows_per_block = (kPacksPerBlock + P - 1) / P;
  const int64_t t0 = blockIdx.x * rows_per_block, t1 = min(num_tokens, t0 + rows_per_block);
  RowPacks it(t0, P);
  for (int64_t t = it.row, p = it.pack; t < t1; it.next(t, p)) {
    A acc[V];
    for (int j = 0; j < V; ++j) acc[j] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t r = dest[t * K + k];
      if (r < 0) continue;
      const A wk = w != nullptr ? w[t * K + k] : A(1);
      const P_t pack = reinterpret_cast<const P_t*>(y)[r * P + p];
      for (int j = 0; j < V; ++j) acc[j] += wk * to_acc(pack.v[j]);
    }
    P_t pack;
    for (int j = 0; j < V; ++j) pack.v[j] = from_acc<T>(acc[j]);
    reinterpret_cast<P_t*>(out)[t * P + p] = pack;
  }
}

// One warp per slot: lanes stride over the row's packs, then a shuffle reduction.
template <typename T, int V>
__global__ void dot_rows(const T* a, const T* b, const int64_t* dest, int64_t N, int64_t K, int64_t P,
                         typename Acc<T>::type* out) {
  using P_t = Pack<T, V>;
  using A = typename Acc<T>::type;
  const int64_t s = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= N) return;  // whole warps exit together: s is uniform across a warp
  const int64_t r = dest[s], t = s / K;
  A sum = 0;
  if (r >= 0) {
    for (int64_t p = lane; p < P; p += kWarp) {
      const P_t pa = reinterpret_cast<const P_t*>(a)[t * P + p];
      const P_t pb = reinterpret_cast<const P_t*>(b)[r * P + p];
      for (int j = 0; j < V; ++j) sum += to_acc(pa.v[j]) * to_acc(pb.v[j]);
    }
  }
  for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if (lane == 0) out[s] = sum;
}

int64_t blocks_for(int64_t rows, int64_t P) {
  const int64_t rows_per_block = (kPacksPerBlock + P - 1) / P;
  return (rows + rows_per_block - 1) / rows_per_block;
}

bool aligned16(int64_t row_bytes, const void* a, const void* b) {
  return row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
}

template <typename T, int V>
struct Tag {
  using type = T;
  static constexpr int width = V;
};

// Calls fn(Tag<T, V>{}) with the element type and the pack width (16 bytes when aligned, else 1 element).
template <typename T, typename Fn>
void with_pack(int64_t D, const void* a, const void* b, Fn&& fn) {
  if (aligned16(D * sizeof(T), a, b)) fn(Tag<T, 16 / sizeof(T)>{});
  else fn(Tag<T, 1>{});
}

template <typename Fn>
cudaError_t dispatch(Dtype dtype, int64_t D, const void* a, const void* b, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: with_pack<float>(D, a, b, fn); break;
    case Dtype::kFloat16: with_pack<__half>(D, a, b, fn); break;
    case Dtype::kBFloat16: with_pack<__nv_bfloat16>(D, a, b, fn); break;
    case Dtype::kFloat64: with_pack<double>(D, a, b, fn); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_permute(const void* x_TD, const int64_t* dest_row_TK, const void* weights_TK, int64_t T, int64_t K,
                           int64_t D, int64_t R, Dtype dtype, void* x_RD, int64_t* src_slot_R, cudaStream_t stream) {
  if (R == 0 || D == 0) return cudaSuccess;
  const int64_t N = T * K;
  cudaError_t err = cudaMemsetAsync(src_slot_R, 0xff, R * sizeof(int64_t), stream);  // all -1
  if (err != cudaSuccess) return err;
  if (N > 0) scatter_slots<<<(N + kThreads - 1) / kThreads, kThreads, 0, stream>>>(dest_row_TK, N, R, src_slot_R);
  return dispatch(dtype, D, x_TD, x_RD, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    constexpr int V = decltype(tag)::width;
    const int64_t P = D / V;
    permute_rows<E, V><<<blocks_for(R, P), kThreads, 0, stream>>>(static_cast<const E*>(x_TD), src_slot_R,
                                                                 static_cast<const A*>(weights_TK), K, P, R,
                                                                 static_cast<E*>(x_RD));
  });
}

cudaError_t launch_unpermute(const void* y_RD, const int64_t* dest_row_TK, const void* weights_TK, int64_t T,
                             int64_t K, int64_t D, Dtype dtype, void* y_TD, cudaStream_t stream) {
  if (T == 0 || D == 0) return cudaSuccess;
  return dispatch(dtype, D, y_RD, y_TD, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    constexpr int V = decltype(tag)::width;
    const int64_t P = D / V;
    combine_rows<E, V><<<blocks_for(T, P), kThreads, 0, stream>>>(static_cast<const E*>(y_RD), dest_row_TK,
                                                                 static_cast<const A*>(weights_TK), T, K, P,
                                                                 static_cast<E*>(y_TD));
  });
}

cudaError_t launch_row_dot(const void* a_TD, const void* b_RD, const int64_t* dest_row_TK, int64_t T, int64_t K,
                           int64_t D, Dtype dtype, void* out_TK, cudaStream_t stream) {
  const int64_t N = T * K;
  if (N == 0) return cudaSuccess;
  return dispatch(dtype, D, a_TD, b_RD, [&](auto tag) {
    using E = typename decltype(tag)::type;
    using A = typename Acc<E>::type;
    constexpr int V = decltype(tag)::width;
    const int64_t warps_per_block = kThreads / kWarp;
    dot_rows<E, V><<<(N + warps_per_block - 1) / warps_per_block, kThreads, 0, stream>>>(
        static_cast<const E*>(a_TD), static_cast<const E*>(b_RD), dest_row_TK, N, K, D / V, static_cast<A*>(out_TK));
  });
}

}  // namespace cuda
}  // namespace moe_sys
