// Log-probs and entropy from logits on CPU, and the per-tile epilogues of the fused linear ops.
//
//   z = x / t, lse = logsumexp(z), logp = z[y] - lse, H = lse - sum_j p_j z_j
//   dx_j = (g (onehot(y)_j - p_j) - gH p_j (log p_j + H)) / t
//
// A row is read twice in the forward (its max, then the sums of exp relative to it; a 32k-vocab
// fp32 row stays in L2 between the two) and once in the backward, which writes dx over x.
// The epilogues work on a [rows, cols] tile of the logits that a GEMM has just written:
// `lse_tile_update_` merges the tile into running (max, sum exp, sum exp * z) per row, and
// `dlogits_` is the backward for a tile starting at column col0. `grpo_epilogue_` is the whole
// per-chunk step of the fused linear GRPO op on full-vocab rows: log-prob, entropy, the GRPO token
// terms and the loss's gradient written over the logits, one call per chunk.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "common.h"

namespace racro_fast {
namespace {

using at::Tensor;

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// Online sums of one row of `n` logits (times 1/t): the max m, s = sum exp(z - m) and, with
// entropy, a = sum exp(z - m) (z - m) (-inf logits add nothing); zy = z at column y - col0 when
// it falls in the row, else 0.
struct RowSums {
  float m, s, a, zy;
};

template <typename S>
RowSums row_sums(const S* x, int64_t n, float inv_t, int64_t yc, bool entropy) {
  float m = kMaxFloor;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = maxf(m, to_f(x[j]) * inv_t);
  float s = 0.0f, a = 0.0f;
  if (entropy) {
#pragma omp simd reduction(+ : s, a)
    for (int64_t j = 0; j < n; ++j) {
      const float zc = to_f(x[j]) * inv_t - m;
      const float e = exp_f(zc);
      s += e;
      a += e > 0.0f ? e * zc : 0.0f;
    }
  } else {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_f(to_f(x[j]) * inv_t - m);
  }
  const float zy = (yc >= 0 && yc < n) ? to_f(x[yc]) * inv_t : 0.0f;
  return {m, s, a, zy};
}

// x[j] <- (g (onehot(y)_j - p_j) - gH p_j (log p_j + H)) / t for one row, log p_j = x_j / t - lse.
template <typename S>
void row_dlogits(S* x, int64_t n, float inv_t, int64_t yc, float lse, float H, float g, float gH, bool entropy) {
  const float gt = g * inv_t, gHt = gH * inv_t;
  if (entropy) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float lp = to_f(x[j]) * inv_t - lse;
      const float p = exp_f(lp);
      x[j] = static_cast<S>(-p * gt - (p > 0.0f ? gHt * p * (lp + H) : 0.0f));
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = static_cast<S>(-exp_f(to_f(x[j]) * inv_t - lse) * gt);
  }
  if (yc >= 0 && yc < n) x[yc] = static_cast<S>(to_f(x[yc]) + gt);
}

void check_rows(const Tensor& x, const Tensor& y, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.stride(1) == 1, name, " must be a [rows, cols] CPU tensor "
              "with contiguous rows");
  TORCH_CHECK(y.dim() == 1 && y.size(0) == x.size(0) && y.scalar_type() == at::kLong, "targets must be int64 [",
              x.size(0), "]");
}

// (logp, lse, entropy or undefined), fp32 [N]; y < 0 marks an ignored row (logp and entropy 0).
std::tuple<Tensor, Tensor, Tensor> logprob_fwd(const Tensor& logits, const Tensor& y, double t, bool with_entropy) {
  check_rows(logits, y, "logits");
  const int64_t N = logits.size(0), V = logits.size(1), ld = logits.stride(0);
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  Tensor H = with_entropy ? at::empty({N}, opts) : Tensor();
  const int64_t* Y = y.data_ptr<int64_t>();
  float *LP = logp.data_ptr<float>(), *LSE = lse.data_ptr<float>(), *HP = with_entropy ? H.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "logprob_fwd", [&] {
    const scalar_t* X = logits.data_ptr<scalar_t>();
    for_rows(N, row_grain(V), [&](int64_t i) {
      const RowSums r = row_sums(X + i * ld, V, inv_t, Y[i], with_entropy);
      const float log_s = std::log(r.s);
      LSE[i] = r.m + log_s;
      LP[i] = Y[i] >= 0 ? r.zy - LSE[i] : 0.0f;
      if (HP) HP[i] = Y[i] >= 0 ? log_s - r.a / r.s : 0.0f;
    });
  });
  return {logp, lse, H};
}

// Backward of a [rows, cols] logits tile starting at vocab column col0, written over the tile.
// g and gH are dL/dlogp and dL/dH per row (zero them on ignored rows); H and gH may be absent.
void dlogits_(const Tensor& x, const Tensor& y, int64_t col0, double t, const Tensor& lse,
              const c10::optional<Tensor>& H, const Tensor& g, const c10::optional<Tensor>& gH) {
  check_rows(x, y, "logits");
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0);
  const bool ent = H.has_value() && H->defined() && gH.has_value() && gH->defined();
  const Tensor lse_c = lse.to(at::kFloat).contiguous(), g_c = g.to(at::kFloat).contiguous();
  const Tensor H_c = ent ? H->to(at::kFloat).contiguous() : Tensor();
  const Tensor gH_c = ent ? gH->to(at::kFloat).contiguous() : Tensor();
  const int64_t* Y = y.data_ptr<int64_t>();
  const float *LSE = lse_c.data_ptr<float>(), *G = g_c.data_ptr<float>();
  const float *HP = ent ? H_c.data_ptr<float>() : nullptr, *GH = ent ? gH_c.data_ptr<float>() : nullptr;
  const float inv_t = static_cast<float>(1.0 / t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dlogits_", [&] {
    scalar_t* X = x.data_ptr<scalar_t>();
    for_rows(N, row_grain(V), [&](int64_t i) {
      row_dlogits(X + i * ld, V, inv_t, Y[i] >= 0 ? Y[i] - col0 : -1, LSE[i], ent ? HP[i] : 0.0f, G[i],
                  ent ? GH[i] : 0.0f, ent);
    });
  });
}

