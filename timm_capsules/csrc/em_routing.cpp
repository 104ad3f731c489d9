// EM routing (Hinton et al., 2018) on the CPU as one kernel per (group of children, parents): the votes of a
// group are formed into a per-thread buffer (I x D x J values, in L2) and never written to memory; each
// iteration then reads that buffer twice: the E-step two children at a time, and the M-step's sums four pose
// entries at a time over all children. With 32 parents (the conv layers) the sums live in vector registers
// (``Row``, vector_math.h), which GCC does not manage for local arrays. The backward pass forms the group's
// votes and replays its iterations again, then runs them backwards by hand, so that nothing but the inputs
// and outputs is kept between the passes.
// The arithmetic is that of ``routing_baselines._em_routing_fp32`` (the reference), with the same guards.
//
// Layouts (row-major; "x" = kernel-internal):
//   children u (B, H, W, N, R, C), read as windows (windows.h): group g's child i at u[child_at[i]]
//   weight (I, C, T, J)   offset (I, D), optional   child activations (B, H, W, N)
//   x votes v (I, D, J) per group, D = R T, d = r T + t; x statistics (D, J)
//   poses (G, J, D)   activations (G, J)   assignments (G, I, J), written only when asked for
// With the parents J innermost, every hot loop runs over J contiguous values and vectorises.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vector_math.h"
#include "windows.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using namespace timm_capsules;

struct Config {
  Windows windows;  // the groups: windows of the child grid
  int64_t G, I, R, C, T, J, D;
  std::vector<double> lambdas;  // one inverse temperature per iteration
  bool normalize_cost;
  double eps;
  int64_t iterations() const { return static_cast<int64_t>(lambdas.size()); }
};

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) { return scalar_t(1) / (scalar_t(1) + std::exp(-x)); }

template <typename scalar_t>
inline scalar_t log_sigmoid(scalar_t x) { return std::min(x, scalar_t(0)) - std::log1p(std::exp(-std::abs(x))); }

// What one iteration's M-step leaves (all (D, J) or (J)); the backward pass needs every iteration's.
template <typename scalar_t>
struct Step {
  std::vector<scalar_t> mass, mu, e2, var, logit, x1, x2, c, log_sig, cost_a, rel;
  Step(int64_t D, int64_t J)
      : mass(J), mu(D * J), e2(D * J), var(D * J), logit(J), x1(D * J), x2(D * J), c(J), log_sig(J),
        cost_a(J), rel(J) {}
};

// Per-thread scratch for one group at a time. N: the pose side when poses are N x N (the paper's 4x4), JN the
// number of parents when it is the conv layers' 32; 0 reads them at run time. Known at compile time, the
// loops over parents unroll into a few vector registers instead of going through memory.
template <typename scalar_t, int N, int JN>
struct Group {
  const Config& k;
  const int64_t I, J_, D_;
  std::vector<scalar_t> v;           // (I, D, J) votes / s
  std::vector<scalar_t> p1, p2;      // (D, J) sum_i r_ij v, sum_i r_ij v^2
  std::vector<scalar_t> logits;      // (J)
  std::vector<scalar_t> routed;      // (I, J): r_ij = R_ij a_i, and R itself before that when it is not kept
  std::vector<scalar_t> assign;      // (T, I, J): R^t, kept for t >= 1 when replaying for the backward
  std::vector<Step<scalar_t>> steps;
  std::vector<int64_t> child_at;            // (I): where the group's children are, capsule indexes in the grid
  std::vector<scalar_t> child_activations;  // (I): their activations
  scalar_t scale = 1, log_scale = 0;

  explicit Group(const Config& config)
      : k(config), I(config.I), J_(config.J), D_(config.D), v(I * D_ * J_), p1(D_ * J_), p2(D_ * J_), logits(J_),
        routed(I * J_), assign(config.iterations() * I * J_), steps(config.iterations(), Step<scalar_t>(D_, J_)),
        child_at(I), child_activations(I) {}

  static constexpr int64_t n_or(int64_t fixed, int64_t value) { return fixed ? fixed : value; }

  // group g's children and their activations, from the window offsets and the activation grid
  void locate(int64_t g, const std::vector<int64_t>& offsets, const scalar_t* a_grid) {
    const int64_t corner = k.windows.corner(g);
    for (int64_t i = 0; i < I; ++i) {
      child_at[i] = corner + offsets[i];
      child_activations[i] = a_grid[child_at[i]];
    }
  }

