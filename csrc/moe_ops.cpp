// Schemas of the moe_sys dispatch/combine and grouped GEMM ops; kernels live in cpu/ and cuda/, fake and autograd
// registrations in moe_sys/ops/registration.py (Python, so torch.compile can trace them).
//
// Legend: T tokens, K slots per token, E experts, D model dim, R routed rows.
// dest_row_TK[t, k] is the row of the expert-sorted buffer that slot (t, k) occupies, -1 if dropped;
// kept slots occupy distinct rows, which is what lets permute and unpermute run without atomics.
#include <torch/library.h>

TORCH_LIBRARY(moe_sys, m) {
  // Per-expert counts and each slot's destination row (histogram + prefix sum + stable position).
  // capacity None: dropless layout; otherwise the [E, capacity] layout with slot-major drop priority.
  m.def("build_index(Tensor expert_ids_TK, int num_experts, int? capacity) -> (Tensor dest_row_TK, Tensor counts_E)");
  // x_RD[dest_row_TK[t, k]] = weights_TK[t, k] * x_TD[t] (weight 1 when None); unwritten rows are zero.
  m.def("permute(Tensor x_TD, Tensor dest_row_TK, SymInt num_rows, Tensor? weights_TK=None) -> Tensor");
  // y_TD[t] = sum over kept k of weights_TK[t, k] * y_RD[dest_row_TK[t, k]], fp32 accumulation for halves.
  m.def("unpermute(Tensor y_RD, Tensor dest_row_TK, Tensor? weights_TK=None) -> Tensor");
  // out_TK[t, k] = dot(a_TD[t], b_RD[dest_row_TK[t, k]]) (0 when dropped), in the accumulation dtype:
  // the weight gradient of unpermute and of the weighted permute.
  m.def("row_dot(Tensor a_TD, Tensor b_RD, Tensor dest_row_TK) -> Tensor");
  // y_RF[rows of e] = x_RD[rows of e] @ w_EDF[e], rows sorted by expert, counts_E (int64, on the host)
  // rows each. CPU only: CUDA has torch._grouped_mm (moe_sys/ops/grouped_mm.py picks the backend).
  m.def("grouped_mm(Tensor x_RD, Tensor w_EDF, Tensor counts_E) -> Tensor");
  // grad_EDF[e] = x_RD[rows of e]^T @ grad_RF[rows of e] (zeros for experts with no rows): the weight
  // gradient of grouped_mm, built as one [E, D, F] tensor.
  m.def("grouped_mm_wgrad(Tensor x_RD, Tensor grad_RF, Tensor counts_E) -> Tensor");
}
