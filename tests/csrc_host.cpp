// A host build of the CUDA kernels' arithmetic (csrc/rlops_math.h) for the CPU tests
// (tests/test_csrc.py): the same functions the kernels call, driven by serial emulations of
// the kernels' thread layouts, so that the order in which partial states are merged and maps
// composed is the kernels' own. Compiled with the system C++ compiler; no CUDA needed.
#include <stdint.h>

#include <vector>

#include "rlops_math.h"

using namespace rlops;

namespace {

// The partial state of each of `threads` threads after token_stats.cu's stream_row: scalars up
// to `head`, K-wide vectors from there, scalars for the tail. The vector loop runs in trips of
// `unroll` vectors per thread (vectors j, j + threads, ..., j + (unroll - 1) threads), all
// fetched before the first is added, as the kernel does to keep several loads in flight; each
// thread still adds its vectors in the order of a plain strided loop, so the unroll changes no
// bit of the result (test_csrc.py checks that too).
template <int K, bool HAS_REF>
void thread_states(const float* x, const float* y, int64_t V, int64_t head, int threads, int unroll, float inv_tau,
                   std::vector<RowState>& st) {
  st.assign(threads, empty_state(inv_tau));
  struct Fetched {
    float x[K], y[K];
  };
  auto fetch = [&](int64_t i, int w) {
    Fetched f{};
    for (int k = 0; k < w; ++k) {
      f.x[k] = x[i + k];
      f.y[k] = HAS_REF ? y[i + k] : 0.f;
    }
    return f;
  };
  auto use = [&](int t, const Fetched& f, int w) {
    if (w == 1) {
      add<1, HAS_REF>(st[t], f.x, f.y);
    } else {
      add<K, HAS_REF>(st[t], f.x, f.y);
    }
  };
  std::vector<Fetched> got(unroll);
  const int64_t n_vec = (V - head) / K;
  for (int t = 0; t < threads; ++t) {
    for (int64_t i = t; i < head; i += threads) use(t, fetch(i, 1), 1);
    for (int64_t j = t; j < n_vec; j += static_cast<int64_t>(unroll) * threads) {
      for (int u = 0; u < unroll; ++u) {
        if (j + u * threads < n_vec) got[u] = fetch(head + (j + u * threads) * K, K);
      }
      for (int u = 0; u < unroll; ++u) {
        if (j + u * threads < n_vec) use(t, got[u], K);
      }
    }
    for (int64_t i = head + n_vec * K + t; i < V; i += threads) use(t, fetch(i, 1), 1);
  }
}

// shuffle_merge: the xor butterfly within each warp of 32 lanes (lane 0 ends with the warp's state).
template <bool HAS_REF>
void butterfly(std::vector<RowState>& st) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    std::vector<RowState> next(st);
    for (size_t i = 0; i < st.size(); ++i) next[i] = merge<HAS_REF>(st[i], st[i ^ offset]);
    st.swap(next);
  }
}

template <int K, bool HAS_REF>
RowStats row_stats(const float* x, const float* y, int64_t V, int64_t head, int warps, int unroll, float inv_tau) {
  std::vector<RowState> st;
  thread_states<K, HAS_REF>(x, y, V, head, warps * 32, unroll, inv_tau, st);
  butterfly<HAS_REF>(st);
  std::vector<RowState> lanes(32, empty_state(inv_tau));  // block_merge: warp 0 merges the warps' states
  for (int w = 0; w < warps; ++w) lanes[w] = st[w * 32];
  butterfly<HAS_REF>(lanes);
  return finish(lanes[0], HAS_REF);
}

// in_flight: the kernel's 16-byte loads per thread per trip (kInFlight): that many vectors of x per
// trip, half as many of x and of y with a reference.
template <int K>
RowStats row_stats_k(const float* x, const float* y, int64_t V, int64_t head, int warps, int in_flight,
                     float inv_tau) {
  return y ? row_stats<K, true>(x, y, V, head, warps, in_flight > 1 ? in_flight / 2 : 1, inv_tau)
           : row_stats<K, false>(x, y, V, head, warps, in_flight, inv_tau);
}

}  // namespace

