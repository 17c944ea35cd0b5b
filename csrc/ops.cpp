// torch.ops.rlops_cuda.*: the CUDA kernels as PyTorch operators (TORCH_LIBRARY), so they run
// on the caller's stream and can sit inside torch.compile graphs. Each op takes the arguments
// that its Triton twin's launcher in kernels/ computes (row layouts, flags, floats) and writes
// into output tensors the caller allocated. The checks here guard against a call that would
// read or write out of bounds; argument validation for users is in rlops/_validation.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "launch.h"
#include "rlops_math.h"

namespace rlops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Dtype dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    case at::kDouble:
      return Dtype::kFloat64;
    default:
      TORCH_CHECK(false, "rlops_cuda: logits must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  }
}

void check_on(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "rlops_cuda: ", name, " must be on ", x.device());
}

// A contiguous per-row vector of at least `n` elements of `dtype`.
template <typename T>
T* vec(const Tensor& t, const Tensor& x, at::ScalarType dtype, int64_t n, const char* name) {
  check_on(t, x, name);
  TORCH_CHECK(t.scalar_type() == dtype, "rlops_cuda: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.numel() >= n, "rlops_cuda: ", name, " must be contiguous with >= ", n,
              " elements");
  return static_cast<T*>(t.data_ptr());
}

template <typename T>
T* opt_vec(const OptTensor& t, const Tensor& x, at::ScalarType dtype, int64_t n, const char* name) {
  return t.has_value() ? vec<T>(*t, x, dtype, n, name) : nullptr;
}

// The last element a row layout reaches must lie inside the tensor's storage.
Rows rows_of(const Tensor& t, const Tensor& x, int64_t n_rows, int64_t vocab, int64_t inner, int64_t stride_outer,
             int64_t stride_inner, const char* name) {
  check_on(t, x, name);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rlops_cuda: ", name, " must have the logits' dtype");
  TORCH_CHECK(inner >= 1 && stride_outer >= 0 && stride_inner >= 0, "rlops_cuda: bad row layout for ", name);
  if (n_rows > 0) {
    int64_t last = ((n_rows - 1) / inner) * stride_outer + (std::min(n_rows, inner) - 1) * stride_inner + vocab;
    int64_t available = static_cast<int64_t>(t.storage().nbytes() / t.element_size()) - t.storage_offset();
    TORCH_CHECK(last <= available, "rlops_cuda: the row layout of ", name, " runs past its storage");
  }
  return Rows{t.data_ptr(), inner, stride_outer, stride_inner};
}

void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

void check_grid(int64_t n_rows) {
  TORCH_CHECK(n_rows <= 0x7fffffff, "rlops_cuda: at most 2**31 - 1 rows per launch, got ", n_rows);
}

// The arguments the forward and backward launches share: the logits' and reference's rows,
// the token ids, the sizes and 1 / temperature.
template <typename Args>
void set_rows(Args& a, const Tensor& x, const OptTensor& ref, const Tensor& tokens, int64_t n_rows, int64_t vocab,
              int64_t inner, int64_t stride_outer, int64_t stride_inner, int64_t ref_inner, int64_t ref_stride_outer,
              int64_t ref_stride_inner, double inv_tau) {
  check_grid(n_rows);
  a.dtype = dtype_of(x);
  a.x = rows_of(x, x, n_rows, vocab, inner, stride_outer, stride_inner, "logits");
  a.has_ref = ref.has_value();
  a.ref = a.has_ref ? rows_of(*ref, x, n_rows, vocab, ref_inner, ref_stride_outer, ref_stride_inner, "ref_logits")
                    : a.x;
  a.tokens = vec<const int64_t>(tokens, x, at::kLong, n_rows, "tokens");
  a.n_rows = n_rows;
  a.vocab = vocab;
  a.inv_tau = static_cast<float>(inv_tau);
}

void token_stats_fwd(const Tensor& x, const OptTensor& ref, const Tensor& tokens, const OptTensor& mask,
                     const Tensor& out, int64_t n_rows, int64_t vocab, int64_t inner, int64_t stride_outer,
                     int64_t stride_inner, int64_t ref_inner, int64_t ref_stride_outer, int64_t ref_stride_inner,
                     double inv_tau) {
  const c10::cuda::CUDAGuard guard(x.device());
  StatsFwdArgs a{};
  set_rows(a, x, ref, tokens, n_rows, vocab, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer,
           ref_stride_inner, inv_tau);
  a.mask = opt_vec<const uint8_t>(mask, x, at::kByte, n_rows, "mask");
  a.out = vec<float>(out, x, at::kFloat, kStatsRows * n_rows, "out");
  check_launch(launch_stats_fwd(a, c10::cuda::getCurrentCUDAStream()));
}

