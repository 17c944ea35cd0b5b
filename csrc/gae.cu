// Generalised advantage estimation as a reverse scan over time (SPEC.md section 5).
// CUDA twin of kernels/gae.py: per row, two linear recurrences h_t = b_t + a_t h_{t+1} run
// from the end (the value at the next valid position E, then the advantage A), with masked
// positions carrying both through (rlops_math.h gives the maps).
//
// A packed batch (cu_seqlens) is the same walk per sequence: block s takes tokens
// cu_seqlens[s]..cu_seqlens[s + 1] of the one row as its row, so the scan restarts at every
// boundary exactly as at the end of a padded row, in one launch for all the sequences.
//
// One block per row walks tiles of kTile steps from the end. Each thread owns kItems
// consecutive steps: it composes their maps serially, a warp-shuffle scan and a pass over the
// warps' totals give each thread the composed map of every later step in the tile, and the
// tile's total map carries E and A into the tile on its left. A row of T steps is T / kTile
// dependent tile steps instead of T serial ones. A thread reads its 8 rewards and values as two
// 16-byte vectors each and its 8 mask bytes as one 8-byte load, and writes its advantages and
// returns as 16-byte vectors, wherever the row's alignment allows (element accesses otherwise).
#include "launch.h"
#include "rlops_math.h"

namespace rlops {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int64_t gae_clamp(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : x > hi ? hi : x;
}

static_assert(kItems == 8, "a thread's steps are two 16-byte vectors of floats and 8 mask bytes");

template <int ALIGN>
__device__ __forceinline__ bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % ALIGN == 0;
}

// A thread's kItems steps base.. of a float row of T steps (0 outside [0, T)): two 16-byte loads
// when all of them lie in the row and p + base is 16-byte aligned, element loads otherwise. The
// alignment of p + base is the same for every thread of a tile (base steps by kItems floats = 32
// bytes), so a row takes one path throughout but for the leftmost tile's threads before step 0.
__device__ __forceinline__ void load_items(const float* p, int64_t base, int64_t T, float* out) {
  if (base >= 0 && aligned<16>(p + base)) {  // base + kItems <= T always
    const float4 lo = *reinterpret_cast<const float4*>(p + base);
    const float4 hi = *reinterpret_cast<const float4*>(p + base + 4);
    const float got[kItems] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int j = 0; j < kItems; ++j) out[j] = got[j];
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = base + j;
      out[j] = t >= 0 && t < T ? p[t] : 0.f;
    }
  }
}

// The mask of the same steps (false outside [0, T)): one 8-byte load when aligned.
__device__ __forceinline__ void load_valid(const uint8_t* m, int64_t base, int64_t T, bool* out) {
  if (base >= 0 && aligned<8>(m + base)) {
    const uint2 w = *reinterpret_cast<const uint2*>(m + base);
#pragma unroll
    for (int j = 0; j < kItems; ++j) out[j] = ((j < 4 ? w.x : w.y) >> (8 * (j % 4)) & 0xffu) != 0;
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = base + j;
      out[j] = t >= 0 && t < T && m[t] != 0;
    }
  }
}

// Writes the thread's steps that lie in the row (base + j >= 0): two 16-byte stores when aligned.
__device__ __forceinline__ void store_items(float* p, int64_t base, const float* in) {
  if (base >= 0 && aligned<16>(p + base)) {
    *reinterpret_cast<float4*>(p + base) = make_float4(in[0], in[1], in[2], in[3]);
    *reinterpret_cast<float4*>(p + base + 4) = make_float4(in[4], in[5], in[6], in[7]);
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (base + j >= 0) p[base + j] = in[j];
    }
  }
}

__device__ __forceinline__ Affine shfl_down(const Affine& f, int offset) {
  return Affine{__shfl_down_sync(kFullMask, f.a, offset), __shfl_down_sync(kFullMask, f.b, offset)};
}

