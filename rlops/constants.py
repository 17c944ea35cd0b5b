"""Numbers and layouts that the Python backends and the Triton kernels share (SPEC.md 2-3).

Defined once for Python and Triton here; csrc/rlops_math.h defines the C++ twins, and
tests/test_constants.py holds the two equal.
"""

from __future__ import annotations

# SPEC section 2: the token log-ratio is clamped to +-LOG_RATIO_CLAMP, the sequence-level
# (GSPO) log-ratio above at SEQ_LOG_RATIO_MAX. Section 3: k3 is capped at K3_MAX and its
# log-ratio clamped like the token ratio.
LOG_RATIO_CLAMP = 20.0
SEQ_LOG_RATIO_MAX = 10.0
K3_MAX = 10.0

# KL estimators as the kernels' KL_KIND switch: "none" does no KL work, "full" streams the
# reference logits (the exact KL over the vocabulary), the others use the sampled tokens'
# log-probs: k1-k3, abs = |logp - ref_logp| (verl's "abs"), and the straight-through forms
# k1+, k3+, abs+ whose value is the base estimator's and whose gradient is k2's (verl's "+";
# k2+ is k2 itself, so the options map it to k2).
KL_KINDS = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "full": 4, "abs": 5, "k1+": 6, "k3+": 7, "abs+": 8}
SAMPLED_KL = ("k1", "k2", "k3", "abs", "k1+", "k3+", "abs+")

# The per-token policy-gradient term as the kernels' OBJECTIVE switch (docs/objectives.md): PPO's
# clipped surrogate (SPEC 2), CISPO's clipped importance weight times logp, SAPO's soft gate,
# REINFORCE's -A logp (verl's gpg), DRO's quadratic log-ratio penalty, DPPO's trust region by
# total variation or binary KL. COUPLED_OBJECTIVES couple the tokens of a sequence (GMPO, VESPO)
# or of the batch (Clip-Cov, KL-Cov): they run as the O(B*T) epilogue after the fused statistics
# (rlops.objectives), never in the kernels.
OBJECTIVES = {"clip": 0, "cispo": 1, "sapo": 2, "reinforce": 3, "dro": 4, "dppo_tv": 5, "dppo_kl": 6}
COUPLED_OBJECTIVES = ("gmpo", "vespo", "clip_cov", "kl_cov")

# Rows of the float32 per-token output buffers. The token-statistics kernel writes the first
# N_STATS rows; the policy-loss kernel writes all N_POLICY_ROWS: its ratio and loss, then the
# derivatives of the loss with respect to logp, entropy and the exact KL, which are the
# upstream gradients (GRAD_ROWS, in that order) that the backward kernel reads.
# The log-sum-exp of z = x / tau is kept as its two parts, the row's largest logit `max` (in
# the logits' units) and log_sum = log sum exp((x - max) / tau), and the reference's as
# lse_gap = lse - lse_ref formed from parts: at |x / tau| ~ 1e3 a float32 z or lse rounds by
# ~3e-5, and log p = (x - max) / tau - log_sum carries neither rounding.
STATS_ROWS = ("logp", "entropy", "kl", "max", "log_sum", "lse_gap")
POLICY_ROWS = (*STATS_ROWS, "ratio", "loss", "g_logp", "g_entropy", "g_kl")
ROW = {name: i for i, name in enumerate(POLICY_ROWS)}
N_STATS = len(STATS_ROWS)
N_POLICY_ROWS = len(POLICY_ROWS)
N_GRADS = 3  # upstream gradients of logp, entropy and the exact KL
GRADS = slice(ROW["g_logp"], ROW["g_kl"] + 1)  # those rows of the policy-loss output
STAT_GRADS = slice(ROW["logp"], ROW["kl"] + 1)  # the statistics rows that carry a gradient
