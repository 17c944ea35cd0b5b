// The arithmetic of the CUDA kernels, for one element, one token or one time step.
//
// Everything here is __host__ __device__ and free of CUDA headers, so the same functions
// compile into the kernels (token_stats.cu, gae.cu) and into a host build that the CPU tests
// check against rlops/reference.py in float64 (tests/csrc_host.cpp). The kernels add only
// the parallel plumbing: vector loads, warp-shuffle merges of these states, block scans.
// Formulas: SPEC.md sections 1-3 and 5; they mirror kernels/_common.py and
// kernels/policy_loss.py line for line.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define RLOPS_HD __host__ __device__ __forceinline__
#define RLOPS_UNROLL _Pragma("unroll")
#else
#define RLOPS_HD inline
#define RLOPS_UNROLL
#endif

namespace rlops {

// Lowest finite float32: a running max that starts here (not at -inf) rescales by exp(0),
// not exp(nan), while a row has seen only -inf logits.
constexpr float kLowest = -3.4028234663852886e38f;
constexpr float kLogRatioClamp = 20.0f;
constexpr float kK3Max = 10.0f;
enum Objective : int { kClip = 0, kCispo = 1, kSapo = 2, kReinforce = 3, kDro = 4, kDppoTv = 5, kDppoKl = 6 };
enum KlKind : int { kKlNone = 0, kK1 = 1, kK2 = 2, kK3 = 3, kKlFull = 4, kKAbs = 5, kK1St = 6, kK3St = 7, kKAbsSt = 8 };
// Rows of the float32 per-token output (rlops/constants.py, POLICY_ROWS): the statistics
// kernel writes the first kStatsRows, the policy loss all kPolicyRows; the last three are the
// upstream gradients (d loss / d logp, entropy, exact KL) that the backward reads. The
// log-sum-exp is stored as its parts max and log_sum, the reference's as lse_gap = lse - lse_ref
// (rlops/constants.py says why).
enum OutRow : int {
  kRowLogp = 0, kRowEntropy = 1, kRowKl = 2, kRowMax = 3, kRowLogSum = 4, kRowLseGap = 5,
  kRowRatio = 6, kRowLoss = 7, kRowGLogp = 8, kRowGEntropy = 9, kRowGKl = 10,
  kStatsRows = 6, kPolicyRows = 11, kGradRows = 3
};

RLOPS_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // ex2.approx, as Triton's tl.exp
#else
  return expf(x);
#endif
}

// Online softmax statistics of one row of z = x / tau, as a mergeable state, in the logits'
// own units: only differences from the max are scaled, since x - m is exact near the max and
// x / tau would round by ~3e-5 at |x / tau| ~ 1e3. m the running max of x, s = sum exp((x - m)
// scale), t = sum exp((x - m) scale) (x - m); t is kept relative to m so that the entropy
// log(s) - scale t / s has no cancellation between lse and E[z]. With a reference row y: mr, sr
// = its max and sum exp((y - mr) scale), c = sum exp((x - m) scale) (x - y). scale = 1 / tau
// travels with the state (it is not merged).
struct RowState {
  float m, s, t, mr, sr, c, scale;
};

RLOPS_HD RowState empty_state(float scale) { return RowState{kLowest, 0.f, 0.f, kLowest, 0.f, 0.f, scale}; }

// Rescales st to the new maxima m_new (policy) and mr_new (reference, with HAS_REF).
template <bool HAS_REF>
RLOPS_HD void rescale(RowState& st, float m_new, float mr_new) {
  float shift = st.m - m_new;
  float alpha = exp_(shift * st.scale);
  // s == 0 means nothing seen yet; shift may then be -inf and shift * s would be NaN.
  st.t = alpha * (st.t + (st.s > 0.f ? shift * st.s : 0.f));
  st.s *= alpha;
  st.m = m_new;
  if (HAS_REF) {
    st.c *= alpha;
    st.sr *= exp_((st.mr - mr_new) * st.scale);
    st.mr = mr_new;
  }
}