// own: this thread's composed map. Returns in `later` the map of every later step in the
// tile (the threads to the right) and in `tile` the map of the whole tile.
__device__ __forceinline__ void block_suffix_scan(Affine own, Affine& later, Affine& tile) {
  __shared__ Affine warp_total[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  Affine suffix = own;  // lanes lane..31 of this warp
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Affine o = shfl_down(suffix, offset);
    if (lane + offset < 32) suffix = then(o, suffix);
  }
  Affine in_warp = shfl_down(suffix, 1);  // lanes lane+1..31
  if (lane == 31) in_warp = identity_map();
  if (lane == 0) warp_total[warp] = suffix;
  __syncthreads();
  Affine right = identity_map();  // warps after this one
  tile = identity_map();
#pragma unroll
  for (int w = kWarps - 1; w >= 0; --w) {
    if (w > warp) right = then(right, warp_total[w]);
    tile = then(tile, warp_total[w]);
  }
  later = then(right, in_warp);
  __syncthreads();  // warp_total is rewritten by the next scan
}

__global__ void __launch_bounds__(kThreads) gae_kernel(GaeArgs a) {
  const int64_t row = blockIdx.x;
  int64_t T = a.n_time, r_off = row * a.r_stride, v_off = row * a.v_stride, m_off = row * a.m_stride,
          out_off = row * T;
  if (a.cu_seqlens != nullptr) {
    // Sequence `row`, clamped to [0, N) so that a cu_seqlens left unchecked (under torch.compile)
    // never addresses outside the row.
    const int64_t start = gae_clamp(a.cu_seqlens[row], 0, a.n_time);
    T = gae_clamp(a.cu_seqlens[row + 1], start, a.n_time) - start;
    r_off = v_off = m_off = out_off = start;
  }
  const float* r = a.rewards + r_off;
  const float* v = a.values + v_off;
  const uint8_t* m = a.mask + m_off;
  float* adv_out = a.adv + out_off;
  float* ret_out = a.ret + out_off;
  const float gamma = a.gamma, gamma_lam = a.gamma * a.lam;
  float next_value = a.bootstrap != nullptr ? a.bootstrap[row] : 0.f;  // E entering the tile from the right
  float next_adv = 0.f;

  const int64_t n_tiles = (T + kTile - 1) / kTile;
  for (int64_t tile_idx = 0; tile_idx < n_tiles; ++tile_idx) {
    // The leftmost tile may start before 0: those steps are masked and write nothing.
    const int64_t base = T - (tile_idx + 1) * kTile + threadIdx.x * kItems;
    bool valid[kItems + 1];
    float value[kItems + 1], reward[kItems];
    load_valid(m, base, T, valid);
    load_items(v, base, T, value);
    load_items(r, base, T, reward);
    // The step after the thread's last one (the next thread's first): always an element load.
    const int64_t after = base + kItems;
    valid[kItems] = after >= 0 && after < T && m[after] != 0;
    value[kItems] = after >= 0 && after < T ? v[after] : 0.f;

    Affine later, tile;
    block_suffix_scan(gae_value_map<kItems>(valid, value), later, tile);
    float delta[kItems];
    gae_deltas<kItems>(apply(later, next_value), valid, value, reward, gamma, delta);
    next_value = apply(tile, next_value);

    block_suffix_scan(gae_advantage_map<kItems>(valid, delta, gamma_lam), later, tile);
    float adv[kItems], ret[kItems];
    gae_outputs<kItems>(apply(later, next_adv), valid, value, delta, gamma_lam, adv, ret);
    store_items(adv_out, base, adv);
    store_items(ret_out, base, ret);
    next_adv = apply(tile, next_adv);
  }
}

}  // namespace

cudaError_t launch_gae(const GaeArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0 || a.n_time == 0) return cudaSuccess;  // packed: no tokens, every sequence empty
  gae_kernel<<<static_cast<unsigned>(a.n_rows), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace rlops
