// GRPO loss forward and backward on CPU: one pass over each row each way (two for a row whose
// rollout weight is per sequence), every aggregation, KL type, dual-clip, entropy bonus and the
// rollout-mismatch weights, with the metrics of kernels/reference.py grpo_loss_ref and
// rollout_is_weights. Per-row partial sums are reduced in double in row order: deterministic.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace racro_fast {
namespace {

using at::Tensor;

// Row partials of the forward, in this order.
enum Part { kLoss, kPg, kCount, kClipped, kKl, kRatio, kRmin, kRmax, kEnt, kIsK3, kIsW, kIsWmax, kIsClip, kParts };
// Outputs: grpo_loss's metrics (reference.GRPO_METRICS order), 1/D, then rollout_is_weights' metrics.
enum Out { oPg, oClip, oKl, oRmin, oRmean, oRmax, oEnt, oCount, oInvDenom, oIsKl, oIsWmean, oIsWmax, oIsClip, kOut };
enum ISMode { kOff = 0, kTokenTIS = 1, kSeqTIS = 2, kSeqMask = 3 };

struct Inputs {
  Tensor logp, old, ref, ent, rollout, adv, mask;  // old/ref/ent/rollout undefined when absent
  bool adv_per_token;
  int64_t B, T;
};

Inputs prepare(const Tensor& logp, const c10::optional<Tensor>& old, const c10::optional<Tensor>& ref,
               const Tensor& adv, const Tensor& mask, const c10::optional<Tensor>& ent,
               const c10::optional<Tensor>& rollout) {
  TORCH_CHECK(logp.dim() == 2 && logp.device().is_cpu(), "logp must be a [B, T] CPU tensor");
  auto same = [&](const c10::optional<Tensor>& x) {
    return x.has_value() && x->defined() ? x->to(logp.scalar_type()).contiguous() : Tensor();
  };
  Inputs in;
  in.logp = logp.contiguous();
  in.old = same(old);
  in.ref = same(ref);
  in.ent = same(ent);
  in.rollout = rollout.has_value() && rollout->defined() ? rollout->to(at::kFloat).contiguous() : Tensor();
  in.adv = adv.to(at::kFloat).contiguous();
  in.mask = mask.scalar_type() == at::kBool ? mask.contiguous() : mask.ne(0);
  in.adv_per_token = adv.dim() == 2;
  in.B = logp.size(0);
  in.T = logp.size(1);
  return in;
}

// Pointers to one row of every input. Absent inputs point at another row of the same length
// (old and ref at logp, the rollout at the advantages) so that every load in the simd loops is
// unconditional; the KL weights of GRPOParams (0 without ref) and the IS mode say which values count.
template <typename S>
struct Row {
  const S *x, *o, *r, *e;
  const float* q;
  const uint8_t* m;  // the mask's bools as bytes: a bool load does not vectorise beside float stores
};

inline void token_advantages(const float* a, const uint8_t* m, int64_t T, float* aw);
template <typename S>
void rollout_weights(const S* o, const float* q, const uint8_t* m, int64_t T, int mode, float cap,
                     float* __restrict__ aw, float* is_stats);

template <typename S>
struct Rows {
  const S *X, *O, *R, *E;
  const float *Q, *A;
  const uint8_t* M;
  int64_t T;
  bool adv_per_token;

  explicit Rows(const Inputs& in)
      : X(in.logp.data_ptr<S>()),
        O(in.old.defined() ? in.old.data_ptr<S>() : nullptr),
        R(in.ref.defined() ? in.ref.data_ptr<S>() : nullptr),
        E(in.ent.defined() ? in.ent.data_ptr<S>() : nullptr),
        Q(in.rollout.defined() ? in.rollout.data_ptr<float>() : nullptr),
        A(in.adv.data_ptr<float>()),
        M(reinterpret_cast<const uint8_t*>(in.mask.data_ptr<bool>())),
        T(in.T),
        adv_per_token(in.adv_per_token) {}

