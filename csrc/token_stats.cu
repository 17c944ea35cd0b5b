// Token statistics of softmax(logits / tau) in one pass over the vocabulary, with the fused
// policy-loss epilogue, and their gradient in one more pass (SPEC.md sections 1-3).
// CUDA twin of kernels/token_stats.py and kernels/policy_loss.py: same arguments, same
// output rows, same arithmetic (rlops_math.h).
//
// One block per row. Each thread streams 16-byte vectors of the row (8 bf16/fp16 logits) from
// the first 16-byte boundary, with scalar loads for the unaligned head and the tail; the
// per-thread online-softmax states are merged by warp shuffles, then across warps through
// shared memory. Rows that a mask excludes (forward) or whose upstream gradients are all zero
// (backward) are not read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "launch.h"
#include "rlops_math.h"

namespace rlops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return static_cast<T>(v);
  }
}

template <typename T>
constexpr int kVec = 16 / sizeof(T);

template <typename T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

template <int N>
struct Width {
  static constexpr int value = N;
};

// W consecutive elements at p (W = 1, or a 16-byte aligned vector), as float32.
template <typename T, int W>
__device__ __forceinline__ void load(const T* p, float* out) {
  if constexpr (W == 1) {
    out[0] = to_float(*p);
  } else {
    Vec<T> v = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(v.v[k]);
  }
}

template <typename T, int W>
__device__ __forceinline__ void store(T* p, const float* in) {
  if constexpr (W == 1) {
    *p = from_float<T>(in[0]);
  } else {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < W; ++k) v.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Vec<T>*>(p) = v;
  }
}

__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t inner, int64_t stride_outer,
                                              int64_t stride_inner) {
  return (row / inner) * stride_outer + (row % inner) * stride_inner;
}

// Elements before the first 16-byte boundary of p (all V if p is not even element-aligned).
template <typename T>
__device__ __forceinline__ int64_t head_len(const void* p, int64_t V) {
  int mis = static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16);
  if (mis % sizeof(T) != 0) return V;
  int64_t head = mis ? (16 - mis) / static_cast<int64_t>(sizeof(T)) : 0;
  return head < V ? head : V;
}

// Calls f(i, Width<W>) over a row of V elements so that the block covers each element once:
// scalars up to index head, 16-byte vectors from there, scalars for the tail.
template <typename T, typename F>
__device__ __forceinline__ void visit_row(int64_t V, int64_t head, F&& f) {
  constexpr int K = kVec<T>;
  for (int64_t i = threadIdx.x; i < head; i += blockDim.x) f(i, Width<1>{});
  int64_t n_vec = (V - head) / K;
  for (int64_t j = threadIdx.x; j < n_vec; j += blockDim.x) f(head + j * K, Width<K>{});
  for (int64_t i = head + n_vec * K + threadIdx.x; i < V; i += blockDim.x) f(i, Width<1>{});
}

template <bool HAS_REF>
__device__ __forceinline__ RowState shuffle_merge(RowState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    RowState o;
    o.m = __shfl_xor_sync(kFullMask, st.m, offset);
    o.s = __shfl_xor_sync(kFullMask, st.s, offset);
    o.t = __shfl_xor_sync(kFullMask, st.t, offset);
    o.mr = HAS_REF ? __shfl_xor_sync(kFullMask, st.mr, offset) : kLowest;
    o.sr = HAS_REF ? __shfl_xor_sync(kFullMask, st.sr, offset) : 0.f;
    o.c = HAS_REF ? __shfl_xor_sync(kFullMask, st.c, offset) : 0.f;
    o.scale = st.scale;
    st = merge<HAS_REF>(st, o);
  }
  return st;
}

// The merged state of the whole block, valid in thread 0.
template <bool HAS_REF>
__device__ __forceinline__ RowState block_merge(RowState st) {
  __shared__ RowState partial[kWarps];
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  st = shuffle_merge<HAS_REF>(st);
  if (lane == 0) partial[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? partial[lane] : empty_state(st.scale);
    st = shuffle_merge<HAS_REF>(st);
  }
  return st;
}