// Merge a [rows, cols] tile of logits (vocab columns col0..) into the running per-row m, s, a
// (a may be absent: no entropy) and zy. Start with m = -3e38, s = a = zy = 0.
void lse_tile_update_(const Tensor& x, const Tensor& y, int64_t col0, double t, const Tensor& m, const Tensor& s,
                      const c10::optional<Tensor>& a, const Tensor& zy) {
  check_rows(x, y, "logits");
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0);
  const bool ent = a.has_value() && a->defined();
  for (const Tensor* o : {&m, &s, &zy}) {
    TORCH_CHECK(o->scalar_type() == at::kFloat && o->is_contiguous() && o->numel() == N, "running sums must be "
                "contiguous fp32 [", N, "]");
  }
  float *M = m.data_ptr<float>(), *Sp = s.data_ptr<float>(), *ZY = zy.data_ptr<float>();
  float* A = ent ? a->data_ptr<float>() : nullptr;
  const int64_t* Y = y.data_ptr<int64_t>();
  const float inv_t = static_cast<float>(1.0 / t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lse_tile_update_", [&] {
    const scalar_t* X = x.data_ptr<scalar_t>();
    for_rows(N, row_grain(V), [&](int64_t i) {
      const int64_t yc = Y[i] >= 0 ? Y[i] - col0 : -1;
      const RowSums r = row_sums(X + i * ld, V, inv_t, yc, ent);
      const float M_new = maxf(M[i], r.m);
      const float c_old = exp_f(M[i] - M_new), c_new = exp_f(r.m - M_new);
      if (ent) A[i] = c_old * (A[i] + (M[i] - M_new) * Sp[i]) + c_new * (r.a + (r.m - M_new) * r.s);
      Sp[i] = c_old * Sp[i] + c_new * r.s;
      M[i] = M_new;
      if (yc >= 0 && yc < V) ZY[i] = r.zy;
    });
  });
}

// The fused linear GRPO op's per-chunk epilogue over full-vocab rows x [rows, V] (h W^T, not yet
// divided by t). Per row: logp and H, the GRPO token terms against old (absent: logp itself), ref,
// the advantage adv (IS weight folded in) and the token's loss weight w (0 on ignored rows), and
// the loss's gradient d(sum_n w_n l_n)/dx written over x. Returns [rows, 8] fp32 per-row terms:
// w l, w pg, clipped, kl, ratio, H, logp, valid.
Tensor grpo_epilogue_(const Tensor& x, const Tensor& y, double t, const c10::optional<Tensor>& old,
                      const c10::optional<Tensor>& ref, const Tensor& adv, const Tensor& w, double clip_low,
                      double clip_high, double dual_clip, double kl_coef, int64_t kl_type, double entropy_coef) {
  check_rows(x, y, "logits");
  const int64_t N = x.size(0), V = x.size(1), ld = x.stride(0);
  auto f32 = [](const Tensor& v) { return v.to(at::kFloat).contiguous(); };
  const bool has_old = old.has_value() && old->defined(), has_ref = ref.has_value() && ref->defined();
  const GRPOParams p = grpo_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, has_ref);
  const Tensor old_c = has_old ? f32(*old) : Tensor(), ref_c = has_ref ? f32(*ref) : Tensor();
  const Tensor adv_c = f32(adv), w_c = f32(w);
  const float *O = has_old ? old_c.data_ptr<float>() : nullptr, *R = has_ref ? ref_c.data_ptr<float>() : nullptr;
  const float *A = adv_c.data_ptr<float>(), *W = w_c.data_ptr<float>();
  const int64_t* Y = y.data_ptr<int64_t>();
  Tensor terms = at::zeros({N, 8}, x.options().dtype(at::kFloat));
  float* TR = terms.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grpo_epilogue_", [&] {
    scalar_t* X = x.data_ptr<scalar_t>();
    for_rows(N, row_grain(V), [&](int64_t i) {
      scalar_t* row = X + i * ld;
      const bool valid = Y[i] >= 0;
      const RowSums r = row_sums(row, V, inv_t, Y[i], true);
      const float log_s = std::log(r.s), lse = r.m + log_s;
      const float logp = valid ? r.zy - lse : 0.0f, H = valid ? log_s - r.a / r.s : 0.0f;
      const TokenTerms tt = token_terms(logp, O ? O[i] : logp, R ? R[i] : 0.0f, A[i], p);
      const float wi = valid ? W[i] : 0.0f;
      row_dlogits(row, V, inv_t, valid ? Y[i] : -1, lse, H, wi * tt.dx, -p.ent_coef * wi, true);
      float* o = TR + i * 8;
      if (valid) {
        o[0] = wi * (tt.loss - p.ent_coef * H), o[1] = wi * tt.pg, o[2] = tt.clipped, o[3] = tt.kl;
        o[4] = tt.ratio, o[5] = H, o[6] = logp, o[7] = 1.0f;
      }
    });
  });
  return terms;
}

}  // namespace

TORCH_LIBRARY_IMPL(racro_fast, CPU, m) {
  m.impl("logprob_fwd", &logprob_fwd);
  m.impl("dlogits_", &dlogits_);
  m.impl("lse_tile_update_", &lse_tile_update_);
  m.impl("grpo_epilogue_", &grpo_epilogue_);
}

}  // namespace racro_fast