  // Row b, and its advantages (times the rollout weights) written to aw [T].
  Row<S> row(int64_t b, float* aw, int mode, float cap, float* is_stats) const {
    const int64_t k = b * T;
    const Row<S> row{X + k, O ? O + k : X + k, R ? R + k : X + k, E ? E + k : X + k, Q ? Q + k : aw, M + k};
    if (adv_per_token) {
      token_advantages(A + k, row.m, T, aw);
    } else {
      std::fill(aw, aw + T, A[b]);
    }
    if (mode != kOff) rollout_weights(row.o, row.q, row.m, T, mode, cap, aw, is_stats);
    return row;
  }
};

// The loops below take everything by value: read through a struct or a lambda's captures, their
// settings would be reloaded every iteration and the loop left scalar.
inline void token_advantages(const float* a, const uint8_t* m, int64_t T, float* aw) {
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) aw[t] = m[t] != 0 ? a[t] : 0.0f;
}

// aw *= the truncated importance weights (reference.rollout_is_weights); is_stats gets the row's
// k3 sum, weight sum, weight max and clipped count (tokens, or 1 for a capped / masked sequence).
template <typename S>
void rollout_weights(const S* o, const float* q, const uint8_t* m, int64_t T, int mode, float cap,
                     float* __restrict__ aw, float* is_stats) {
  float dsum = 0.0f;
  if (mode != kTokenTIS) {
#pragma omp simd reduction(+ : dsum)
    for (int64_t t = 0; t < T; ++t) {
      const float d = minf(maxf(to_f(o[t]) - q[t], -20.0f), 20.0f);
      dsum += m[t] != 0 ? d : 0.0f;
    }
  }
  const float raw_seq = exp_f(minf(maxf(dsum, -20.0f), 20.0f));
  const float w_seq = mode == kSeqTIS ? minf(raw_seq, cap) : (raw_seq <= cap ? 1.0f : 0.0f);
  const bool per_token = mode == kTokenTIS;
  float k3 = 0.0f, wsum = 0.0f, wmax = 0.0f, wclip = 0.0f, count = 0.0f;
#pragma omp simd reduction(+ : k3, wsum, wclip, count) reduction(max : wmax)
  for (int64_t t = 0; t < T; ++t) {
    const bool on = m[t] != 0;
    const float dv = minf(maxf(to_f(o[t]) - q[t], -20.0f), 20.0f);
    const float d = on ? dv : 0.0f;
    const float ed = exp_f(d);
    const float w = on ? (per_token ? minf(ed, cap) : w_seq) : 0.0f;
    aw[t] *= w;
    k3 += on ? ed - d - 1.0f : 0.0f;
    wsum += w;
    wmax = maxf(wmax, w);
    wclip += (on & (ed > cap)) ? 1.0f : 0.0f;
    count += on ? 1.0f : 0.0f;
  }
  if (!per_token) wclip = raw_seq > cap && count > 0 ? 1.0f : 0.0f;
  is_stats[0] = k3, is_stats[1] = wsum, is_stats[2] = wmax, is_stats[3] = wclip;
}

// One row's forward partials (out[kLoss..kEnt]).
template <typename S>
void forward_row(const S* x, const S* o, const S* r, const S* e, const uint8_t* m, const float* aw, int64_t T,
                 GRPOParams p, bool has_ent, float* out) {
  float loss = 0, pg = 0, count = 0, clipped = 0, kl = 0, ratio = 0, ent = 0;
  float rmin = kInf, rmax = -kInf;
#pragma omp simd reduction(+ : loss, pg, count, clipped, kl, ratio, ent) reduction(min : rmin) reduction(max : rmax)
  for (int64_t t = 0; t < T; ++t) {
    const bool on = m[t] != 0;
    // padding may hold anything, even NaN: loaded, then replaced
    const float xv = to_f(x[t]), ov = to_f(o[t]), rv = to_f(r[t]), ev = to_f(e[t]);
    const float xt = on ? xv : 0.0f, ot = on ? ov : 0.0f, rt = on ? rv : 0.0f;
    const float et = (on & has_ent) ? ev : 0.0f;
    const TokenTerms tt = token_terms(xt, ot, rt, aw[t], p);
    loss += on ? tt.loss - p.ent_coef * et : 0.0f;
    pg += on ? tt.pg : 0.0f;
    count += on ? 1.0f : 0.0f;
    clipped += on ? tt.clipped : 0.0f;
    kl += on ? tt.kl : 0.0f;
    ratio += on ? tt.ratio : 0.0f;
    ent += et;
    rmin = minf(rmin, on ? tt.ratio : kInf);
    rmax = maxf(rmax, on ? tt.ratio : -kInf);
  }
  out[kLoss] = loss, out[kPg] = pg, out[kCount] = count, out[kClipped] = clipped, out[kKl] = kl;
  out[kRatio] = ratio, out[kRmin] = rmin, out[kRmax] = rmax, out[kEnt] = ent;
}