void policy_loss_fwd(const Tensor& x, const OptTensor& ref, const Tensor& tokens, const Tensor& weights,
                     const OptTensor& ent_weights, const Tensor& adv, const OptTensor& old_logp,
                     const OptTensor& ref_logp, const OptTensor& isw, const Tensor& out, int64_t n_rows,
                     int64_t vocab, int64_t inner, int64_t stride_outer, int64_t stride_inner, int64_t ref_inner,
                     int64_t ref_stride_outer, int64_t ref_stride_inner, double inv_tau, double clip_low,
                     double clip_high, double dual_clip, double kl_coef, int64_t kl_kind, bool kl_ratio,
                     int64_t objective, double ratio_cap, double param_pos, double param_neg) {
  TORCH_CHECK(objective >= kClip && objective <= kDppoKl, "rlops_cuda: objective must be 0-6, got ", objective);
  TORCH_CHECK(kl_kind >= kKlNone && kl_kind <= kKAbsSt, "rlops_cuda: kl_kind must be 0-8, got ", kl_kind);
  TORCH_CHECK((kl_kind == kKlFull) == ref.has_value(), "rlops_cuda: ref_logits is needed exactly when kl_kind is 4");
  TORCH_CHECK(kl_kind == kKlNone || kl_kind == kKlFull || ref_logp.has_value(),
              "rlops_cuda: the sampled-token kl_kinds (1-3, 5-8) need ref_logprobs");
  const c10::cuda::CUDAGuard guard(x.device());
  StatsFwdArgs a{};
  set_rows(a, x, ref, tokens, n_rows, vocab, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer,
           ref_stride_inner, inv_tau);
  a.out = vec<float>(out, x, at::kFloat, kPolicyRows * n_rows, "out");
  a.policy = true;
  a.weights = vec<const float>(weights, x, at::kFloat, n_rows, "weights");
  a.ent_weights = opt_vec<const float>(ent_weights, x, at::kFloat, n_rows, "entropy_weights");
  a.adv = vec<const float>(adv, x, at::kFloat, n_rows, "advantages");
  a.old_logp = opt_vec<const float>(old_logp, x, at::kFloat, n_rows, "old_logprobs");
  a.ref_logp = opt_vec<const float>(ref_logp, x, at::kFloat, n_rows, "ref_logprobs");
  a.isw = opt_vec<const float>(isw, x, at::kFloat, n_rows, "is_weights");
  a.clip_low = static_cast<float>(clip_low);
  a.clip_high = static_cast<float>(clip_high);
  a.dual_clip = static_cast<float>(dual_clip);
  a.kl_coef = static_cast<float>(kl_coef);
  a.kl_kind = static_cast<int>(kl_kind);
  a.kl_ratio = kl_ratio;
  a.objective = static_cast<int>(objective);
  a.ratio_cap = static_cast<float>(ratio_cap);
  a.param_pos = static_cast<float>(param_pos);
  a.param_neg = static_cast<float>(param_neg);
  check_launch(launch_stats_fwd(a, c10::cuda::getCurrentCUDAStream()));
}

void token_stats_bwd(const Tensor& x, const OptTensor& ref, const Tensor& tokens, const Tensor& stats,
                     const Tensor& grads, const Tensor& dx, int64_t n_rows, int64_t vocab, int64_t inner,
                     int64_t stride_outer, int64_t stride_inner, int64_t ref_inner, int64_t ref_stride_outer,
                     int64_t ref_stride_inner, int64_t dx_stride_outer, int64_t dx_stride_inner, double inv_tau) {
  const c10::cuda::CUDAGuard guard(x.device());
  StatsBwdArgs a{};
  set_rows(a, x, ref, tokens, n_rows, vocab, inner, stride_outer, stride_inner, ref_inner, ref_stride_outer,
           ref_stride_inner, inv_tau);
  rows_of(dx, x, n_rows, vocab, inner, dx_stride_outer, dx_stride_inner, "out");  // bounds only
  a.dx = dx.data_ptr();
  a.dx_stride_outer = dx_stride_outer;
  a.dx_stride_inner = dx_stride_inner;
  a.stats = vec<const float>(stats, x, at::kFloat, kStatsRows * n_rows, "stats");
  a.grads = vec<const float>(grads, x, at::kFloat, kGradRows * n_rows, "grads");
  check_launch(launch_stats_bwd(a, c10::cuda::getCurrentCUDAStream()));
}