// Adds K logits x (and reference logits y when HAS_REF), as loaded (not divided by tau).
template <int K, bool HAS_REF>
RLOPS_HD void add(RowState& st, const float* x, const float* y) {
  float m_new = st.m, mr_new = st.mr;
RLOPS_UNROLL
  for (int i = 0; i < K; ++i) {
    m_new = fmaxf(m_new, x[i]);
    if (HAS_REF) mr_new = fmaxf(mr_new, y[i]);
  }
  rescale<HAS_REF>(st, m_new, mr_new);
RLOPS_UNROLL
  for (int i = 0; i < K; ++i) {
    float xm = x[i] - m_new;
    float e = exp_(xm * st.scale);
    st.s += e;
    // -inf logits have e = 0 and xm = -inf: they add 0, not NaN.
    if (e > 0.f) {
      st.t += e * xm;
      if (HAS_REF) st.c += e * (x[i] - y[i]);
    }
    if (HAS_REF) st.sr += exp_((y[i] - mr_new) * st.scale);
  }
}

// The state of the union of two disjoint sets of elements.
template <bool HAS_REF>
RLOPS_HD RowState merge(RowState a, RowState b) {
  float m = fmaxf(a.m, b.m), mr = fmaxf(a.mr, b.mr);
  rescale<HAS_REF>(a, m, mr);
  rescale<HAS_REF>(b, m, mr);
  return RowState{m, a.s + b.s, a.t + b.t, a.mr, a.sr + b.sr, a.c + b.c, a.scale};
}

// Per-row statistics (the stats rows but logp): lse = m / tau + log_s kept as its parts, and
// lse_gap = lse - lse_ref formed from parts, so that neither carries the rounding of a
// log-sum-exp at the logits' magnitude; KL(p || q) = scale c / s - lse_gap.
struct RowStats {
  float m, log_s, entropy, lse_gap, kl;
};

RLOPS_HD RowStats finish(const RowState& st, bool has_ref) {
  float log_s = logf(st.s);
  RowStats r{st.m, log_s, log_s - st.scale * st.t / st.s, 0.f, 0.f};
  if (has_ref) {
    r.lse_gap = (st.m - st.mr) * st.scale + (log_s - logf(st.sr));
    r.kl = st.scale * st.c / st.s - r.lse_gap;
  }
  return r;
}

// log p of a token whose logit is x: (x - m) / tau - log_s, with x - m exact near the max.
RLOPS_HD float token_logp(float x, float inv_tau, const RowStats& r) { return (x - r.m) * inv_tau - r.log_s; }

// The clipped policy loss of one token from its log-prob, entropy and exact KL (SPEC 2-3).
struct PolicyParams {
  float clip_low, clip_high, dual_clip, kl_coef;  // dual_clip = inf disables the cap
  int kl_kind;
  bool has_old, has_isw, has_ent, kl_ratio;
  int objective;  // Objective
  // ratio_cap = inf: no cap; the objective's parameters for A > 0 and A <= 0 (SAPO's gate
  // temperatures, DRO's beta)
  float ratio_cap, param_pos, param_neg;
};

struct TokenInputs {
  float w;      // aggregation weight (0 = masked)
  float ent_w;  // entropy coefficient times the token's weight in the entropy term
  float adv, old_logp, ref_logp, isw;
};

// The epilogue's rows of the policy kernel's output (and kRowKl; the others are row statistics).
struct PolicyOut {
  float kl, ratio, loss, g_logp, g_entropy, g_kl;
};

// x clamped to [lo, hi], NaN kept NaN (fminf/fmaxf alone would turn a NaN into a bound).
RLOPS_HD float clampf(float x, float lo, float hi) { return x != x ? x : fminf(fmaxf(x, lo), hi); }