template <typename S>
void forward_rows(const Inputs& in, const GRPOParams& p, int mode, float cap, float* parts) {
  const Rows<S> rows(in);
  const int64_t T = in.T;
  const bool has_ent = in.ent.defined();
  at::parallel_for(0, in.B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(T);
    float* aw = buf.data();
    for (int64_t b = begin; b < end; ++b) {
      float* out = parts + b * kParts;
      const Row<S> row = rows.row(b, aw, mode, cap, out + kIsK3);
      forward_row(row.x, row.o, row.r, row.e, row.m, aw, T, p, has_ent, out);
    }
  });
}

// u_b of each row (reference.grpo_row_weights_ref) from its token count.
float row_weight(int agg, float count, float inv_norm_len) {
  if (agg == 1) return count > 0 ? 1.0f / count : 0.0f;  // seq-mean-token-mean
  if (agg == 3) return inv_norm_len;                      // seq-mean-token-sum-norm
  return 1.0f;                                            // token-mean, seq-mean-token-sum
}

// Returns (loss [], out [kOut], u [B]). denom < 0: the local count (tokens or sequences by agg).
std::tuple<Tensor, Tensor, Tensor> grpo_loss_fwd(
    const Tensor& logp, const c10::optional<Tensor>& old, const c10::optional<Tensor>& ref, const Tensor& adv,
    const Tensor& mask, const c10::optional<Tensor>& ent, const c10::optional<Tensor>& rollout, double clip_low,
    double clip_high, double dual_clip, double kl_coef, int64_t kl_type, double entropy_coef, int64_t loss_agg,
    double inv_norm_len, int64_t is_mode, double is_cap, double denom) {
  const Inputs in = prepare(logp, old, ref, adv, mask, ent, rollout);
  TORCH_CHECK(is_mode == kOff || in.rollout.defined(), "rollout log-probs are needed for is_mode ", is_mode);
  const GRPOParams p = grpo_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, in.ref.defined());
  std::vector<float> parts(in.B * kParts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logp.scalar_type(), "grpo_loss_fwd", [&] {
    forward_rows<scalar_t>(in, p, static_cast<int>(is_mode), static_cast<float>(is_cap), parts.data());
  });
  Tensor u = at::empty({in.B}, logp.options().dtype(at::kFloat));
  float* U = u.data_ptr<float>();
  double sum[kParts] = {0};
  double rmin = kInf, rmax = -kInf, wmax = 0, seqs = 0, seqs_clipped = 0, loss = 0, pg = 0;
  for (int64_t b = 0; b < in.B; ++b) {
    const float* row = parts.data() + b * kParts;
    U[b] = row_weight(static_cast<int>(loss_agg), row[kCount], static_cast<float>(inv_norm_len));
    loss += static_cast<double>(U[b]) * row[kLoss];
    pg += static_cast<double>(U[b]) * row[kPg];
    for (int k = 0; k < kParts; ++k) sum[k] += row[k];
    rmin = std::min<double>(rmin, row[kRmin]);
    rmax = std::max<double>(rmax, row[kRmax]);
    wmax = std::max<double>(wmax, row[kIsWmax]);
    seqs += row[kCount] > 0;
    seqs_clipped += row[kIsClip] * (row[kCount] > 0);
  }
  const double count = sum[kCount];
  const double D = denom >= 0 ? denom : (loss_agg == 0 ? count : seqs);
  const double inv_denom = D > 0 ? 1.0 / D : 0.0;
  const double inv_count = count > 0 ? 1.0 / count : 0.0;
  Tensor out = at::empty({kOut}, u.options());
  float* o = out.data_ptr<float>();
  o[oPg] = pg * inv_denom;
  o[oClip] = sum[kClipped] * inv_count;
  o[oKl] = sum[kKl] * inv_count;
  o[oRmin] = count > 0 ? rmin : 0.0;
  o[oRmean] = sum[kRatio] * inv_count;
  o[oRmax] = count > 0 ? rmax : 0.0;
  o[oEnt] = sum[kEnt] * inv_count;
  o[oCount] = count;
  o[oInvDenom] = inv_denom;
  o[oIsKl] = sum[kIsK3] / std::max(count, 1.0);
  o[oIsWmean] = sum[kIsW] / std::max(count, 1.0);
  o[oIsWmax] = count > 0 ? wmax : 0.0;
  o[oIsClip] = is_mode == kTokenTIS ? sum[kIsClip] / std::max(count, 1.0) : seqs_clipped / std::max(seqs, 1.0);
  return {at::scalar_tensor(loss * inv_denom, u.options()), out, u};
}