  // v_ij = u_i W_ij (+ offset_i), then divided by the group's largest magnitude s
  void form_votes(const scalar_t* u, const scalar_t* w, const scalar_t* offset) {
    const int64_t R = n_or(N, k.R), C = n_or(N, k.C), T = n_or(N, k.T), J = n_or(JN, J_), D = n_or(N * N, D_);
    scalar_t largest = 0;
    if constexpr (N > 0 && JN > 0) {  // per column t, W's rows for it stay in registers for all pose rows r
      using RowJ = Row<scalar_t, JN>;
      RowJ largest_row = RowJ::filled(0);
      for (int64_t i = 0; i < I; ++i) {
        const scalar_t* ui = u + child_at[i] * N * N;
        const scalar_t* wi = w + i * N * N * JN;
        scalar_t* vi = v.data() + i * D * JN;
        for (int t = 0; t < N; ++t) {
          RowJ wt[N];
#pragma GCC unroll 4
          for (int c = 0; c < N; ++c) wt[c] = RowJ::load(wi + (c * N + t) * JN);
#pragma GCC unroll 4
          for (int r = 0; r < N; ++r) {
            RowJ out = RowJ::filled(offset ? offset[i * D + r * N + t] : scalar_t(0));
#pragma GCC unroll 4
            for (int c = 0; c < N; ++c) out += wt[c] * ui[r * N + c];
            out.store(vi + (r * N + t) * JN);
            largest_row = max_abs(largest_row, out);
          }
        }
      }
      largest = largest_row.max_lane();
    } else {
      for (int64_t i = 0; i < I; ++i) {
        const scalar_t* ui = u + child_at[i] * R * C;
        const scalar_t* wi = w + i * C * T * J;
        scalar_t* vi = v.data() + i * D * J;
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t t = 0; t < T; ++t) {
            scalar_t* out = vi + (r * T + t) * J;
            const scalar_t add = offset ? offset[i * D + r * T + t] : scalar_t(0);
#pragma omp simd
            for (int64_t j = 0; j < J; ++j) out[j] = add;
            for (int64_t c = 0; c < C; ++c) {
              const scalar_t f = ui[r * C + c];
              const scalar_t* wc = wi + (c * T + t) * J;
#pragma omp simd
              for (int64_t j = 0; j < J; ++j) out[j] += f * wc[j];
            }
          }
        }
        largest = std::max(largest, max_abs_of(vi, D * J));
      }
    }
    scale = std::max(largest, static_cast<scalar_t>(FLT_MIN));  // the reference's clamp (float32's tiny)
    log_scale = std::log(scale);
    const int64_t n = I * D * J;
    scalar_t* vv = v.data();
    const scalar_t inverse = scalar_t(1) / scale;  // a multiply: a division per vote costs more than the sweeps
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) vv[e] *= inverse;
  }

  // The E-step of iteration t - 1 for every child: R (I, J); two children at a time share the loads of x
  void e_steps(int64_t t, scalar_t* out) {
    int64_t i = 0;
    if constexpr (JN > 0 && std::is_same_v<scalar_t, float>) {
      using RowJ = Row<scalar_t, JN>;
      const Step<scalar_t>& s = steps[t - 1];
      const RowJ log_prior = RowJ::load(s.log_sig.data()) - RowJ::load(s.c.data());
      for (; i + 1 < I; i += 2) {
        RowJ logits[2] = {log_prior, log_prior};
        quadratic_rows<2>(v.data() + i * D_ * JN, s.x1.data(), s.x2.data(), logits, D_);
        softmax(logits[0]).store(out + i * JN);
        softmax(logits[1]).store(out + (i + 1) * JN);
      }
    }
    for (; i < I; ++i) e_step(t, i, out + i * J_);
  }

  // The E-step of iteration t - 1 for child i: R_i (J) = softmax_j(log a_j + log N(v_ij; mu_j, var_j))
  void e_step(int64_t t, int64_t i, scalar_t* out) {
    const int64_t J = n_or(JN, J_), D = n_or(N * N, D_);
    const Step<scalar_t>& s = steps[t - 1];
    const scalar_t* vi = v.data() + i * D * J;
    if constexpr (JN > 0 && std::is_same_v<scalar_t, float>) {  // logits and softmax in registers
      using RowJ = Row<scalar_t, JN>;
      const RowJ log_prior = RowJ::load(s.log_sig.data()) - RowJ::load(s.c.data());
      softmax(quadratic_row(vi, s.x1.data(), s.x2.data(), log_prior, D)).store(out);
    } else {
      scalar_t* l = logits.data();
      quadratic_forms(vi, s.x1.data(), s.x2.data(), nullptr, l, D, J);
      const scalar_t* log_sig = s.log_sig.data();
      const scalar_t* c = s.c.data();
#pragma omp simd
      for (int64_t j = 0; j < J; ++j) l[j] = log_sig[j] + (l[j] - c[j]);
      softmax(l, out, J);
    }
  }

  // out (J) = init + sum_d v_d (a_d + b_d v_d) for one child's votes v (D, J), i.e. <[a, b], [v, v^2]> per
  // parent (init: zeros when null). The E-step's logits (a, b = x1, x2) and the backward's dr (dP1, dP2).
  static TC_INLINE void quadratic_forms(const scalar_t* __restrict vi, const scalar_t* __restrict a,
                              const scalar_t* __restrict b, const scalar_t* init, scalar_t* __restrict out,
                              int64_t D, int64_t J) {
    if constexpr (JN > 0) {
      using RowJ = Row<scalar_t, JN>;
      quadratic_row(vi, a, b, init ? RowJ::load(init) : RowJ::filled(0), D).store(out);
    } else {
      for (int64_t j = 0; j < J; ++j) out[j] = init ? init[j] : scalar_t(0);
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t* vd = vi + d * J;
        const scalar_t* ad = a + d * J;
        const scalar_t* bd = b + d * J;
#pragma omp simd
        for (int64_t j = 0; j < J; ++j) out[j] += vd[j] * (ad[j] + bd[j] * vd[j]);
      }
    }
  }

  // quadratic_forms for Children consecutive children in registers (JN > 0): acc[c] += <[a, b], [v_c, v_c^2]>
  template <int Children>
  static TC_INLINE void quadratic_rows(const scalar_t* __restrict vi, const scalar_t* __restrict a,
                                       const scalar_t* __restrict b, Row<scalar_t, JN ? JN : 64> (&acc)[Children],
                                       int64_t D) {
    using RowJ = Row<scalar_t, JN ? JN : 64>;
    for (int64_t d = 0; d < D; ++d) {
      const RowJ ad = RowJ::load(a + d * JN), bd = RowJ::load(b + d * JN);
#pragma GCC unroll 2
      for (int c = 0; c < Children; ++c) {
        const RowJ x = RowJ::load(vi + (c * D + d) * JN);
        acc[c] += x * (ad + bd * x);
      }
    }
  }

  // quadratic_forms in registers (JN > 0): two sums, so that each waits on every other addition only
  static TC_INLINE Row<scalar_t, JN ? JN : 64> quadratic_row(const scalar_t* __restrict vi,
                                                            const scalar_t* __restrict a,
                                                            const scalar_t* __restrict b,
                                                            Row<scalar_t, JN ? JN : 64> even, int64_t D) {
    using RowJ = Row<scalar_t, JN ? JN : 64>;
    constexpr int64_t J = JN;
    RowJ odd = RowJ::filled(0);
    int64_t d = 0;
    for (; d + 1 < D; d += 2) {
      const RowJ v0 = RowJ::load(vi + d * J), v1 = RowJ::load(vi + (d + 1) * J);
      even += v0 * (RowJ::load(a + d * J) + RowJ::load(b + d * J) * v0);
      odd += v1 * (RowJ::load(a + (d + 1) * J) + RowJ::load(b + (d + 1) * J) * v1);
    }
    if (d < D) {
      const RowJ v0 = RowJ::load(vi + d * J);
      even += v0 * (RowJ::load(a + d * J) + RowJ::load(b + d * J) * v0);
    }
    return even + odd;
  }

  // For Children consecutive children: dv (D, J) = (h1 + 2 v h2) s^-1 with [h1, h2]_d = sum over terms of
  // coefficient (terms, J) times [F1, F2] (terms, D, J) (the backward's vote gradients).
  template <int Children>
  static TC_INLINE void vote_gradients(const scalar_t* __restrict coef, const scalar_t* __restrict F1,
                                       const scalar_t* __restrict F2, int64_t terms, const scalar_t* __restrict v,
                                       scalar_t inv_scale, scalar_t* __restrict dv, int64_t D, int64_t J) {
    if constexpr (N > 0 && JN > 0 && N * N % 2 == 0) {  // 2 children x 2 pose entries x [h1, h2] in registers
      using RowJ = Row<scalar_t, JN>;
      for (int64_t d = 0; d < N * N; d += 2) {
        RowJ h1[Children][2], h2[Children][2];
#pragma GCC unroll 2
        for (int c = 0; c < Children; ++c)
#pragma GCC unroll 2
          for (int e = 0; e < 2; ++e) h1[c][e] = h2[c][e] = RowJ::filled(0);
        for (int64_t term = 0; term < terms; ++term) {
          RowJ x[Children];
#pragma GCC unroll 2
          for (int c = 0; c < Children; ++c) x[c] = RowJ::load(coef + (c * terms + term) * JN);
#pragma GCC unroll 2
          for (int e = 0; e < 2; ++e) {
            const RowJ f1 = RowJ::load(F1 + (term * N * N + d + e) * JN);
            const RowJ f2 = RowJ::load(F2 + (term * N * N + d + e) * JN);
#pragma GCC unroll 2
            for (int c = 0; c < Children; ++c) {
              h1[c][e] += x[c] * f1;
              h2[c][e] += x[c] * f2;
            }
          }
        }
#pragma GCC unroll 2
        for (int c = 0; c < Children; ++c)
#pragma GCC unroll 2
          for (int e = 0; e < 2; ++e) {
            const int64_t o = (c * N * N + d + e) * JN;
            const RowJ vd = RowJ::load(v + o);
            ((h1[c][e] + vd * h2[c][e] * scalar_t(2)) * inv_scale).store(dv + o);
          }
      }
    } else {
      for (int c = 0; c < Children; ++c)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < J; ++j) {
            scalar_t h1 = 0, h2 = 0;
            for (int64_t term = 0; term < terms; ++term) {
              const scalar_t x = coef[(c * terms + term) * J + j];
              h1 += x * F1[(term * D + d) * J + j];
              h2 += x * F2[(term * D + d) * J + j];
            }
            const int64_t o = (c * D + d) * J + j;
            dv[o] = (h1 + 2 * v[o] * h2) * inv_scale;
          }
    }
  }

  // s1 (D, J) = sum_i w_ij v_ij, s2 = sum_i w_ij v_ij^2 over the children: w (I, J), v (I, D, J). The M-step's
  // sums (w = r) and the backward's dx (w = dL).
  static void moment_sums(const scalar_t* __restrict w, const scalar_t* __restrict v, scalar_t* __restrict s1,
                          scalar_t* __restrict s2, int64_t I, int64_t D, int64_t J) {
    if constexpr (JN > 0) {  // four pose entries at a time over all children: 16 sums in registers, w loaded once
      int64_t d = 0;
      for (; d + 4 <= D; d += 4) moment_block<4>(w, v, s1, s2, I, D, d);
      for (; d < D; ++d) moment_block<1>(w, v, s1, s2, I, D, d);
    } else {
      std::fill(s1, s1 + D * J, scalar_t(0));
      std::fill(s2, s2 + D * J, scalar_t(0));
      for (int64_t d = 0; d < D; ++d) {
        scalar_t* q1 = s1 + d * J;
        scalar_t* q2 = s2 + d * J;
        for (int64_t i = 0; i < I; ++i) {
          const scalar_t* wi = w + i * J;
          const scalar_t* vd = v + (i * D + d) * J;
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) {
            const scalar_t wv = wi[j] * vd[j];
            q1[j] += wv;
            q2[j] += wv * vd[j];
          }
        }
      }
    }
  }

  template <int Block>
  static TC_INLINE void moment_block(const scalar_t* __restrict w, const scalar_t* __restrict v, scalar_t* __restrict s1,
                           scalar_t* __restrict s2, int64_t I, int64_t D, int64_t d0) {
    using RowJ = Row<scalar_t, JN>;
    RowJ m1[Block], m2[Block];
#pragma GCC unroll 4
    for (int b = 0; b < Block; ++b) m1[b] = m2[b] = RowJ::filled(0);
    for (int64_t i = 0; i < I; ++i) {
      const RowJ wi = RowJ::load(w + i * JN);
      const scalar_t* vi = v + (i * D + d0) * JN;
#pragma GCC unroll 4
      for (int b = 0; b < Block; ++b) {
        const RowJ x = RowJ::load(vi + b * JN);
        const RowJ wx = wi * x;
        m1[b] += wx;
        m2[b] += wx * x;
      }
    }
#pragma GCC unroll 4
    for (int b = 0; b < Block; ++b) {
      m1[b].store(s1 + (d0 + b) * JN);
      m2[b].store(s2 + (d0 + b) * JN);
    }
  }

  // Iterations on the formed votes. keep: R^t of every iteration stays in `assign` (for the backward);
  // assignments_out, when given, receives the last iteration's R (I, J).
  void iterate(const scalar_t* a_in, const scalar_t* beta_u, const scalar_t* beta_a, bool keep,
               scalar_t* assignments_out) {
    const int64_t J = n_or(JN, J_), D = n_or(N * N, D_);
    const int64_t iterations = k.iterations();
    for (int64_t t = 0; t < iterations; ++t) {
      Step<scalar_t>& s = steps[t];
      const bool last = t == iterations - 1;
      // the E-step for every child, then r_ij = R_ij a_i
      scalar_t* rows = keep ? assign.data() + t * I * J : (last && assignments_out ? assignments_out : routed.data());
      if (t == 0) {
        std::fill(rows, rows + I * J, scalar_t(1) / scalar_t(J));
      } else {
        e_steps(t, rows);
      }
      if (last && assignments_out && keep) std::copy(rows, rows + I * J, assignments_out);
      scalar_t* m = s.mass.data();
      if constexpr (JN > 0) {
        using RowJ = Row<scalar_t, JN>;
        RowJ mass = RowJ::filled(0);
        for (int64_t i = 0; i < I; ++i) {
          const RowJ ri = RowJ::load(rows + i * JN) * a_in[i];
          ri.store(routed.data() + i * JN);
          mass += ri;
        }
        mass.store(m);
      } else {
        std::fill(m, m + J, scalar_t(0));
        for (int64_t i = 0; i < I; ++i) {
          const scalar_t a = a_in[i];
          scalar_t* ri = routed.data() + i * J;
          const scalar_t* Ri = rows + i * J;
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) {
            ri[j] = Ri[j] * a;
            m[j] += ri[j];
          }
        }
      }
      moment_sums(routed.data(), v.data(), p1.data(), p2.data(), I, D, J);
      m_step(t, beta_u, beta_a);
    }
  }

  // mu, sigma^2, cost, parent activations from the sums; then what the next E-step needs
  void m_step(int64_t t, const scalar_t* beta_u, const scalar_t* beta_a) {
    const int64_t J = J_, D = D_;
    Step<scalar_t>& s = steps[t];
    const scalar_t eps = static_cast<scalar_t>(k.eps);
    std::vector<scalar_t>& log_sigma_mean = s.cost_a;  // mean_d log sigma, then the cost's factor A_j
    for (int64_t j = 0; j < J; ++j) log_sigma_mean[j] = 0;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = 0; j < J; ++j) {
        const int64_t e = d * J + j;
        const scalar_t denom = s.mass[j] + eps;
        const scalar_t mu = p1[e] / denom, e2 = p2[e] / denom;
        const scalar_t var = std::max(e2 - mu * mu, scalar_t(0)) + eps;
        s.mu[e] = mu;
        s.e2[e] = e2;
        s.var[e] = var;
        log_sigma_mean[j] += scalar_t(0.5) * std::log(var) + log_scale;
      }
    }
    const scalar_t lambda = static_cast<scalar_t>(k.lambdas[t]);
    std::vector<scalar_t> cost(J);
    if (k.normalize_cost) {
      scalar_t mean_mass = 0, mean_cost = 0;
      for (int64_t j = 0; j < J; ++j) mean_mass += s.mass[j];
      mean_mass /= J;
      for (int64_t j = 0; j < J; ++j) {
        s.rel[j] = s.mass[j] / (mean_mass + eps);
        s.cost_a[j] = beta_u[j] + log_sigma_mean[j] / D;
        cost[j] = s.cost_a[j] * s.rel[j];
        mean_cost += cost[j];
      }
      mean_cost /= J;
      for (int64_t j = 0; j < J; ++j) cost[j] -= mean_cost;
    } else {
      for (int64_t j = 0; j < J; ++j) {
        s.cost_a[j] = D * beta_u[j] + log_sigma_mean[j];  // sum_d (beta_u + log sigma_d)
        cost[j] = s.cost_a[j] * s.mass[j];
      }
    }
    for (int64_t j = 0; j < J; ++j) {
      s.logit[j] = lambda * (beta_a[j] - cost[j]);
      s.log_sig[j] = log_sigmoid(s.logit[j]);
      s.c[j] = 0;
    }
    // E-step terms: -sum_d (v - mu)^2 / var / 2 = [v, v^2] . x - sum_d mu^2 / var / 2 with x = [mu / var,
    // -1 / (2 var)] (exactly half of [2 mu / var, -1 / var]: the sweeps need no factor 1/2); c adds log var / 2
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = 0; j < J; ++j) {
        const int64_t e = d * J + j;
        const scalar_t inv = scalar_t(1) / s.var[e];
        s.x1[e] = s.mu[e] * inv;
        s.x2[e] = scalar_t(-0.5) * inv;
        s.c[j] += s.mu[e] * s.mu[e] * inv + std::log(s.var[e]);
      }
    }
    for (int64_t j = 0; j < J; ++j) s.c[j] *= scalar_t(0.5);
  }
};