extern "C" {

// The kernel's stats (kStatsRows, n_rows) in the rows of OutRow, for each row of x (n_rows, V)
// (float32 values of the logits, in any dtype's vector width `vec`: 1, 2, 4 or 8 elements);
// y is nullptr or the reference logits; heads[r]: elements before row r's first vector;
// warps: the block's warps (at most 32); in_flight: the kernel's kInFlight (1: a plain strided loop).
void rlops_row_stats(const float* x, const float* y, const int64_t* tokens, const int64_t* heads, int64_t n_rows,
                     int64_t V, int vec, int warps, int in_flight, float inv_tau, float* out) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const float* xr = x + r * V;
    const float* yr = y ? y + r * V : nullptr;
    RowStats s{};
    switch (vec) {
      case 1: s = row_stats_k<1>(xr, yr, V, heads[r], warps, in_flight, inv_tau); break;
      case 2: s = row_stats_k<2>(xr, yr, V, heads[r], warps, in_flight, inv_tau); break;
      case 4: s = row_stats_k<4>(xr, yr, V, heads[r], warps, in_flight, inv_tau); break;
      default: s = row_stats_k<8>(xr, yr, V, heads[r], warps, in_flight, inv_tau); break;
    }
    const int64_t tok = tokens[r];
    out[kRowLogp * n_rows + r] = tok >= 0 && tok < V ? token_logp(xr[tok], inv_tau, s) : NAN;
    out[kRowEntropy * n_rows + r] = s.entropy;
    out[kRowKl * n_rows + r] = s.kl;
    out[kRowMax * n_rows + r] = s.m;
    out[kRowLogSum * n_rows + r] = s.log_s;
    out[kRowLseGap * n_rows + r] = s.lse_gap;
  }
}

// in (9, n): logp, entropy, kl_full, w, ent_w, adv, old_logp, ref_logp, isw.
// out (6, n): kl, ratio, loss, g_logp, g_entropy, g_kl.
void rlops_policy_token(const float* in, int64_t n, float clip_low, float clip_high, float dual_clip, float kl_coef,
                        int kl_kind, int has_old, int has_isw, int has_ent, int kl_ratio, int objective,
                        float ratio_cap, float param_pos, float param_neg, float* out) {
  PolicyParams p{clip_low, clip_high, dual_clip, kl_coef, kl_kind, has_old != 0, has_isw != 0, has_ent != 0,
                 kl_ratio != 0, objective, ratio_cap, param_pos, param_neg};
  for (int64_t i = 0; i < n; ++i) {
    TokenInputs t{in[3 * n + i], in[4 * n + i], in[5 * n + i], in[6 * n + i], in[7 * n + i], in[8 * n + i]};
    PolicyOut o = policy_token(in[i], in[n + i], in[2 * n + i], t, p);
    const float values[6] = {o.kl, o.ratio, o.loss, o.g_logp, o.g_entropy, o.g_kl};
    for (int k = 0; k < 6; ++k) out[k * n + i] = values[k];
  }
}

// dx (n_rows, V) from x, y (or nullptr), tokens, the stats (kStatsRows, n_rows) and upstream gradients
// (3, n_rows); a row whose three gradients are 0 is zeros, as in the kernel.
void rlops_logit_grad(const float* x, const float* y, const int64_t* tokens, const float* stats, const float* grads,
                      int64_t n_rows, int64_t V, float inv_tau, float* dx) {
  const int64_t n = n_rows;
  for (int64_t r = 0; r < n; ++r) {
    const float* st = stats + r;
    const GradRow g = grad_row(
        RowStats{st[kRowMax * n], st[kRowLogSum * n], st[kRowEntropy * n], st[kRowLseGap * n], st[kRowKl * n]},
        grads[r], grads[n + r], grads[2 * n + r], inv_tau);
    for (int64_t v = 0; v < V; ++v) {
      const float xv = x[r * V + v];
      dx[r * V + v] = g.zero ? 0.f
                      : y  ? logit_grad<true>(xv, y[r * V + v], v == tokens[r], g)
                           : logit_grad<false>(xv, 0.f, v == tokens[r], g);
    }
  }
}