// DPPO's trust region (verl's dppo_tv / dppo_kl): 1 where the token's probability moved less than
// the bound on the side its advantage pushes it, else 0 (NaN in: NaN out).
RLOPS_HD float dppo_valid(float logp, float old_logp, float adv, const PolicyParams& p) {
  float prob = exp_(logp), prob_old = exp_(old_logp);
  bool valid;
  if (p.objective == kDppoKl) {
    // KL between Bernoulli(p_old) and Bernoulli(p), verl's 1e-8 kept for equal arithmetic.
    float kl = prob_old * (old_logp - logp) + (1.f - prob_old) * logf((1.f - prob_old + 1e-8f) / (1.f - prob + 1e-8f));
    valid = adv > 0.f ? (kl <= p.clip_high || prob <= prob_old) : (kl <= p.clip_low || prob >= prob_old);
  } else {
    valid = adv > 0.f ? prob - prob_old <= p.clip_high : prob - prob_old >= -p.clip_low;
  }
  return (logp != logp || old_logp != old_logp) ? logp + old_logp : (valid ? 1.f : 0.f);
}

RLOPS_HD PolicyOut policy_token(float logp, float entropy, float kl_full, const TokenInputs& in,
                                const PolicyParams& p) {
  // Importance ratio; torch.clamp passes the gradient at the bounds, so the same here. On
  // policy, old = logp.detach(): the difference is 0, or NaN for a NaN logp (SPEC: NaN in, NaN out).
  float old_logp = p.has_old ? in.old_logp : logp;
  float diff = p.has_old ? logp - old_logp : (logp == logp ? 0.f : logp);
  float log_r = clampf(diff, -kLogRatioClamp, kLogRatioClamp);
  float d_log_r = (diff >= -kLogRatioClamp && diff <= kLogRatioClamp) ? 1.f : 0.f;
  float ratio = exp_(log_r);

  float pg, d_pg;
  if (p.objective == kCispo) {
    // -sg(clamp(r)) * A * logp: the weight carries no gradient, logp does.
    float weight = clampf(ratio, 1.f - p.clip_low, 1.f + p.clip_high);
    pg = -in.adv * weight * logp;
    d_pg = -in.adv * weight;
  } else if (p.objective == kSapo) {
    float tau = in.adv > 0.f ? p.param_pos : p.param_neg;
    float gate = 1.f / (1.f + exp_(-tau * (ratio - 1.f)));
    pg = -in.adv * gate * (4.f / tau);
    d_pg = -in.adv * 4.f * gate * (1.f - gate) * ratio * d_log_r;
  } else if (p.objective == kReinforce) {
    pg = -in.adv * logp;
    d_pg = -in.adv;
  } else if (p.objective == kDro) {
    // -(A logp - beta/2 (logp - old)^2), the log-ratio unclamped as verl's.
    float d_old = logp - old_logp;
    pg = -(in.adv * logp - 0.5f * p.param_pos * d_old * d_old);
    d_pg = -in.adv + p.param_pos * d_old;
  } else if (p.objective == kDppoTv || p.objective == kDppoKl) {
    // -A sg(min(r, ratio_cap)) logp inside the trust region, 0 outside.
    float weight = clampf(ratio, 0.f, p.ratio_cap) * dppo_valid(logp, old_logp, in.adv, p);
    pg = -in.adv * weight * logp;
    d_pg = -in.adv * weight;
  } else {
    // Clipped surrogate: the gradient flows through the larger branch (the unclipped one on a
    // tie), each passing it where its clamp does not bind. The unclipped ratio is capped at
    // ratio_cap (inf: no cap); below the cap the clipped branch can be the larger one.
    float pg_unclipped = -in.adv * clampf(ratio, 0.f, p.ratio_cap);
    float pg_clipped = -in.adv * clampf(ratio, 1.f - p.clip_low, 1.f + p.clip_high);
    pg = fmaxf(pg_unclipped, pg_clipped);
    bool passes = pg_unclipped >= pg_clipped ? ratio <= p.ratio_cap
                                             : ratio >= 1.f - p.clip_low && ratio <= 1.f + p.clip_high;
    d_pg = (passes ? -in.adv * ratio : 0.f) * d_log_r;
    float cap = -in.adv * p.dual_clip;
    if (in.adv < 0.f && pg > cap) {
      pg = cap;
      d_pg = 0.f;
    }
  }
  if (p.has_isw) {
    pg *= in.isw;
    d_pg *= in.isw;
  }

  // KL to the reference from the sampled token's log-probs (d = ref_logp - logp).
  float kl = kl_full, d_kl = 0.f;
  float d = in.ref_logp - logp;
  if (p.kl_kind == kK1 || p.kl_kind == kK1St) {
    kl = -d;
    d_kl = 1.f;
  } else if (p.kl_kind == kK2) {
    kl = 0.5f * d * d;
    d_kl = -d;
  } else if (p.kl_kind == kK3 || p.kl_kind == kK3St) {
    float dc = clampf(d, -kLogRatioClamp, kLogRatioClamp);
    float exp_dc = exp_(dc);
    float raw = exp_dc - dc - 1.f;
    kl = raw != raw ? raw : fminf(raw, kK3Max);
    bool live = d >= -kLogRatioClamp && d <= kLogRatioClamp && raw <= kK3Max;
    d_kl = live ? 1.f - exp_dc : 0.f;
  } else if (p.kl_kind == kKAbs || p.kl_kind == kKAbsSt) {
    kl = fabsf(d);
    d_kl = d < 0.f ? 1.f : (d > 0.f ? -1.f : 0.f);  // torch.abs: gradient 0 at 0
  } else if (p.kl_kind == kKlNone) {
    kl = 0.f;
  }
  if (p.kl_kind == kK1St || p.kl_kind == kK3St || p.kl_kind == kKAbsSt) {
    d_kl = -d;  // straight through: the value above, the gradient of k2 = (logp - ref_logp)^2 / 2
  }

  float kl_term = kl, kl_scale = 1.f;
  if (p.kl_ratio && p.kl_kind != kKlNone) {
    // DeepSeek-V3.2's unbiased KL: d(kl * r)/d logp = r * d kl/d logp + kl * r * d log_r/d logp
    d_kl = ratio * d_kl + kl * ratio * d_log_r;
    kl_scale = ratio;
    kl_term = kl * ratio;
  }
  PolicyOut o;
  o.kl = kl;  // the KL itself: the exact KL's gradient p (log p - log q - KL) needs it
  o.ratio = ratio;
  o.loss = in.w * (pg + p.kl_coef * kl_term);
  o.g_entropy = p.has_ent ? -in.ent_w : 0.f;
  o.loss += o.g_entropy * entropy;
  o.g_logp = in.w * (d_pg + p.kl_coef * d_kl);
  o.g_kl = p.kl_kind == kKlFull ? in.w * p.kl_coef * kl_scale : 0.f;
  return o;
}