// dw (C, K) += u (R, C)^T dv (R, K): one sweep over k, each dv column loaded once for all C rows
template <typename scalar_t, int N>
inline void add_ut_dv(const scalar_t* __restrict u, const scalar_t* __restrict dv, scalar_t* __restrict dw,
                      int64_t R_, int64_t C_, int64_t K) {
  const int64_t R = N ? N : R_, C = N ? N : C_;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      scalar_t sum = dw[c * K + k];
      for (int64_t r = 0; r < R; ++r) sum += u[r * C + c] * dv[r * K + k];
      dw[c * K + k] = sum;
    }
  }
}

template <typename scalar_t, int N, int JN>
void forward_kernel(const Config& k, const scalar_t* u, const scalar_t* w, const scalar_t* offset,
                    const scalar_t* a_in, const scalar_t* beta_u, const scalar_t* beta_a, scalar_t* poses,
                    scalar_t* activations, scalar_t* assignments) {
  const std::vector<int64_t> offsets = k.windows.offsets();
  at::parallel_for(0, k.G, 1, [&](int64_t begin, int64_t end) {
    Group<scalar_t, N, JN> group(k);
    const Step<scalar_t>& last = group.steps.back();
    for (int64_t g = begin; g < end; ++g) {
      group.locate(g, offsets, a_in);
      group.form_votes(u, w, offset);
      group.iterate(group.child_activations.data(), beta_u, beta_a, false,
                    assignments ? assignments + g * k.I * k.J : nullptr);
      for (int64_t j = 0; j < k.J; ++j) {
        activations[g * k.J + j] = sigmoid(last.logit[j]);
        for (int64_t d = 0; d < k.D; ++d) poses[(g * k.J + j) * k.D + d] = last.mu[d * k.J + j] * group.scale;
      }
    }
  });
}

