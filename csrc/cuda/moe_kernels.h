// Launchers of the moe_sys CUDA kernels: plain CUDA C++, raw pointers and a stream, no torch headers.
//
// Keeping torch out of the .cu files lets `nvcc -c` compile them with any CUDA toolkit (CI proves they
// build for sm_80/sm_90 on machines whose torch is CPU-only); moe_ops_cuda.cpp binds them to torch.
//
// Legend: T tokens, K slots per token, E experts, D row width, R routed rows, N = T * K slots.
// Weights and row_dot outputs are in the accumulation type: float for fp32/fp16/bf16 rows, double for fp64.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe_sys {
namespace cuda {

enum class Dtype : int { kFloat32, kFloat16, kBFloat16, kFloat64 };

// Bytes of scratch build_index needs (per-chunk histograms, totals, offsets).
size_t build_index_workspace_bytes(int64_t T, int64_t K, int64_t E);

// dest_row_TK and counts_E as described in csrc/moe_ops.cpp; capacity < 0 selects the dropless layout.
// Expert ids outside [-1, E) are treated as dropped (checking them would cost a host sync).
cudaError_t launch_build_index(const int64_t* expert_ids_TK, int64_t T, int64_t K, int64_t E, int64_t capacity,
                               int64_t* dest_row_TK, int64_t* counts_E, void* workspace, cudaStream_t stream);

// x_RD[dest[t, k]] = w[t, k] * x_TD[t]; rows no slot writes are zero. weights_TK may be null (all ones).
// src_slot_R is scratch of R int64.
cudaError_t launch_permute(const void* x_TD, const int64_t* dest_row_TK, const void* weights_TK, int64_t T, int64_t K,
                           int64_t D, int64_t R, Dtype dtype, void* x_RD, int64_t* src_slot_R, cudaStream_t stream);

// y_TD[t] = sum over kept k of w[t, k] * y_RD[dest[t, k]], accumulated in the accumulation type.
cudaError_t launch_unpermute(const void* y_RD, const int64_t* dest_row_TK, const void* weights_TK, int64_t T,
                             int64_t K, int64_t D, Dtype dtype, void* y_TD, cudaStream_t stream);

// out_TK[t, k] = dot(a_TD[t], b_RD[dest[t, k]]), 0 for dropped slots.
cudaError_t launch_row_dot(const void* a_TD, const void* b_RD, const int64_t* dest_row_TK, int64_t T, int64_t K,
                           int64_t D, Dtype dtype, void* out_TK, cudaStream_t stream);

}  // namespace cuda
}  // namespace moe_sys