// gae.cu's tile walk with `threads` threads of K = 8 steps each (the kernel reads a thread's steps
// as 16-byte vectors where aligned: the same values); the block scans are serial
// compositions over the threads (the kernel's warp shuffles compute the same maps). Padded:
// n_rows contiguous rows of T steps. Packed (cu_seqlens (n_rows + 1,) given): one row of T
// tokens, row s of the walk being tokens cu_seqlens[s]..cu_seqlens[s + 1], clamped as in the kernel.
void rlops_gae(const float* rewards, const float* values, const uint8_t* mask, const float* bootstrap,
               const int64_t* cu_seqlens, int64_t n_rows, int64_t T, int threads, float gamma, float lam, float* adv,
               float* ret) {
  constexpr int K = 8;
  const int64_t tile_len = static_cast<int64_t>(threads) * K;
  const float gamma_lam = gamma * lam;
  struct Thread {
    bool valid[K + 1];
    float value[K + 1], reward[K], delta[K];
  };
  std::vector<Thread> th(threads);
  std::vector<Affine> own(threads), later(threads);
  // later[i]: the maps of threads i+1.. composed; returns the whole tile's map.
  auto scan = [&]() {
    Affine acc = identity_map();
    for (int i = threads - 1; i >= 0; --i) {
      later[i] = acc;
      acc = then(acc, own[i]);
    }
    return acc;
  };
  auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; };
  for (int64_t row = 0; row < n_rows; ++row) {
    int64_t off = row * T, len = T;
    if (cu_seqlens) {
      off = clamp(cu_seqlens[row], 0, T);
      len = clamp(cu_seqlens[row + 1], off, T) - off;
    }
    const float *r = rewards + off, *v = values + off;
    const uint8_t* m = mask + off;
    float next_value = bootstrap ? bootstrap[row] : 0.f, next_adv = 0.f;
    for (int64_t tile = 0; tile * tile_len < len; ++tile) {
      for (int i = 0; i < threads; ++i) {
        const int64_t base = len - (tile + 1) * tile_len + static_cast<int64_t>(i) * K;
        for (int j = 0; j <= K; ++j) {
          const int64_t t = base + j;
          const bool here = t >= 0 && t < len;
          th[i].valid[j] = here && m[t] != 0;
          th[i].value[j] = here ? v[t] : 0.f;
          if (j < K) th[i].reward[j] = here ? r[t] : 0.f;
        }
        own[i] = gae_value_map<K>(th[i].valid, th[i].value);
      }
      Affine whole = scan();
      for (int i = 0; i < threads; ++i) {
        gae_deltas<K>(apply(later[i], next_value), th[i].valid, th[i].value, th[i].reward, gamma, th[i].delta);
        own[i] = gae_advantage_map<K>(th[i].valid, th[i].delta, gamma_lam);
      }
      next_value = apply(whole, next_value);
      whole = scan();
      for (int i = 0; i < threads; ++i) {
        float a[K], rt[K];
        gae_outputs<K>(apply(later[i], next_adv), th[i].valid, th[i].value, th[i].delta, gamma_lam, a, rt);
        const int64_t base = len - (tile + 1) * tile_len + static_cast<int64_t>(i) * K;
        for (int j = 0; j < K; ++j) {
          if (base + j >= 0) {
            adv[off + base + j] = a[j];
            ret[off + base + j] = rt[j];
          }
        }
      }
      next_adv = apply(whole, next_adv);
    }
  }
}

}  // extern "C"