// One row's dlogp (and dentropy) for coef = dL u_b / D.
template <typename S>
void backward_row(const S* x, const S* o, const S* r, const uint8_t* m, const float* aw, int64_t T, GRPOParams p,
                  float coef, S* __restrict__ dx, S* __restrict__ de) {
#pragma omp simd
  for (int64_t t = 0; t < T; ++t) {
    const bool on = m[t] != 0;
    const float xv = to_f(x[t]), ov = to_f(o[t]), rv = to_f(r[t]);
    const float xt = on ? xv : 0.0f, ot = on ? ov : 0.0f, rt = on ? rv : 0.0f;
    const TokenTerms tt = token_terms(xt, ot, rt, aw[t], p);
    dx[t] = static_cast<S>(on ? coef * tt.dx : 0.0f);
  }
  if (de) {
    const float g_ent = -p.ent_coef * coef;
#pragma omp simd
    for (int64_t t = 0; t < T; ++t) de[t] = static_cast<S>(m[t] != 0 ? g_ent : 0.0f);
  }
}

template <typename S>
void backward_rows(const Inputs& in, const GRPOParams& p, int mode, float cap, const float* U, float scale,
                   S* dX, S* dE) {
  const Rows<S> rows(in);
  const int64_t T = in.T;
  at::parallel_for(0, in.B, std::max<int64_t>(1, 16384 / std::max<int64_t>(T, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(T);
    float* aw = buf.data();
    float is_stats[4];
    for (int64_t b = begin; b < end; ++b) {
      const Row<S> row = rows.row(b, aw, mode, cap, is_stats);
      backward_row(row.x, row.o, row.r, row.m, aw, T, p, scale * U[b], dX + b * T, dE ? dE + b * T : nullptr);
    }
  });
}

// Returns (dlogp, dentropy or undefined) for the upstream gradient dloss.
std::tuple<Tensor, Tensor> grpo_loss_bwd(
    const Tensor& dloss, const Tensor& logp, const c10::optional<Tensor>& old, const c10::optional<Tensor>& ref,
    const Tensor& adv, const Tensor& mask, const c10::optional<Tensor>& rollout, const Tensor& u, const Tensor& out,
    double clip_low, double clip_high, double dual_clip, double kl_coef, int64_t kl_type, double entropy_coef,
    int64_t is_mode, double is_cap, bool need_dent) {
  const Inputs in = prepare(logp, old, ref, adv, mask, c10::nullopt, rollout);
  const GRPOParams p = grpo_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, in.ref.defined());
  const float scale = dloss.item<float>() * out[oInvDenom].item<float>();
  Tensor dlogp = at::empty_like(in.logp);
  Tensor dent = need_dent ? at::empty_like(in.logp) : Tensor();
  const Tensor uc = u.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.logp.scalar_type(), "grpo_loss_bwd", [&] {
    backward_rows<scalar_t>(in, p, static_cast<int>(is_mode), static_cast<float>(is_cap), uc.data_ptr<float>(),
                            scale, dlogp.data_ptr<scalar_t>(), need_dent ? dent.data_ptr<scalar_t>() : nullptr);
  });
  return {dlogp, dent};
}

}  // namespace

TORCH_LIBRARY_IMPL(racro_fast, CPU, m) {
  m.impl("grpo_loss_fwd", &grpo_loss_fwd);
  m.impl("grpo_loss_bwd", &grpo_loss_bwd);
}

}  // namespace racro_fast
