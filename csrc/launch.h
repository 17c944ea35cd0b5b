// The kernels' launchers, as plain C++ over raw pointers: the .cu files include no PyTorch
// header (they compile in seconds, for any architecture), and ops.cpp turns tensors into these
// arguments. Each struct lists the arguments of its Triton twin in kernels/, in that order.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace rlops {

enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Row r of a (N, V) view starts at (r / inner) * stride_outer + (r % inner) * stride_inner
// elements (kernels/_common.py, RowLayout).
struct Rows {
  const void* ptr;
  int64_t inner, stride_outer, stride_inner;
};

// kernels/token_stats.py, _token_stats_fwd_kernel; and, with policy set, the fused policy loss
// of kernels/policy_loss.py, _policy_loss_fwd_kernel.
struct StatsFwdArgs {
  Dtype dtype;
  Rows x, ref;            // ref is read only with has_ref
  const int64_t* tokens;  // (N,)
  const uint8_t* mask;    // (N,) or nullptr; rows where it is 0 are not read
  float* out;             // (5, N) stats, or (10, N) with policy
  int64_t n_rows, vocab;
  float inv_tau;
  bool has_ref;
  // The policy-loss epilogue (policy = true): per-token float32 inputs, nullptr when absent.
  bool policy;
  const float *weights, *ent_weights, *adv, *old_logp, *ref_logp, *isw;
  float clip_low, clip_high, dual_clip, kl_coef;
  int kl_kind;
  bool kl_ratio;
  int objective;
  float ratio_cap, param_pos, param_neg;
};

// kernels/token_stats.py, _token_stats_bwd_kernel: d logits from (3, N) upstream gradients.
struct StatsBwdArgs {
  Dtype dtype;
  Rows x, ref;
  const int64_t* tokens;
  const float* stats;  // (kStatsRows, N): logp, entropy, kl, max, log_sum, lse_gap
  const float* grads;  // (3, N): d/d logp, d/d entropy, d/d kl
  void* dx;            // rows at (r / x.inner) * dx_stride_outer + (r % x.inner) * dx_stride_inner
  int64_t dx_stride_outer, dx_stride_inner;
  int64_t n_rows, vocab;
  float inv_tau;
  bool has_ref;
};

// kernels/gae.py, _gae_kernel; rewards and values float32, mask uint8, row strides in elements.
// Packed (cu_seqlens set): n_rows = S sequences, cu_seqlens[s]..cu_seqlens[s + 1] of one row of
// n_time = N tokens (unit stride; the row strides are unused). The Triton twin's sequence ids
// and sequences per program have no counterpart: here each sequence is a block of its own.
struct GaeArgs {
  const float *rewards, *values;
  const uint8_t* mask;
  const float* bootstrap;      // (B,) or (S,), or nullptr
  const int64_t* cu_seqlens;   // (S + 1,), or nullptr for (B, T) rows
  float *adv, *ret;            // (B, T) or (N,) contiguous
  int64_t n_rows, n_time, r_stride, v_stride, m_stride;
  float gamma, lam;
};

cudaError_t launch_stats_fwd(const StatsFwdArgs& a, cudaStream_t stream);
cudaError_t launch_stats_bwd(const StatsBwdArgs& a, cudaStream_t stream);
cudaError_t launch_gae(const GaeArgs& a, cudaStream_t stream);

}  // namespace rlops
