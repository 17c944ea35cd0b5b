// Token statistics of softmax(logits / tau) in one pass over the vocabulary, with the fused
// policy-loss epilogue, and their gradient in one more pass (SPEC.md sections 1-3).
// CUDA twin of kernels/token_stats.py and kernels/policy_loss.py: same arguments, same
// output rows, same arithmetic (rlops_math.h).
//
// One block per row. Each thread streams 16-byte vectors of the row (8 bf16/fp16 logits) from
// the first 16-byte boundary, with scalar loads for the unaligned head and the tail, kInFlight
// 16-byte loads in flight per trip of the vector loop; the backward writes the gradient as
// 16-byte vectors too. The per-thread online-softmax states are merged by warp shuffles, then
// across warps through shared memory. Rows that a mask excludes (forward) or whose upstream
// gradients are all zero (backward) are not read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <string.h>

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

// 16-byte vectors in flight per thread in the streaming loops: a trip of the vector loop issues
// kInFlight 16-byte loads (kInFlight / 2 vectors of x and of the reference with HAS_REF) before
// it uses the first, so that each thread keeps several independent loads outstanding.
constexpr int kInFlight = 4;
template <bool HAS_REF>
constexpr int kUnroll = HAS_REF ? kInFlight / 2 : kInFlight;

template <int N>
struct Width {
  static constexpr int value = N;
};

// W elements as they sit in memory: one element, or one 16-byte vector held as a uint4 so that
// it moves with one 128-bit instruction (LDG.E.128 / STG.E.128) whatever T is.
template <typename T, int W>
using Raw = std::conditional_t<W == 1, T, uint4>;

template <typename T, int W>
__device__ __forceinline__ Raw<T, W> load_raw(const T* p) {
  return *reinterpret_cast<const Raw<T, W>*>(p);
}

// The W elements of r as float32.
template <typename T, int W>
__device__ __forceinline__ void unpack(const Raw<T, W>& r, float* out) {
  if constexpr (W == 1) {
    out[0] = to_float(r);
  } else {
    T v[W];
    static_assert(sizeof(v) == sizeof(r), "a vector is 16 bytes");
    memcpy(v, &r, sizeof(r));
#pragma unroll
    for (int k = 0; k < W; ++k) out[k] = to_float(v[k]);
  }
}

// Two floats rounded to nearest into two 16-bit values, the first in the low half (memory order):
// one packed conversion, the same rounding as from_float on each.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t u;
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&u, &h, 4);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&u, &h, 4);
  }
  return u;
}

// Writes the W floats of in at p in T: one element, or one 16-byte vector (p 16-byte aligned).
template <typename T, int W>
__device__ __forceinline__ void store(T* p, const float* in) {
  if constexpr (W == 1) {
    *p = from_float<T>(in[0]);
  } else {
    uint4 r;
    if constexpr (sizeof(T) == 2) {
      r = make_uint4(pack2<T>(in[0], in[1]), pack2<T>(in[2], in[3]), pack2<T>(in[4], in[5]), pack2<T>(in[6], in[7]));
    } else {
      T v[W];
#pragma unroll
      for (int k = 0; k < W; ++k) v[k] = from_float<T>(in[k]);
      memcpy(&r, v, sizeof(r));
    }
    // One st.global.v4 (STG.E.128), written out: the optimiser splits a plain uint4 assignment into
    // four 32-bit stores in some trips, and __stwb's explicit .wb becomes a strong (STG.E.128.STRONG.SM) store.
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(r.x), "r"(r.y), "r"(r.z), "r"(r.w)
                 : "memory");
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

// Streams a row of V elements through the block so that it covers each element once: scalars up
// to index head, 16-byte vectors from there, scalars for the tail. fetch(i, Width<W>{}) loads the
// W elements at i (returning what it read), use(i, fetched) consumes them.
//
// Thread t takes vectors t, t + kThreads, t + 2 kThreads, ... in that order, as a plain strided
// loop would (so its online-softmax state sees the same sequence: tests/csrc_host.cpp emulates
// it), but a trip of the vector loop fetches U of them before it uses the first: U independent
// 16-byte loads per tensor in flight. The last trip's missing vectors are neither loaded nor used.
template <typename T, int U, typename Fetch, typename Use>
__device__ __forceinline__ void stream_row(int64_t V, int64_t head, Fetch&& fetch, Use&& use) {
  constexpr int K = kVec<T>;
  const int64_t tid = threadIdx.x;
  for (int64_t i = tid; i < head; i += kThreads) use(i, fetch(i, Width<1>{}));
  const int64_t n_vec = (V - head) / K;
  for (int64_t j = tid; j < n_vec; j += U * kThreads) {
    decltype(fetch(int64_t{0}, Width<K>{})) got[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j + u * kThreads < n_vec) got[u] = fetch(head + (j + u * kThreads) * K, Width<K>{});
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (j + u * kThreads < n_vec) use(head + (j + u * kThreads) * K, got[u]);
    }
  }
  for (int64_t i = head + n_vec * K + tid; i < V; i += kThreads) use(i, fetch(i, Width<1>{}));
}