// The iterations run backwards. Per iteration t the vote-sized steps are P_j = sum_i r_ij [v, v^2]
// (M-step) and the E-step's <x_j, [v_ij, v_ij^2]>; their vote gradients are linear in [v, v^2], so the
// gradient of each vote is assembled at the end from small factors (dP per (t, j), dL per (t, i, j)).
// Threads split the images, so that the windows of one image, which overlap, add their gradients into the
// children's grid from one thread.
template <typename scalar_t, int N, int JN>
void backward_kernel(const Config& k, const scalar_t* grad_poses, const scalar_t* grad_act,
                     const scalar_t* grad_assign, const scalar_t* u, const scalar_t* w, const scalar_t* offset,
                     const scalar_t* a_in, const scalar_t* beta_u, const scalar_t* beta_a, scalar_t* du,
                     scalar_t* dw_all, scalar_t* da, scalar_t* d_beta_all) {
  using G_ = Group<scalar_t, N, JN>;
  const int64_t I = k.I, J = G_::n_or(JN, k.J), D = G_::n_or(N * N, k.D), R = G_::n_or(N, k.R),
                C = G_::n_or(N, k.C), T = G_::n_or(N, k.T), iterations = k.iterations();
  const std::vector<int64_t> offsets = k.windows.offsets();
  const int64_t windows_per_image = k.windows.windows_per_image();
  at::parallel_for(0, k.windows.B, 1, [&](int64_t image_begin, int64_t image_end) {
    // each thread sums its own weight and beta gradients; they are added up afterwards
    const int64_t thread = at::get_thread_num();
    scalar_t* dw = dw_all + thread * I * C * T * J;
    scalar_t* d_beta_u = d_beta_all + thread * 2 * J;
    scalar_t* d_beta_a = d_beta_u + J;
    G_ group(k);
    const scalar_t eps = static_cast<scalar_t>(k.eps);
    // the vote gradients' factors per pose entry (terms, D, J): dP^t, then x^t for t < iterations - 1
    const int64_t terms = 2 * iterations - 1;
    std::vector<scalar_t> dP1(terms * D * J), dP2(terms * D * J), dL(iterations * I * J);
    std::vector<scalar_t> dmu(D * J), dvar(D * J), dx1(D * J), dx2(D * J), dc(J), dls(J), dlogit(J), dm(J);
    std::vector<scalar_t> dr(2 * J), dR(J), dcost(J), coefficients(2 * terms * J), dv(2 * D * J), d_act(I);
    for (int64_t g = image_begin * windows_per_image; g < image_end * windows_per_image; ++g) {
      if (g % windows_per_image == 0) {
        k.windows.zero_image(du, g / windows_per_image, R * C);
        k.windows.zero_image(da, g / windows_per_image, 1);
      }
      group.locate(g, offsets, a_in);
      const int64_t* child_at = group.child_at.data();
      const scalar_t* ag = group.child_activations.data();
      group.form_votes(u, w, offset);
      group.iterate(ag, beta_u, beta_a, true, nullptr);
      const scalar_t* v = group.v.data();
      scalar_t* dag = d_act.data();
      std::fill(dag, dag + I, scalar_t(0));
      // gradients for the E-step parameters of iteration t (x1, x2, c, log sigmoid(logit)): none after the last
      std::fill(dx1.begin(), dx1.end(), scalar_t(0));
      std::fill(dx2.begin(), dx2.end(), scalar_t(0));
      std::fill(dc.begin(), dc.end(), scalar_t(0));
      std::fill(dls.begin(), dls.end(), scalar_t(0));
      for (int64_t t = iterations - 1; t >= 0; --t) {
        const Step<scalar_t>& s = group.steps[t];
        const bool last = t == iterations - 1;
        for (int64_t j = 0; j < J; ++j) {
          if (last) {
            const scalar_t act = sigmoid(s.logit[j]);
            dlogit[j] = grad_act ? grad_act[g * J + j] * act * (1 - act) : scalar_t(0);
          } else {
            dlogit[j] = dls[j] * sigmoid(-s.logit[j]);  // d log sigmoid(x) / dx
          }
          for (int64_t d = 0; d < D; ++d) {
            const int64_t e = d * J + j;
            dmu[e] = last && grad_poses ? grad_poses[(g * J + j) * D + d] * group.scale : scalar_t(0);
            dvar[e] = 0;
            if (!last) {  // x1 = mu / var, x2 = -1 / (2 var), c = (sum_d mu^2 / var + log var) / 2
              const scalar_t inv = scalar_t(1) / s.var[e];
              const scalar_t d_inv =
                  dx1[e] * s.mu[e] - scalar_t(0.5) * dx2[e] + scalar_t(0.5) * dc[j] * s.mu[e] * s.mu[e];
              dmu[e] += dx1[e] * inv + dc[j] * s.mu[e] * inv;
              dvar[e] += -d_inv * inv * inv + scalar_t(0.5) * dc[j] * inv;
            }
          }
        }
        // logit = lambda (beta_a - cost)
        const scalar_t lambda = static_cast<scalar_t>(k.lambdas[t]);
        for (int64_t j = 0; j < J; ++j) {
          d_beta_a[j] += lambda * dlogit[j];
          dcost[j] = -lambda * dlogit[j];
        }
        std::vector<scalar_t>& d_log_sigma = dls;  // per parent (equal over d), reused: dls is consumed above
        if (k.normalize_cost) {
          // cost_j = A_j rel_j - mean_j(A rel), A_j = beta_u_j + mean_d log sigma, rel_j = m_j / (mean m + eps)
          scalar_t mean_dcost = 0, mean_mass = 0, d_mean_mass = 0;
          for (int64_t j = 0; j < J; ++j) {
            mean_dcost += dcost[j];
            mean_mass += s.mass[j];
          }
          mean_dcost /= J;
          mean_mass /= J;
          const scalar_t denom = mean_mass + eps;
          for (int64_t j = 0; j < J; ++j) {
            const scalar_t d_cost0 = dcost[j] - mean_dcost;
            const scalar_t d_rel = d_cost0 * s.cost_a[j];
            d_beta_u[j] += d_cost0 * s.rel[j];
            d_log_sigma[j] = d_cost0 * s.rel[j] / D;
            dm[j] = d_rel / denom;
            d_mean_mass -= d_rel * s.mass[j] / (denom * denom);
          }
          for (int64_t j = 0; j < J; ++j) dm[j] += d_mean_mass / J;
        } else {
          // cost_j = sum_d (beta_u_j + log sigma_jd) m_j
          for (int64_t j = 0; j < J; ++j) {
            d_beta_u[j] += dcost[j] * s.mass[j] * D;
            d_log_sigma[j] = dcost[j] * s.mass[j];
            dm[j] = dcost[j] * s.cost_a[j];
          }
        }
        // log sigma = log var / 2 + log s; var = max(E[v^2] - mu^2, 0) + eps; [mu, E[v^2]] = P / (m + eps)
        scalar_t* p1 = dP1.data() + t * D * J;
        scalar_t* p2 = dP2.data() + t * D * J;
        for (int64_t d = 0; d < D; ++d) {
          for (int64_t j = 0; j < J; ++j) {
            const int64_t e = d * J + j;
            scalar_t d_var = dvar[e] + scalar_t(0.5) * d_log_sigma[j] / s.var[e];
            // clamp_min passes the gradient where its input is at or above the bound, as torch's does
            const scalar_t d_q = s.e2[e] - s.mu[e] * s.mu[e] >= 0 ? d_var : scalar_t(0);
            const scalar_t d_mu = dmu[e] - 2 * s.mu[e] * d_q;
            const scalar_t denom = s.mass[j] + eps;
            p1[e] = d_mu / denom;
            p2[e] = d_q / denom;
            dm[j] -= (d_mu * s.mu[e] + d_q * s.e2[e]) / denom;
          }
        }
        // per child: dr_ij = <dP_j, [v_ij, v_ij^2]> + dm_j; r_ij = R_ij a_i; R^t = softmax(L^(t-1)).
        std::fill(dls.begin(), dls.end(), scalar_t(0));
        std::fill(dc.begin(), dc.end(), scalar_t(0));
        for (int64_t i = 0; i < I; ++i) {
          scalar_t* r = dr.data() + (i % 2) * J;
          scalar_t* dRi = dR.data();
          if constexpr (JN > 0) {  // two children at a time share the loads of dP
            using RowJ = Row<scalar_t, JN>;
            if (i % 2 == 0 && i + 1 < I) {
              RowJ pair[2] = {RowJ::load(dm.data()), RowJ::load(dm.data())};
              G_::template quadratic_rows<2>(v + i * D * JN, p1, p2, pair, D);
              pair[0].store(r);
              pair[1].store(r + JN);
            } else if (i % 2 == 0) {
              G_::quadratic_forms(v + i * D * J, p1, p2, dm.data(), r, D, J);
            }
          } else {
            G_::quadratic_forms(v + i * D * J, p1, p2, dm.data(), r, D, J);
          }
          const scalar_t a = ag[i];
          if (t == 0) {
            dag[i] += sum_of(r, J) / scalar_t(J);
            continue;
          }
          const scalar_t* Ri = group.assign.data() + (t * I + i) * J;
          const scalar_t* gR = last && grad_assign ? grad_assign + (g * I + i) * J : nullptr;
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) dRi[j] = r[j] * a + (gR ? gR[j] : scalar_t(0));
          const scalar_t dot = dot_of(Ri, dRi, J);
          dag[i] += dot_of(r, Ri, J);
          scalar_t* dLi = dL.data() + ((t - 1) * I + i) * J;
          scalar_t* ls = dls.data();
          scalar_t* cc = dc.data();
#pragma omp simd
          for (int64_t j = 0; j < J; ++j) {
            dLi[j] = Ri[j] * (dRi[j] - dot);
            ls[j] += dLi[j];
            cc[j] -= dLi[j];
          }
        }
        // L_ij = log sigmoid(logit_j) + <x_j, [v_ij, v_ij^2]> - c_j: dx = sum_i dL_ij [v_ij, v_ij^2]
        if (t > 0) G_::moment_sums(dL.data() + (t - 1) * I * J, v, dx1.data(), dx2.data(), I, D, J);
      }
      // the votes' gradients: d[v, v^2]_ij = sum_t r^t_ij dP^t_j + sum_t dL^t_ij x^t_j, a sum over terms of a
      // coefficient per child times a factor per pose entry; then dv = d[v] + 2 v d[v^2], dV = dv / s (s is a
      // constant), and V = u W (+ offset). Two children at a time share the factors' loads.
      for (int64_t t = 0; t + 1 < iterations; ++t) {
        std::copy_n(group.steps[t].x1.data(), D * J, dP1.data() + (iterations + t) * D * J);
        std::copy_n(group.steps[t].x2.data(), D * J, dP2.data() + (iterations + t) * D * J);
      }
      const scalar_t inv_scale = scalar_t(1) / group.scale;
      for (int64_t i0 = 0; i0 < I; i0 += 2) {
        const int64_t children = std::min<int64_t>(2, I - i0);
        for (int64_t c = 0; c < children; ++c) {  // coefficients (terms, J): r^t = R^t a, then dL^t
          const int64_t i = i0 + c;
          scalar_t* coef = coefficients.data() + c * terms * J;
          for (int64_t t = 0; t < iterations; ++t) {
            const scalar_t* Rt = group.assign.data() + (t * I + i) * J;
            for (int64_t j = 0; j < J; ++j) coef[t * J + j] = (t == 0 ? scalar_t(1) / scalar_t(J) : Rt[j]) * ag[i];
          }
          for (int64_t t = 0; t + 1 < iterations; ++t)
            std::copy_n(dL.data() + (t * I + i) * J, J, coef + (iterations + t) * J);
        }
        if (children == 2) {
          G_::template vote_gradients<2>(coefficients.data(), dP1.data(), dP2.data(), terms, v + i0 * D * J,
                                         inv_scale, dv.data(), D, J);
        } else {
          G_::template vote_gradients<1>(coefficients.data(), dP1.data(), dP2.data(), terms, v + i0 * D * J,
                                         inv_scale, dv.data(), D, J);
        }
        // du_i (R, C) = dV (R, K) W_i (C, K)^T;  dW_i (C, K) += u_i^T dV, with K = T J
        for (int64_t c = 0; c < children; ++c) {
          const int64_t i = i0 + c;
          add_dv_wt<scalar_t, N>(dv.data() + c * D * J, w + i * C * T * J, du + child_at[i] * R * C, R, C, T * J);
          add_ut_dv<scalar_t, N>(u + child_at[i] * R * C, dv.data() + c * D * J, dw + i * C * T * J, R, C, T * J);
        }
      }
      for (int64_t i = 0; i < I; ++i) da[child_at[i]] += dag[i];
    }
  });
}

