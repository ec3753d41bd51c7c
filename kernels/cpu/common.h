// Shared pieces of the CPU kernels: a vectorisable exp, the GRPO token terms and row-parallel loops.
//
// Every loop over a row is written for `#pragma omp simd` (branch-free, selects instead of ifs), so
// the compiler turns it into AVX2 / AVX-512 code; rows are spread over threads with
// at::parallel_for, on the OpenMP runtime torch itself uses (see CMakeLists.txt).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace racro_fast {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Start of a running max: finite, so exp(m_old - m_new) is never exp(-inf + inf) = NaN.
constexpr float kMaxFloor = -3.0e38f;

// min and max as compare-and-select (what minps / maxps do): they vectorise where std::fmin and
// std::fmax do not. A NaN first argument passes through.
inline float minf(float a, float b) { return b < a ? b : a; }
inline float maxf(float a, float b) { return a < b ? b : a; }

// exp(x) in float, within 2 ulp of the correctly rounded value on [-87, 88]; 0 below (those values
// are under 1e-38), +inf above, NaN for NaN. Cephes' range reduction (x = n ln2 + r, |r| <= ln2 / 2)
// and degree-6 polynomial; written without branches or calls so that it vectorises in a simd loop.
__attribute__((always_inline)) inline float exp_f(float x) {
  const float xc = minf(maxf(x, -87.0f), 88.0f);
  const float n = std::rint(xc * 1.44269504088896341f);
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float out = y * __builtin_bit_cast(float, bits);
  out = x < -87.0f ? 0.0f : out;
  out = x > 88.0f ? kInf : out;
  return x != x ? x : out;
}

// Loads in fp32 from any of the kernels' storage types.
inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline double to_f(double x) { return x; }

// The GRPO settings of one call, in the kernels' terms (kernels/grpo_loss.py GRPOLossConfig).
struct GRPOParams {
  float clip_lo;      // 1 - clip_low
  float clip_hi;      // 1 + clip_high
  float dual_c;       // dual-clip bound c; 0 = off
  float beta;         // kl_coef
  float ent_coef;     // entropy_coef
  // 1 for the KL type in use (k1, k2, k3), 0 for the others, all 0 without reference log-probs:
  // the KL is a blend, not a branch (see token_terms)
  float k1, k2, k3;
};

inline GRPOParams grpo_params(double clip_low, double clip_high, double dual_clip, double kl_coef, int64_t kl_type,
                              double entropy_coef, bool has_ref) {
  return {static_cast<float>(1.0 - clip_low), static_cast<float>(1.0 + clip_high), static_cast<float>(dual_clip),
          static_cast<float>(kl_coef), static_cast<float>(entropy_coef), has_ref && kl_type == 1 ? 1.0f : 0.0f,
          has_ref && kl_type == 2 ? 1.0f : 0.0f, has_ref && kl_type == 3 ? 1.0f : 0.0f};
}

// One token's terms from its log-prob x, the old log-prob o, the reference log-prob r and its
// advantage a: the loss l = pg + beta kl (the caller subtracts alpha H), pg, kl, the ratio, the
// clipped flag and dl/dx. Matches reference.grpo_token_terms; the gradient is zero where a clamp
// holds the value, as in the Triton kernel. Branch-free (bitwise & and |, no short-circuit, and the
// KL a blend of the three types): a branch here keeps GCC from vectorising the loops that store
// per-token results.
struct TokenTerms {
  float loss, pg, kl, ratio, clipped, dx;
};

__attribute__((always_inline)) inline TokenTerms token_terms(float x, float o, float r, float a,
                                                             const GRPOParams& p) {
  const float lr = x - o;
  const bool lr_in = std::fabs(lr) <= 20.0f;  // not two compares: GCC then leaves store loops scalar
  const float ratio = exp_f(minf(maxf(lr, -20.0f), 20.0f));
  const float pg_un = -a * ratio;
  const float pg_cl = -a * minf(maxf(ratio, p.clip_lo), p.clip_hi);
  const bool clipped = pg_cl > pg_un;
  const bool dual = (p.dual_c > 0.0f) & (a < 0.0f) & ((clipped ? pg_cl : pg_un) > -a * p.dual_c);
  const float pg = dual ? -a * p.dual_c : (clipped ? pg_cl : pg_un);
  const float dpg = (dual | clipped | !lr_in) ? 0.0f : pg_un;
  const float diff = x - r;
  const float d = minf(maxf(-diff, -20.0f), 20.0f);
  const float e = exp_f(d);
  const float k3 = e - d - 1.0f;
  const bool k3_in = (k3 >= -10.0f) & (k3 <= 10.0f);
  const float kl = p.k1 * diff + p.k2 * 0.5f * diff * diff + p.k3 * minf(maxf(k3, -10.0f), 10.0f);
  const float dkl = p.k1 + p.k2 * diff + p.k3 * (k3_in ? 1.0f - e : 0.0f);
  return {pg + p.beta * kl, pg, kl, ratio, clipped ? 1.0f : 0.0f, dpg + p.beta * dkl};
}

// Run f(row) for every row in [0, n) on torch's threads.
template <typename F>
inline void for_rows(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace racro_fast