// What fetch reads of one position: W elements of x (v[0]), and of the reference (v[1]) with HAS_REF.
template <typename T, int W, bool HAS_REF>
struct Fetched {
  static constexpr int width = W;
  Raw<T, W> v[HAS_REF ? 2 : 1];
};

// fetch for stream_row: the elements of row x (and of the reference row y with HAS_REF) at i.
template <typename T, bool HAS_REF>
struct RowReader {
  const T *x, *y;
  template <int W>
  __device__ __forceinline__ Fetched<T, W, HAS_REF> operator()(int64_t i, Width<W>) const {
    Fetched<T, W, HAS_REF> f;
    f.v[0] = load_raw<T, W>(x + i);
    if constexpr (HAS_REF) f.v[1] = load_raw<T, W>(y + i);
    return f;
  }
};

// The fetched elements as float32 (y untouched without HAS_REF).
template <typename T, int W, bool HAS_REF>
__device__ __forceinline__ void unpack(const Fetched<T, W, HAS_REF>& f, float* x, float* y) {
  unpack<T, W>(f.v[0], x);
  if constexpr (HAS_REF) unpack<T, W>(f.v[HAS_REF ? 1 : 0], y);
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
  stream_row<T, kUnroll<HAS_REF>>(V, head, RowReader<T, HAS_REF>{x, y}, [&](int64_t, const auto& f) {
    constexpr int W = std::decay_t<decltype(f)>::width;
    float xv[W], yv[W];
    unpack(f, xv, yv);
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
                   a.old_logp != nullptr, a.isw != nullptr, a.ent_weights != nullptr, a.kl_ratio,
                   a.objective, a.ratio_cap, a.param_pos, a.param_neg};
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
  const GradRow g = grad_row(
      RowStats{st[kRowMax * N], st[kRowLogSum * N], st[kRowEntropy * N], st[kRowLseGap * N], st[kRowKl * N]},
      a.grads[kRowLogp * N + row], a.grads[kRowEntropy * N + row], a.grads[kRowKl * N + row], a.inv_tau);
  int64_t head = head_len<T>(dx, V);
  if (g.zero) {
    // A masked token: zeros, without reading its logits.
    stream_row<T, kInFlight>(V, head, [](int64_t, auto width) { return width; }, [&](int64_t i, auto width) {
      constexpr int W = decltype(width)::value;
      float zeros[W] = {};
      store<T, W>(dx + i, zeros);
    });
    return;
  }
  if (head_len<T>(x, V) != head || (HAS_REF && head_len<T>(y, V) != head)) head = V;
  const int64_t tok = a.tokens[row];
  stream_row<T, kUnroll<HAS_REF>>(V, head, RowReader<T, HAS_REF>{x, y}, [&](int64_t i, const auto& f) {
    constexpr int W = std::decay_t<decltype(f)>::width;
    float xv[W], yv[W], d[W];
    unpack(f, xv, yv);
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