// What the backward needs of one row: its statistics, the upstream gradients of logp, entropy
// and the exact KL already divided by tau (gl, ge, gk), q = lse_gap + KL, and whether all three
// gradients are 0 (a masked token: zeros, without reading its logits).
struct GradRow {
  RowStats stats;
  float gl, ge, gk, q, inv_tau;
  bool zero;
};

RLOPS_HD GradRow grad_row(const RowStats& s, float g_logp, float g_entropy, float g_kl, float inv_tau) {
  return GradRow{s, g_logp * inv_tau, g_entropy * inv_tau, g_kl * inv_tau, s.lse_gap + s.kl, inv_tau,
                 g_logp == 0.f && g_entropy == 0.f && g_kl == 0.f};
}

// log p + H where a probability underflows to 0 at most this low: p * coef stays 0 for a -inf
// logit (not 0 * -inf = NaN), and nothing changes where p > 0, since there log p > -104.
constexpr float kLogPFloor = -1.0e4f;

// d/dx of g_logp * logp + g_entropy * H + g_kl * KL(p || q) at one logit x (z = x / tau):
//   (g_logp (1[v == a] - p) - g_entropy p (log p + H) + g_kl p (log p - log q - KL)) / tau
// with log p - log q = (x - y) / tau - lse_gap; x and y as loaded (not divided by tau).
template <bool HAS_REF>
RLOPS_HD float logit_grad(float x, float y, bool is_token, const GradRow& g) {
  const float log_p = token_logp(x, g.inv_tau, g.stats);
  const float p = exp_(log_p);
  float coef = g.gl + g.ge * fmaxf(log_p + g.stats.entropy, kLogPFloor);
  // Where a logit is -inf, p = 0: its term is 0, not 0 * (-inf - -inf) = NaN.
  if (HAS_REF) coef -= g.gk * ((p > 0.f ? (x - y) * g.inv_tau : 0.f) - g.q);
  return (is_token ? g.gl : 0.f) - p * coef;
}