Config config_of(const at::Tensor& children, const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                 const at::Tensor& a_in, const at::Tensor& beta_u, const at::Tensor& beta_a, int64_t kernel_size,
                 int64_t stride, const std::vector<double>& lambdas, bool normalize_cost, double eps) {
  TORCH_CHECK(children.dim() == 6 && weight.dim() == 4,
              "children (B, H, W, N, R, C) and weight (I, C, T, J) expected");
  const Windows windows(children, kernel_size, stride);
  Config k{windows, windows.G, windows.I, children.size(4), children.size(5), weight.size(2), weight.size(3),
           children.size(4) * weight.size(2), lambdas, normalize_cost, eps};
  TORCH_CHECK(k.iterations() >= 1, "EM routing needs at least one iteration");
  TORCH_CHECK(weight.size(0) == k.I && weight.size(1) == k.C, "weight does not match the children's windows");
  std::vector<const at::Tensor*> all{&children, &weight, &a_in, &beta_u, &beta_a};
  if (offset) all.push_back(&*offset);
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device().is_cpu(), "the EM routing kernel runs on the CPU");
    TORCH_CHECK(t->is_contiguous(), "the EM routing kernel needs contiguous inputs");
    TORCH_CHECK(t->scalar_type() == children.scalar_type(), "the EM routing kernel needs one dtype");
  }
  TORCH_CHECK(a_in.numel() == children.numel() / (k.R * k.C), "child activations (B, H, W, N) do not match the grid");
  TORCH_CHECK(beta_u.numel() == k.J && beta_a.numel() == k.J, "beta_u and beta_a (J) expected");
  TORCH_CHECK(!offset || offset->numel() == k.I * k.D, "offset (I, D) expected");
  return k;
}

