// Fused knowledge-distillation softmax-KL over rows of logits — torch-free CPU kernel API.
//
// For one row of student logits s[V] and teacher logits t[V] at temperature T
// (a = s / T, b = t / T, p_s = softmax(a), p_t = softmax(b)):
//   forward direction  KL(p_t || p_s) = sum_j p_t,j (log p_t,j - log p_s,j)   (Hinton / DistilBERT)
//   reverse direction  KL(p_s || p_t) = sum_j p_s,j (log p_s,j - log p_t,j)
// and the row loss is T^2 * KL. Terms whose weight probability is exactly 0
// (e.g. teacher logit -inf in the forward direction) contribute 0.
//
// Both log-sum-exps and the KL are computed online in a single read of the row
// (chunked: a max pass over an L1-sized chunk, then one exp per element), with
// fp32 element math and double accumulation across chunks. Row statistics
// (KD_STATS floats per row):
//   [0] ms = max_j a_j   [1] log S_s   [2] mt = max_j b_j   [3] log S_t   [4] KL (unscaled)
// so that log p_s,j = (a_j - ms) - log S_s and log p_t,j = (b_j - mt) - log S_t.
//
// Gradient with respect to the student logits of coef * T^2 * KL:
//   forward: coef * T * (p_s - p_t)
//   reverse: coef * T * p_s * (log p_s - log p_t - KL)      (0 where p_s == 0)
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace pyc {

constexpr int KD_STATS = 5;

// Online statistics of a part of a row (combinable with kd_merge).
struct KdPartial {
  float ms;   // max of a over the part (-inf when empty)
  float mt;   // max of b over the part
  double ss;  // sum exp(a - safe(ms))
  double st;  // sum exp(b - safe(mt))
  // sum over the part of e_w * d, where e_w = exp(w - safe(m_w)) is the weighting exponential
  // (b in the forward direction, a in reverse) and d = (w - safe(m_w)) - (o - safe(m_o)) with o
  // the other variable; terms with e_w == 0 are skipped. safe(m) = m unless m == -inf (then 0).
  double w;
};

KdPartial kd_empty_partial();
KdPartial kd_merge(const KdPartial& p, const KdPartial& q, bool reverse);
// Writes the KD_STATS row statistics from a complete row's partial.
void kd_finalize(const KdPartial& p, bool reverse, float* stats);

// Partial statistics of s[0..n), t[0..n) (unit stride) with the active CPU ISA.
KdPartial kd_partial_cpu(const void* s, const void* t, DType dtype, int64_t n, float inv_t,
                         bool reverse);
// Writes g[0..n) = gradient of coef * T^2 * KL with respect to s (see above); `stats` are the
// row's statistics. `coef` already includes any reduction divisor and upstream gradient.
void kd_grad_cpu(const void* s, const void* t, void* g, DType dtype, int64_t n, float inv_t,
                 float temperature, bool reverse, const float* stats, float coef);

// Same with a forced implementation (tests): isa = 0 scalar, 1 avx2, 2 avx512.
KdPartial kd_partial_cpu_isa(int isa, const void* s, const void* t, DType dtype, int64_t n,
                             float inv_t, bool reverse);
void kd_grad_cpu_isa(int isa, const void* s, const void* t, void* g, DType dtype, int64_t n,
                     float inv_t, float temperature, bool reverse, const float* stats, float coef);

// float64 reference path (scalar, double math throughout): whole rows.
void kd_row_stats_f64(const double* s, const double* t, int64_t n, double inv_t, bool reverse,
                      double* stats);
void kd_row_grad_f64(const double* s, const double* t, double* g, int64_t n, double inv_t,
                     double temperature, bool reverse, const double* stats, double coef);

}  // namespace pyc