// GAE (SPEC 5) as two reverse linear recurrences h_t = b_t + a_t h_{t+1}; an affine map per
// step, composed associatively so that a block of threads scans them in parallel.
struct Affine {
  float a, b;
};

RLOPS_HD Affine identity_map() { return Affine{1.f, 0.f}; }

// The map that applies `right` (the later time steps) first, then `left`.
RLOPS_HD Affine then(const Affine& right, const Affine& left) {
  return Affine{left.a * right.a, left.b + left.a * right.b};
}

RLOPS_HD float apply(const Affine& f, float h) { return f.b + f.a * h; }

// E_t = m_{t+1} V_{t+1} + (1 - m_{t+1}) E_{t+1}: the value at the next valid position.
RLOPS_HD Affine next_value_map(bool valid_next, float value_next) {
  return valid_next ? Affine{0.f, value_next} : Affine{1.f, 0.f};
}

// A_t = m_t (delta_t + gamma lam A_{t+1}) + (1 - m_t) A_{t+1}.
RLOPS_HD Affine advantage_map(bool valid, float delta, float gamma_lam) {
  return valid ? Affine{gamma_lam, delta} : Affine{1.f, 0.f};
}

// One thread's K consecutive steps of a GAE tile, in four phases around two block scans.
// valid[0..K] and value[0..K] hold the thread's steps plus the step after its last one.

// Phase 1: the composed map of the thread's steps for E.
template <int K>
RLOPS_HD Affine gae_value_map(const bool* valid, const float* value) {
  Affine own = identity_map();
  RLOPS_UNROLL
  for (int j = K - 1; j >= 0; --j) own = then(own, next_value_map(valid[j + 1], value[j + 1]));
  return own;
}

// Phase 2: given E after the thread's last step (e_after), the TD errors delta_t.
template <int K>
RLOPS_HD void gae_deltas(float e_after, const bool* valid, const float* value, const float* reward, float gamma,
                         float* delta) {
  float h = e_after;
  RLOPS_UNROLL
  for (int j = K - 1; j >= 0; --j) {
    h = apply(next_value_map(valid[j + 1], value[j + 1]), h);
    delta[j] = reward[j] + gamma * h - value[j];
  }
}

// Phase 3: the composed map of the thread's steps for A.
template <int K>
RLOPS_HD Affine gae_advantage_map(const bool* valid, const float* delta, float gamma_lam) {
  Affine own = identity_map();
  RLOPS_UNROLL
  for (int j = K - 1; j >= 0; --j) own = then(own, advantage_map(valid[j], delta[j], gamma_lam));
  return own;
}

// Phase 4: given A after the thread's last step (a_after), advantages and returns (0 where masked).
template <int K>
RLOPS_HD void gae_outputs(float a_after, const bool* valid, const float* value, const float* delta,
                          float gamma_lam, float* adv, float* ret) {
  float h = a_after;
  RLOPS_UNROLL
  for (int j = K - 1; j >= 0; --j) {
    h = apply(advantage_map(valid[j], delta[j], gamma_lam), h);
    adv[j] = valid[j] ? h : 0.f;
    ret[j] = valid[j] ? h + value[j] : 0.f;
  }
}

}  // namespace rlops