template <typename T, bool HAS_REF, bool POLICY>
__global__ void __launch_bounds__(kThreads) stats_fwd_kernel(StatsFwdArgs a) {
  const int64_t row = blockIdx.x, N = a.n_rows, V = a.vocab;
  const int n_out = POLICY ? kPolicyRows : kStatsRows;
  float* out = a.out + row;
  bool valid = POLICY ? a.weights[row] != 0.f : (a.mask == nullptr || a.mask[row] != 0);
  if (!valid) {
    if (threadIdx.x < n_out) out[threadIdx.x * N] = 0.f;
    return;
  }
  const T* x = static_cast<const T*>(a.x.ptr) + row_offset(row, a.x.inner, a.x.stride_outer, a.x.stride_inner);
  const T* y = HAS_REF ? static_cast<const T*>(a.ref.ptr) +
                             row_offset(row, a.ref.inner, a.ref.stride_outer, a.ref.stride_inner)
                       : x;
  const float inv_tau = a.inv_tau;
  int64_t head = head_len<T>(x, V);
  if (HAS_REF && head_len<T>(y, V) != head) head = V;  // rows aligned differently: scalar loads

  RowState st = empty_state(inv_tau);
  visit_row<T>(V, head, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], yv[W];
    load<T, W>(x + i, xv);
    if (HAS_REF) load<T, W>(y + i, yv);
    add<W, HAS_REF>(st, xv, yv);
  });
  st = block_merge<HAS_REF>(st);
  if (threadIdx.x != 0) return;

  RowStats rs = finish(st, HAS_REF);
  // An id outside [0, V) (possible only when the host check is skipped) gives NaN, not an
  // out-of-bounds read.
  const int64_t tok = a.tokens[row];
  const bool in_vocab = tok >= 0 && tok < V;
  const float logp = in_vocab ? token_logp(to_float(x[tok]), inv_tau, rs) : NAN;
  out[kRowLogp * N] = logp;
  out[kRowEntropy * N] = rs.entropy;
  out[kRowKl * N] = rs.kl;
  out[kRowMax * N] = rs.m;
  out[kRowLogSum * N] = rs.log_s;
  out[kRowLseGap * N] = rs.lse_gap;
  if constexpr (POLICY) {
    PolicyParams p{a.clip_low, a.clip_high, a.dual_clip, a.kl_coef, a.kl_kind,
                   a.old_logp != nullptr, a.isw != nullptr, a.ent_weights != nullptr, a.kl_ratio};
    TokenInputs in{a.weights[row],
                   p.has_ent ? a.ent_weights[row] : 0.f,
                   a.adv[row],
                   p.has_old ? a.old_logp[row] : 0.f,
                   a.ref_logp != nullptr ? a.ref_logp[row] : 0.f,
                   p.has_isw ? a.isw[row] : 1.f};
    PolicyOut o = policy_token(logp, rs.entropy, rs.kl, in, p);
    out[kRowKl * N] = o.kl;
    out[kRowRatio * N] = o.ratio;
    out[kRowLoss * N] = o.loss;
    out[kRowGLogp * N] = o.g_logp;
    out[kRowGEntropy * N] = o.g_entropy;
    out[kRowGKl * N] = o.g_kl;
  }
}

template <typename T, bool HAS_REF>
__global__ void __launch_bounds__(kThreads) stats_bwd_kernel(StatsBwdArgs a) {
  const int64_t row = blockIdx.x, N = a.n_rows, V = a.vocab;
  const T* x = static_cast<const T*>(a.x.ptr) + row_offset(row, a.x.inner, a.x.stride_outer, a.x.stride_inner);
  const T* y = HAS_REF ? static_cast<const T*>(a.ref.ptr) +
                             row_offset(row, a.ref.inner, a.ref.stride_outer, a.ref.stride_inner)
                       : x;
  T* dx = static_cast<T*>(a.dx) + row_offset(row, a.x.inner, a.dx_stride_outer, a.dx_stride_inner);
  // Upstream gradient row k is that of statistics row k (logp, entropy, the exact KL).
  const float* st = a.stats + row;
  const GradRow g{RowStats{st[kRowMax * N], st[kRowLogSum * N], st[kRowEntropy * N], st[kRowLseGap * N], st[kRowKl * N]},
                  a.grads[kRowLogp * N + row], a.grads[kRowEntropy * N + row], a.grads[kRowKl * N + row], a.inv_tau};
  int64_t head = head_len<T>(dx, V);
  if (g.g_logp == 0.f && g.g_entropy == 0.f && g.g_kl == 0.f) {
    // A masked token: zeros, without reading its logits.
    visit_row<T>(V, head, [&](int64_t i, auto width) {
      constexpr int W = decltype(width)::value;
      float zeros[W] = {};
      store<T, W>(dx + i, zeros);
    });
    return;
  }
  if (head_len<T>(x, V) != head || (HAS_REF && head_len<T>(y, V) != head)) head = V;
  const int64_t tok = a.tokens[row];
  visit_row<T>(V, head, [&](int64_t i, auto width) {
    constexpr int W = decltype(width)::value;
    float xv[W], yv[W], d[W];
    load<T, W>(x + i, xv);
    if (HAS_REF) load<T, W>(y + i, yv);
#pragma unroll
    for (int k = 0; k < W; ++k) d[k] = logit_grad<HAS_REF>(xv[k], HAS_REF ? yv[k] : 0.f, i + k == tok, g);
    // In place (dx == x) is safe: this thread read these elements above.
    store<T, W>(dx + i, d);
  });
}

template <typename T>
cudaError_t stats_fwd_typed(const StatsFwdArgs& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(a.n_rows));
  if (a.policy) {
    if (a.has_ref) {
      stats_fwd_kernel<T, true, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      stats_fwd_kernel<T, false, true><<<grid, kThreads, 0, stream>>>(a);
    }
  } else if (a.has_ref) {
    stats_fwd_kernel<T, true, false><<<grid, kThreads, 0, stream>>>(a);
  } else {
    stats_fwd_kernel<T, false, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t stats_bwd_typed(const StatsBwdArgs& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(a.n_rows));
  if (a.has_ref) {
    stats_bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    stats_bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// Calls fn with a value of the C++ type that dtype names.
template <typename Fn>
cudaError_t by_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32:
      return fn(float{});
    case Dtype::kFloat16:
      return fn(__half{});
    case Dtype::kBFloat16:
      return fn(__nv_bfloat16{});
    case Dtype::kFloat64:
      return fn(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_stats_fwd(const StatsFwdArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  return by_dtype(a.dtype, [&](auto tag) { return stats_fwd_typed<decltype(tag)>(a, stream); });
}

cudaError_t launch_stats_bwd(const StatsBwdArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  return by_dtype(a.dtype, [&](auto tag) { return stats_bwd_typed<decltype(tag)>(a, stream); });
}

}  // namespace rlops