// Padded: rewards, values, mask, advantages and returns (B, T), unit stride over T. Packed
// (cu_seqlens given): all of them (N,), contiguous, and cu_seqlens int64 (S + 1,); its values
// were checked in Python (the kernel clamps them to [0, N) besides).
void gae(const Tensor& rewards, const Tensor& values, const Tensor& mask, const OptTensor& bootstrap,
         const OptTensor& cu_seqlens, const Tensor& adv, const Tensor& ret, double gamma, double lam) {
  const bool packed = cu_seqlens.has_value();
  TORCH_CHECK(rewards.dim() == (packed ? 1 : 2), "rlops_cuda: rewards must be ", packed ? "(N,)" : "(B, T)");
  const int64_t n_rows = packed ? cu_seqlens->numel() - 1 : rewards.size(0);
  const int64_t n_time = packed ? rewards.size(0) : rewards.size(1);
  TORCH_CHECK(n_rows >= 0, "rlops_cuda: cu_seqlens must have S + 1 >= 1 elements");
  check_grid(n_rows);
  const c10::cuda::CUDAGuard guard(rewards.device());
  for (const Tensor* t : {&values, &mask, &adv, &ret}) {
    TORCH_CHECK(t->sizes() == rewards.sizes(), "rlops_cuda: rewards, values, mask, advantages and returns must "
                                               "share one shape");
  }
  for (const Tensor* t : {&rewards, &values, &mask}) {
    check_on(*t, rewards, "gae input");
    TORCH_CHECK(n_time <= 1 || t->stride(t->dim() - 1) == 1, "rlops_cuda: gae inputs need unit stride over time");
  }
  TORCH_CHECK(rewards.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat,
              "rlops_cuda: rewards and values must be float32");
  TORCH_CHECK(mask.scalar_type() == at::kByte, "rlops_cuda: mask must be uint8");
  GaeArgs a{};
  a.rewards = rewards.data_ptr<float>();
  a.values = values.data_ptr<float>();
  a.mask = mask.data_ptr<uint8_t>();
  a.bootstrap = opt_vec<const float>(bootstrap, rewards, at::kFloat, n_rows, "bootstrap");
  a.cu_seqlens = opt_vec<const int64_t>(cu_seqlens, rewards, at::kLong, n_rows + 1, "cu_seqlens");
  const int64_t n_out = packed ? n_time : n_rows * n_time;
  a.adv = vec<float>(adv, rewards, at::kFloat, n_out, "advantages");
  a.ret = vec<float>(ret, rewards, at::kFloat, n_out, "returns");
  a.n_rows = n_rows;
  a.n_time = n_time;
  a.r_stride = packed ? 0 : rewards.stride(0);
  a.v_stride = packed ? 0 : values.stride(0);
  a.m_stride = packed ? 0 : mask.stride(0);
  a.gamma = static_cast<float>(gamma);
  a.lam = static_cast<float>(lam);
  check_launch(launch_gae(a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY(rlops_cuda, m) {
  m.def(
      "token_stats_fwd(Tensor x, Tensor? ref, Tensor tokens, Tensor? mask, Tensor(a!) out, int n_rows, int vocab, "
      "int inner, int stride_outer, int stride_inner, int ref_inner, int ref_stride_outer, int ref_stride_inner, "
      "float inv_tau) -> ()");
  m.def(
      "policy_loss_fwd(Tensor x, Tensor? ref, Tensor tokens, Tensor weights, Tensor? ent_weights, Tensor adv, "
      "Tensor? old_logp, Tensor? ref_logp, Tensor? isw, Tensor(a!) out, int n_rows, int vocab, int inner, "
      "int stride_outer, int stride_inner, int ref_inner, int ref_stride_outer, int ref_stride_inner, "
      "float inv_tau, float clip_low, float clip_high, float dual_clip, float kl_coef, int kl_kind, "
      "bool kl_ratio, int objective, float ratio_cap, float param_pos, float param_neg) -> ()");
  m.def(
      "token_stats_bwd(Tensor x, Tensor? ref, Tensor tokens, Tensor stats, Tensor grads, Tensor(a!) dx, "
      "int n_rows, int vocab, int inner, int stride_outer, int stride_inner, int ref_inner, int ref_stride_outer, "
      "int ref_stride_inner, int dx_stride_outer, int dx_stride_inner, float inv_tau) -> ()");
  m.def(
      "gae(Tensor rewards, Tensor values, Tensor mask, Tensor? bootstrap, Tensor? cu_seqlens, Tensor(a!) adv, "
      "Tensor(b!) ret, float gamma, float lam) -> ()");
}

TORCH_LIBRARY_IMPL(rlops_cuda, CUDA, m) {
  m.impl("token_stats_fwd", &token_stats_fwd);
  m.impl("policy_loss_fwd", &policy_loss_fwd);
  m.impl("token_stats_bwd", &token_stats_bwd);
  m.impl("gae", &gae);
}

}  // namespace rlops