// 4x4 poses and 32 parents (the conv capsule layers) compiled for their sizes; anything else at run time
template <typename F>
void with_shape(const Config& k, const F& f) {
  if (k.R == 4 && k.C == 4 && k.T == 4 && k.J == 32) {
    f(std::integral_constant<int, 4>{}, std::integral_constant<int, 32>{});
  } else if (k.R == 4 && k.C == 4 && k.T == 4) {
    f(std::integral_constant<int, 4>{}, std::integral_constant<int, 0>{});
  } else {
    f(std::integral_constant<int, 0>{}, std::integral_constant<int, 0>{});
  }
}

}  // namespace

std::vector<at::Tensor> em_forward(const at::Tensor& children, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& offset, const at::Tensor& a_in,
                                   const at::Tensor& beta_u, const at::Tensor& beta_a, int64_t kernel_size,
                                   int64_t stride, std::vector<double> lambdas, bool normalize_cost, double eps,
                                   bool with_assignments) {
  const Config k = config_of(children, weight, offset, a_in, beta_u, beta_a, kernel_size, stride, lambdas,
                             normalize_cost, eps);
  auto poses = at::empty({k.G, k.J, k.D}, children.options());
  auto activations = at::empty({k.G, k.J}, children.options());
  // the last assignments are as large as the votes / D: a conv layer that does not use them does not get them
  auto assignments = at::empty(with_assignments ? std::vector<int64_t>{k.G, k.I, k.J} : std::vector<int64_t>{0},
                               children.options());
  AT_DISPATCH_FLOATING_TYPES(children.scalar_type(), "em_forward", [&] {
    with_shape(k, [&](auto n, auto jn) {
    forward_kernel<scalar_t, decltype(n)::value, decltype(jn)::value>(k, children.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                             offset ? offset->data_ptr<scalar_t>() : nullptr, a_in.data_ptr<scalar_t>(),
                             beta_u.data_ptr<scalar_t>(), beta_a.data_ptr<scalar_t>(), poses.data_ptr<scalar_t>(),
                             activations.data_ptr<scalar_t>(),
                             with_assignments ? assignments.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {poses, activations, assignments};
}

// gradients for children, weight (I, C, T, J), child activations, beta_u, beta_a
std::vector<at::Tensor> em_backward(const std::optional<at::Tensor>& grad_poses,
                                    const std::optional<at::Tensor>& grad_activations,
                                    const std::optional<at::Tensor>& grad_assignments, const at::Tensor& children,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& offset,
                                    const at::Tensor& a_in, const at::Tensor& beta_u, const at::Tensor& beta_a,
                                    int64_t kernel_size, int64_t stride, std::vector<double> lambdas,
                                    bool normalize_cost, double eps) {
  const Config k = config_of(children, weight, offset, a_in, beta_u, beta_a, kernel_size, stride, lambdas,
                             normalize_cost, eps);
  const std::vector<std::pair<const std::optional<at::Tensor>*, int64_t>> grads{
      {&grad_poses, k.G * k.J * k.D}, {&grad_activations, k.G * k.J}, {&grad_assignments, k.G * k.I * k.J}};
  for (const auto& [t, n] : grads)
    TORCH_CHECK(!*t || ((*t)->is_contiguous() && (*t)->numel() == n &&
                        (*t)->scalar_type() == children.scalar_type()), "gradient of an unexpected shape");
  // zeroed image by image (Windows::zero_image), then the windows' gradients are added into the grid
  auto grad_children = at::empty_like(children);
  auto grad_a = at::empty_like(a_in);
  const int64_t threads = at::get_num_threads();
  auto grad_weight = at::zeros({threads, k.I, k.C, k.T, k.J}, weight.options());
  auto grad_beta = at::zeros({threads, 2, k.J}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(children.scalar_type(), "em_backward", [&] {
    auto ptr = [](const std::optional<at::Tensor>& t) { return t ? t->data_ptr<scalar_t>() : nullptr; };
    with_shape(k, [&](auto n, auto jn) {
    backward_kernel<scalar_t, decltype(n)::value, decltype(jn)::value>(k, ptr(grad_poses), ptr(grad_activations), ptr(grad_assignments),
                              children.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), ptr(offset),
                              a_in.data_ptr<scalar_t>(), beta_u.data_ptr<scalar_t>(), beta_a.data_ptr<scalar_t>(),
                              grad_children.data_ptr<scalar_t>(), grad_weight.data_ptr<scalar_t>(),
                              grad_a.data_ptr<scalar_t>(), grad_beta.data_ptr<scalar_t>());
    });
  });
  return {grad_children, grad_weight.sum(0), grad_a, grad_beta.select(1, 0).sum(0), grad_beta.select(1, 1).sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &em_forward, "EM routing from child poses and weights, votes never stored (CPU)");
  m.def("backward", &em_backward, "its backward pass, votes formed and iterations replayed again (CPU)");
}
