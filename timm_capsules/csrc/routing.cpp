// Fused inverted dot-product attention routing pass for the CPU.
//
// One pass computes, for every group g (an image, or an image x output position window), child i and
// parent type j:  vote v_ij = u_i W_ij,  agreement a_ij = <p_j, v_ij> * scale,  r_ij = softmax_j(a_ij),
// and the parents' new poses  P_j = sum_i r_ij act_i v_ij.  Plain tensor ops must write every vote to
// memory (groups x children x parents x d values, up to ~1 GB for the paper's CIFAR models) and keep
// it for the backward pass. Here the votes of one child (parents x d values) live in a small buffer
// that stays in L1, and the backward pass recomputes them: memory is the inputs and outputs only.
// Each pass forms its votes again, also where the children stay the same over a layer's passes (the first
// layer's, in concurrent routing): keeping a window's votes for the next pass was measured (2026-11-30) and
// gained nothing at t = 5, because the votes of a CIFAR layer-1 window (590 KB) and the weights (590 KB) do
// not both fit in one core's L2 (1 MB there), and a pass over kept votes was no faster than forming them.
//
// The children are read from their grid (windows.h): a convolutional layer's windows are never copied out,
// and their gradient is added back into the grid. A fully connected layer is one 1 x 1 window per image.
// (The file ends with the layers' other per-pose op, LayerNorm over each pose's entries, for PoseNorm.)
//
// Layouts (all contiguous; K = T * J, i.e. pose column t and parent type j flattened, j innermost, so that
// sums over a parent's columns and a parent's share spread over them are whole-vector operations):
//   children (B, H, W, N, R, C)   weight (I, C, K), I = k k N   activations (B, H, W, N), optional
//   parents (G, R, K), G = B Ho Wo   poses (G, R, K)   coefficients (G, I, J)   agreement (G, I, J)
// With K innermost, every hot loop runs over K contiguous values and vectorises, with the pose rows and
// columns inside it, so each weight column is loaded once for all rows. Coefficients and agreement are
// written only when asked for (they are as large as the votes / d); the backward pass recomputes them
// with the votes, so nothing but the inputs is kept for it.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "vector_math.h"
#include "windows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using namespace timm_capsules;

struct Sizes : Windows {
  int64_t R, C, J, T, K;
  int64_t parents_used;  // J, or fewer when the parents are zero-padded up to J (see routing_forward)
};

Sizes sizes_of(const at::Tensor& children, const at::Tensor& weight, int64_t kernel_size, int64_t stride,
               int64_t parent_cols) {
  TORCH_CHECK(children.dim() == 6 && weight.dim() == 3, "children (B, H, W, N, R, C) and weight (I, C, K) expected");
  Sizes s{};
  static_cast<Windows&>(s) = Windows(children, kernel_size, stride);
  s.R = children.size(4), s.C = children.size(5), s.T = parent_cols, s.K = weight.size(2);
  TORCH_CHECK(weight.size(0) == s.I && weight.size(1) == s.C, "weight does not match the children's windows");
  TORCH_CHECK(s.K % s.T == 0, "weight's last axis must be pose columns x parents");
  s.J = s.parents_used = s.K / s.T;
  return s;
}

// Kernels take the pose shape as a template argument N when it is N x N for children and parents (the
// paper's 4x4 matrix poses), so that loops over rows and columns unroll; N = 0 reads the sizes at run time.
template <int N>
struct Dims {
  int64_t J, K, R_, C_, T_;
  explicit Dims(const Sizes& s) : J(s.J), K(s.K), R_(s.R), C_(s.C), T_(s.T) {}
  int64_t R() const { return N ? N : R_; }
  int64_t C() const { return N ? N : C_; }
  int64_t T() const { return N ? N : T_; }
};

// v (R, K) = u (R, C) @ w (C, K), and per entry k its products with the parents, sum_r v[r] p[r], and
// (backward pass) with the poses' gradient, sum_r v[r] dP[r]: one sweep over k that loads each weight
// column once for all rows
// (The buffers never overlap, and saying so with __restrict__ lets the compiler keep u in registers and
// interleave the rows; without it each store to v orders every later load.)
template <typename scalar_t, int N, bool WithGrad = false>
inline void votes_and_agreement(const scalar_t* __restrict__ u, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ p, scalar_t* __restrict__ v, scalar_t* __restrict__ prod,
                                const Dims<N>& d, const scalar_t* __restrict__ dP = nullptr,
                                scalar_t* __restrict__ d_prod = nullptr) {
#pragma omp simd
  for (int64_t k = 0; k < d.K; ++k) {
    scalar_t with_parents = 0, with_grad = 0;
    for (int64_t r = 0; r < d.R(); ++r) {
      scalar_t vote = 0;
      for (int64_t c = 0; c < d.C(); ++c) vote += u[r * d.C() + c] * w[c * d.K + k];
      v[r * d.K + k] = vote;
      with_parents += vote * p[r * d.K + k];
      if constexpr (WithGrad) with_grad += vote * dP[r * d.K + k];
    }
    prod[k] = with_parents;
    if constexpr (WithGrad) d_prod[k] = with_grad;
  }
}

// out[j] = sum_t prod[t J + j] * scale
template <typename scalar_t, int N>
inline void per_parent_sum(const scalar_t* prod, scalar_t scale, scalar_t* out, const Dims<N>& d) {
#pragma omp simd
  for (int64_t j = 0; j < d.J; ++j) {
    scalar_t sum = 0;
    for (int64_t t = 0; t < d.T(); ++t) sum += prod[t * d.J + j];
    out[j] = sum * scale;
  }
}

// out[t J + j] = per_parent[j] * factor
template <typename scalar_t, int N>
inline void spread(const scalar_t* per_parent, scalar_t factor, scalar_t* out, const Dims<N>& d) {
  for (int64_t t = 0; t < d.T(); ++t) {
#pragma omp simd
    for (int64_t j = 0; j < d.J; ++j) out[t * d.J + j] = per_parent[j] * factor;
  }
}

// out (R, K) += mass (K) * v (R, K)
template <typename scalar_t, int N>
inline void add_weighted_votes(const scalar_t* __restrict__ mass, const scalar_t* __restrict__ v,
                               scalar_t* __restrict__ out, const Dims<N>& d) {
#pragma omp simd
  for (int64_t k = 0; k < d.K; ++k)
    for (int64_t r = 0; r < d.R(); ++r) out[r * d.K + k] += mass[k] * v[r * d.K + k];
}

// the votes' gradient dv = mass dP + pull p, and what it gives: d parents += pull v, dW (C, K) += u^T dv
template <typename scalar_t, int N>
inline void vote_gradients(const scalar_t* __restrict__ mass, const scalar_t* __restrict__ pull,
                           const scalar_t* __restrict__ dP, const scalar_t* __restrict__ p,
                           const scalar_t* __restrict__ v, const scalar_t* __restrict__ u, scalar_t* __restrict__ dv,
                           scalar_t* __restrict__ dp, scalar_t* __restrict__ dw, const Dims<N>& d) {
#pragma omp simd
  for (int64_t k = 0; k < d.K; ++k) {
    for (int64_t r = 0; r < d.R(); ++r) {
      const int64_t o = r * d.K + k;
      dv[o] = mass[k] * dP[o] + pull[k] * p[o];
      dp[o] += pull[k] * v[o];
    }
    for (int64_t c = 0; c < d.C(); ++c) {
      scalar_t sum = dw[c * d.K + k];
      for (int64_t r = 0; r < d.R(); ++r) sum += u[r * d.C() + c] * dv[r * d.K + k];
      dw[c * d.K + k] = sum;
    }
  }
}

// The paper's shapes in float: 4x4 poses and J = 16 or 32 parent types, so K = 4 J = 64 or 128 entries, all
// known at compile time. A child's votes are formed 16 entries at a time with each weight vector loaded once
// for the four pose rows, their agreement is summed straight into the parents' logits (registers), and the
// parents' sums (forward) or the parents' gradient (backward) are updated for two children at once, which then
// share the loads and stores of the group's rows. This roughly halves the loads and stores per child, the
// generic loops' limit.
template <int J>
struct FixedShape {
  static constexpr int K = 4 * J, KV = K / 16, JV = J / 16;
  using RowJ = Row<float, J>;
  using vec = vec64<float>;

  // added to the logits: 0 for the parents in use, -inf for padding, which the softmax then gives no share
  static RowJ logit_mask(int64_t parents_used) {
    alignas(64) float mask[J];
    for (int j = 0; j < J; ++j) mask[j] = j < parents_used ? 0.f : -INFINITY;
    return RowJ::load(mask);
  }

  // v (4, K) = u (4, 4) @ w (4, K), stored; returns the logits scale <p_j, v_j> and, WithGrad, <dP_j, v_j>
  template <bool WithGrad>
  static TC_INLINE void votes(const float* __restrict__ u, const float* __restrict__ w, const float* __restrict__ p,
                              const float* __restrict__ dP, float* __restrict__ v, RowJ& logits, RowJ& d_mass) {
    vec ub[16];
#pragma GCC unroll 16
    for (int x = 0; x < 16; ++x) ub[x] = vec{} + u[x];
    logits = RowJ::filled(0.f);
    if constexpr (WithGrad) d_mass = RowJ::filled(0.f);
#pragma GCC unroll 8
    for (int kv = 0; kv < KV; ++kv) {
      const int k = kv * 16;
      const vec w0 = load_vec(w + k), w1 = load_vec(w + K + k), w2 = load_vec(w + 2 * K + k),
                w3 = load_vec(w + 3 * K + k);
      vec agree = {}, d_agree = {};
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const vec vote = ub[r * 4] * w0 + ub[r * 4 + 1] * w1 + ub[r * 4 + 2] * w2 + ub[r * 4 + 3] * w3;
        store_vec(v + r * K + k, vote);
        agree += vote * load_vec(p + r * K + k);
        if constexpr (WithGrad) d_agree += vote * load_vec(dP + r * K + k);
      }
      logits.x[kv % JV] += agree;  // k = t J + j: vector kv holds parents (kv % JV) * 16 ...
      if constexpr (WithGrad) d_mass.x[kv % JV] += d_agree;
    }
  }

  // out (4, K) += sum over M children of mass_m (spread over the pose columns) * v_m
  template <int M>
  static TC_INLINE void add_weighted_votes(const RowJ* mass, float* const* v, float* __restrict__ out) {
#pragma GCC unroll 8
    for (int kv = 0; kv < KV; ++kv)
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const int o = r * K + kv * 16;
        vec sum = load_vec(out + o);
#pragma GCC unroll 2
        for (int m = 0; m < M; ++m) sum += mass[m].x[kv % JV] * load_vec(v[m] + o);
        store_vec(out + o, sum);
      }
  }

  // for M children: dv_m = mass_m dP + pull_m p (stored), dp += sum_m pull_m v_m, dw_m (4, K) += u_m^T dv_m
  template <int M>
  static TC_INLINE void vote_gradients(const RowJ* mass, const RowJ* pull, const float* __restrict__ dP,
                                       const float* __restrict__ p, float* const* v, const float* const* u,
                                       float* const* dv, float* __restrict__ dp, float* const* dw) {
#pragma GCC unroll 8
    for (int kv = 0; kv < KV; ++kv) {
      const int k = kv * 16;
      vec dPr[4], pr[4], dpr[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        dPr[r] = load_vec(dP + r * K + k), pr[r] = load_vec(p + r * K + k), dpr[r] = load_vec(dp + r * K + k);
      }
#pragma GCC unroll 2
      for (int m = 0; m < M; ++m) {
        const vec mass_k = mass[m].x[kv % JV], pull_k = pull[m].x[kv % JV];
        vec dvr[4];
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          dvr[r] = mass_k * dPr[r] + pull_k * pr[r];
          store_vec(dv[m] + r * K + k, dvr[r]);
          dpr[r] += pull_k * load_vec(v[m] + r * K + k);
        }
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          vec sum = load_vec(dw[m] + c * K + k);
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r) sum += u[m][r * 4 + c] * dvr[r];
          store_vec(dw[m] + c * K + k, sum);
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) store_vec(dp + r * K + k, dpr[r]);
    }
  }

  // f(pair, child, i) for a group's children from i, two at a time (pair = 2), then the last one alone (pair =
  // 1) when their number is odd; pair is a compile-time constant, child their capsule indexes in the grid
  template <typename F>
  static TC_INLINE void in_pairs(int64_t corner, const std::vector<int64_t>& offsets, int64_t I, const F& f) {
    int64_t i = 0;
    for (; i + 2 <= I; i += 2) {
      const int64_t child[2] = {corner + offsets[i], corner + offsets[i + 1]};
      f(std::integral_constant<int, 2>{}, child, i);
    }
    if (i < I) {
      const int64_t child[1] = {corner + offsets[i]};
      f(std::integral_constant<int, 1>{}, child, i);
    }
  }

  // M children (1, or a pair) of group g, from child i: votes, softmax, the group's sums; M known at compile
  // time so that the two children's softmax chains, which are independent, follow one another
  template <int M>
  static TC_INLINE void forward_children(const float* u, const float* w, const float* pg, const float* activations,
                                         float scale, const RowJ* mask, const int64_t* child, int64_t i, int64_t gi,
                                         float* const* v, float* og, float* coef, float* agree) {
    RowJ logits[M], mass[M], unused;
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) votes<false>(u + child[m] * 16, w + (i + m) * 4 * K, pg, nullptr, v[m], logits[m], unused);
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) {
      logits[m] = logits[m] * scale;
      if (mask) logits[m] += *mask;
      const RowJ r = softmax(logits[m]);
      if (agree) logits[m].store(agree + (gi + m) * J);
      if (coef) r.store(coef + (gi + m) * J);
      mass[m] = activations ? r * activations[child[m]] : r;
    }
    add_weighted_votes<M>(mass, v, og);
  }

  static void forward(const float* u, const float* w, const float* p, const float* activations, float scale,
                      const Sizes& s, float* out, float* coef, float* agree) {
    const std::vector<int64_t> offsets = s.offsets();
    const RowJ mask = logit_mask(s.parents_used);
    const RowJ* masked = s.parents_used < J ? &mask : nullptr;
    at::parallel_for(0, s.G, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float votes_of[2][4 * K];
      float* v[2] = {votes_of[0], votes_of[1]};
      for (int64_t g = begin; g < end; ++g) {
        const int64_t corner = s.corner(g);
        const float* pg = p + g * 4 * K;
        float* og = out + g * 4 * K;
        std::fill(og, og + 4 * K, 0.f);
        in_pairs(corner, offsets, s.I, [&](auto pair, const int64_t* child, int64_t i) {
          forward_children<decltype(pair)::value>(u, w, pg, activations, scale, masked, child, i, g * s.I + i, v, og,
                                                  coef, agree);
        });
      }
    });
  }

  // M children of group g, from child i: votes again, the softmax's backward, the gradients of the votes
  template <int M>
  static TC_INLINE void backward_children(const float* dPg, const float* grad_coef, const float* grad_agree,
                                          const float* u, const float* w, const float* pg,
                                          const float* activations, float scale, const RowJ* mask,
                                          const int64_t* child, int64_t i, int64_t gi, float* const* v,
                                          float* const* dv, float* du, float* dw, float* dpg, float* grad_activations) {
    RowJ logits[M], d_mass[M], mass[M], pull[M];
    const float* ui[M];
    float* dwi[M];
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) {
      ui[m] = u + child[m] * 16, dwi[m] = dw + (i + m) * 4 * K;
      votes<true>(ui[m], w + (i + m) * 4 * K, pg, dPg, v[m], logits[m], d_mass[m]);
    }
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) {
      const float act = activations ? activations[child[m]] : 1.f;
      const RowJ r = softmax(mask ? logits[m] * scale + *mask : logits[m] * scale);
      // P_j = sum_i r_ij act_i v_ij: the mass r_ij act_i has gradient <dP_j, v_ij>
      RowJ d_coef = d_mass[m] * act;
      if (grad_coef) d_coef += RowJ::load(grad_coef + (gi + m) * J);
      if (grad_activations) grad_activations[child[m]] += sum_lanes(d_mass[m] * r);
      // softmax backward, then a_ij = scale <p_j, v_ij>
      RowJ d_logit = r * (d_coef - RowJ::filled(sum_lanes(r * d_coef)));
      if (grad_agree) d_logit += RowJ::load(grad_agree + (gi + m) * J);
      mass[m] = r * act, pull[m] = d_logit * scale;
    }
    vote_gradients<M>(mass, pull, dPg, pg, v, ui, dv, dpg, dwi);
#pragma GCC unroll 2
    for (int m = 0; m < M; ++m) add_dv_wt<float, 4>(dv[m], w + (i + m) * 4 * K, du + child[m] * 16, 4, 4, K);
  }

  static void backward(const float* dP, const float* grad_coef, const float* grad_agree, const float* u,
                       const float* w, const float* p, const float* activations, float scale, const Sizes& s,
                       float* du, float* dw_all, float* dp, float* grad_activations) {
    const std::vector<int64_t> offsets = s.offsets();
    const int64_t windows_per_image = s.Ho * s.Wo;
    const RowJ mask = logit_mask(s.parents_used);
    const RowJ* masked = s.parents_used < J ? &mask : nullptr;
    at::parallel_for(0, s.B, 1, [&](int64_t image_begin, int64_t image_end) {
      float* dw = dw_all + at::get_thread_num() * s.I * 4 * K;
      alignas(64) float votes_of[2][4 * K], dv_of[2][4 * K];
      float* v[2] = {votes_of[0], votes_of[1]};
      float* dv[2] = {dv_of[0], dv_of[1]};
      for (int64_t g = image_begin * windows_per_image; g < image_end * windows_per_image; ++g) {
        if (g % windows_per_image == 0) s.zero_image(du, g / windows_per_image, 16);
        const int64_t corner = s.corner(g);
        const float* pg = p + g * 4 * K;
        const float* dPg = dP + g * 4 * K;
        float* dpg = dp + g * 4 * K;
        std::fill(dpg, dpg + 4 * K, 0.f);
        in_pairs(corner, offsets, s.I, [&](auto pair, const int64_t* child, int64_t i) {
          backward_children<decltype(pair)::value>(dPg, grad_coef, grad_agree, u, w, pg, activations, scale, masked,
                                                   child, i, g * s.I + i, v, dv, du, dw, dpg, grad_activations);
        });
      }
    });
  }
};

template <typename scalar_t, int N>
void forward_kernel(const scalar_t* u, const scalar_t* w, const scalar_t* p, const scalar_t* activations,
                    scalar_t scale, const Sizes& s, scalar_t* out, scalar_t* coef, scalar_t* agree) {
  if constexpr (std::is_same_v<scalar_t, float> && N == 4) {
    if (s.J == 32) return FixedShape<32>::forward(u, w, p, activations, scale, s, out, coef, agree);
    if (s.J == 16) return FixedShape<16>::forward(u, w, p, activations, scale, s, out, coef, agree);
  }
  const Dims<N> d(s);
  const std::vector<int64_t> offsets = s.offsets();
  at::parallel_for(0, s.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> v(d.R() * d.K), prod(d.K), mass(d.K), logits(d.J), r(d.J);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t corner = s.corner(g);
      const scalar_t* pg = p + g * d.R() * d.K;
      scalar_t* og = out + g * d.R() * d.K;
      std::fill(og, og + d.R() * d.K, scalar_t(0));
      for (int64_t i = 0; i < s.I; ++i) {
        const int64_t child = corner + offsets[i], gi = g * s.I + i;
        votes_and_agreement(u + child * d.R() * d.C(), w + i * d.C() * d.K, pg, v.data(), prod.data(), d);
        per_parent_sum(prod.data(), scale, logits.data(), d);
        softmax(logits.data(), r.data(), d.J);
        if (agree) std::copy(logits.begin(), logits.end(), agree + gi * d.J);
        if (coef) std::copy(r.begin(), r.end(), coef + gi * d.J);
        spread(r.data(), activations ? activations[child] : scalar_t(1), mass.data(), d);
        add_weighted_votes(mass.data(), v.data(), og, d);
      }
    }
  });
}

// Threads split the images, so that the windows of one image, which overlap, add their gradients into
// the children's grid from one thread.
template <typename scalar_t, int N>
void backward_kernel(const scalar_t* dP, const scalar_t* grad_coef, const scalar_t* grad_agree, const scalar_t* u,
                     const scalar_t* w, const scalar_t* p, const scalar_t* activations, scalar_t scale, const Sizes& s,
                     scalar_t* du, scalar_t* dw_all, scalar_t* dp, scalar_t* grad_activations) {
  if constexpr (std::is_same_v<scalar_t, float> && N == 4) {
    if (s.J == 32 || s.J == 16) {
      const auto backward = s.J == 32 ? FixedShape<32>::backward : FixedShape<16>::backward;
      return backward(dP, grad_coef, grad_agree, u, w, p, activations, scale, s, du, dw_all, dp, grad_activations);
    }
  }
  const Dims<N> d(s);
  const std::vector<int64_t> offsets = s.offsets();
  const int64_t windows_per_image = s.Ho * s.Wo;
  at::parallel_for(0, s.B, 1, [&](int64_t image_begin, int64_t image_end) {
    // each thread sums its own weight gradient; they are added up afterwards
    scalar_t* dw = dw_all + at::get_thread_num() * s.I * d.C() * d.K;
    std::vector<scalar_t> v(d.R() * d.K), dv(d.R() * d.K), prod(d.K), d_prod(d.K), mass(d.K), pull(d.K);
    std::vector<scalar_t> d_mass(d.J), d_coef(d.J), d_logit(d.J), logits(d.J), r(d.J);
    for (int64_t g = image_begin * windows_per_image; g < image_end * windows_per_image; ++g) {
      if (g % windows_per_image == 0) s.zero_image(du, g / windows_per_image, d.R() * d.C());
      const int64_t corner = s.corner(g);
      const scalar_t* pg = p + g * d.R() * d.K;
      const scalar_t* dPg = dP + g * d.R() * d.K;
      scalar_t* dpg = dp + g * d.R() * d.K;
      std::fill(dpg, dpg + d.R() * d.K, scalar_t(0));
      for (int64_t i = 0; i < s.I; ++i) {
        const int64_t child = corner + offsets[i], gi = g * s.I + i;
        const scalar_t* ui = u + child * d.R() * d.C();
        const scalar_t* wi = w + i * d.C() * d.K;
        const scalar_t act = activations ? activations[child] : scalar_t(1);
        // P_j = sum_i r_ij act_i v_ij: the gradient of the mass r_ij act_i is <dP_j, v_ij>
        votes_and_agreement<scalar_t, N, true>(ui, wi, pg, v.data(), prod.data(), d, dPg, d_prod.data());
        per_parent_sum(prod.data(), scale, logits.data(), d);
        softmax(logits.data(), r.data(), d.J);
        per_parent_sum(d_prod.data(), scalar_t(1), d_mass.data(), d);
        scalar_t weighted = 0;
        for (int64_t j = 0; j < d.J; ++j) {
          d_coef[j] = d_mass[j] * act + (grad_coef ? grad_coef[gi * d.J + j] : scalar_t(0));
          weighted += r[j] * d_coef[j];
        }
        if (grad_activations) {
          scalar_t d_act = 0;
          for (int64_t j = 0; j < d.J; ++j) d_act += d_mass[j] * r[j];
          grad_activations[child] += d_act;
        }
        // softmax backward, then a_ij = scale <p_j, v_ij>
        for (int64_t j = 0; j < d.J; ++j)
          d_logit[j] = (r[j] * (d_coef[j] - weighted) + (grad_agree ? grad_agree[gi * d.J + j] : scalar_t(0))) * scale;
        spread(r.data(), act, mass.data(), d);
        spread(d_logit.data(), scalar_t(1), pull.data(), d);
        vote_gradients(mass.data(), pull.data(), dPg, pg, v.data(), ui, dv.data(), dpg, dw + i * d.C() * d.K, d);
        add_dv_wt<scalar_t, N>(dv.data(), wi, du + child * d.R() * d.C(), d.R(), d.C(), d.K);
      }
    }
  });
}

// the paper's 4x4 matrix poses get loops unrolled at compile time; anything else reads its sizes at run time
template <typename F>
void with_pose_shape(const Sizes& s, const F& f) {
  if (s.R == 4 && s.C == 4 && s.T == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 0>{});
  }
}

void check_inputs(const at::Tensor& children, const at::Tensor& weight, const at::Tensor& parents,
                  const std::optional<at::Tensor>& activations, const Sizes& s) {
  for (const at::Tensor* t : {&children, &weight, &parents}) {
    TORCH_CHECK(t->device().is_cpu(), "the fused routing kernel runs on the CPU");
    TORCH_CHECK(t->is_contiguous(), "the fused routing kernel needs contiguous inputs");
    TORCH_CHECK(t->scalar_type() == children.scalar_type(), "the fused routing kernel needs one dtype");
  }
  TORCH_CHECK(parents.size(0) == s.G && parents.size(1) == s.R && parents.size(2) == s.K,
              "parents (G, R, K) do not match the children's windows and the weight");
  if (activations) {
    TORCH_CHECK(activations->is_contiguous() && activations->scalar_type() == children.scalar_type() &&
                activations->numel() == s.B * s.H * s.W * s.N, "activations (B, H, W, N) do not match the children");
  }
}

// Fewer than 16 parent types in float 4x4 poses (a class layer's 10) take the 16-parent fixed-shape passes: the
// parents and their weights are zero-padded to 16 types, and the softmax gives the padding no share (its logits
// are masked to -inf). 16 / J of the arithmetic at about three times the generic loops' rate.
bool padded_to_16(const at::Tensor& children, const Sizes& s) {
  return children.scalar_type() == at::kFloat && s.R == 4 && s.C == 4 && s.T == 4 && s.J < 16;
}

Sizes with_16_parents(Sizes s) {
  s.J = 16, s.K = 4 * 16;  // parents_used stays the real J
  return s;
}

// (..., T J) -> (..., T 16): parent j of pose column t moves from t J + j to t 16 + j, zeros after J; and back
at::Tensor pad_parents(const at::Tensor& t, int64_t J) {
  return at::constant_pad_nd(t.unflatten(-1, {-1, J}), {0, 16 - J}).flatten(-2);
}

at::Tensor unpad_parents(const at::Tensor& t, int64_t J) {
  return t.unflatten(-1, {-1, 16}).narrow(-1, 0, J).flatten(-2).contiguous();
}

std::vector<at::Tensor> forward_pass(const at::Tensor& children, const at::Tensor& weight, const at::Tensor& parents,
                                     const std::optional<at::Tensor>& activations, const Sizes& s, double scale,
                                     bool with_routing) {
  auto poses = at::empty({s.G, s.R, s.K}, children.options());
  auto routing_shape = with_routing ? std::vector<int64_t>{s.G, s.I, s.J} : std::vector<int64_t>{0};
  auto coefficients = at::empty(routing_shape, children.options());
  auto agreement = at::empty(routing_shape, children.options());
  AT_DISPATCH_FLOATING_TYPES(children.scalar_type(), "routing_forward", [&] {
    with_pose_shape(s, [&](auto four) {
      constexpr int N = decltype(four)::value;
      forward_kernel<scalar_t, N>(
          children.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), parents.data_ptr<scalar_t>(),
          activations ? activations->data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(scale), s,
          poses.data_ptr<scalar_t>(), with_routing ? coefficients.data_ptr<scalar_t>() : nullptr,
          with_routing ? agreement.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {poses, coefficients, agreement};
}

std::vector<at::Tensor> backward_pass(const at::Tensor& grad_poses, const std::optional<at::Tensor>& grad_coefficients,
                                      const std::optional<at::Tensor>& grad_agreement, const at::Tensor& children,
                                      const at::Tensor& weight, const at::Tensor& parents,
                                      const std::optional<at::Tensor>& activations, const Sizes& s, double scale) {
  auto grad_children = at::empty_like(children);  // zeroed image by image (Windows::zero_image), windows add in
  auto grad_parents = at::empty_like(parents);
  auto grad_weight_per_thread = at::zeros({at::get_num_threads(), s.I, s.C, s.K}, weight.options());
  auto grad_activations = activations ? at::zeros_like(*activations) : at::empty({0}, children.options());
  AT_DISPATCH_FLOATING_TYPES(children.scalar_type(), "routing_backward", [&] {
    with_pose_shape(s, [&](auto four) {
      constexpr int N = decltype(four)::value;
      backward_kernel<scalar_t, N>(
          grad_poses.data_ptr<scalar_t>(), grad_coefficients ? grad_coefficients->data_ptr<scalar_t>() : nullptr,
          grad_agreement ? grad_agreement->data_ptr<scalar_t>() : nullptr, children.data_ptr<scalar_t>(),
          weight.data_ptr<scalar_t>(), parents.data_ptr<scalar_t>(),
          activations ? activations->data_ptr<scalar_t>() : nullptr, static_cast<scalar_t>(scale), s,
          grad_children.data_ptr<scalar_t>(), grad_weight_per_thread.data_ptr<scalar_t>(),
          grad_parents.data_ptr<scalar_t>(), activations ? grad_activations.data_ptr<scalar_t>() : nullptr);
    });
  });
  return {grad_children, grad_weight_per_thread.sum(0), grad_parents, grad_activations};
}

}  // namespace

// with_routing: also return coefficients and agreement (G, I, J); else they are empty
std::vector<at::Tensor> routing_forward(const at::Tensor& children, const at::Tensor& weight, const at::Tensor& parents,
                                        const std::optional<at::Tensor>& activations, int64_t kernel_size,
                                        int64_t stride, int64_t parent_cols, double scale, bool with_routing) {
  const Sizes s = sizes_of(children, weight, kernel_size, stride, parent_cols);
  check_inputs(children, weight, parents, activations, s);
  if (!padded_to_16(children, s)) return forward_pass(children, weight, parents, activations, s, scale, with_routing);
  auto outputs = forward_pass(children, pad_parents(weight, s.J), pad_parents(parents, s.J), activations,
                              with_16_parents(s), scale, with_routing);
  outputs[0] = unpad_parents(outputs[0], s.J);
  if (with_routing)
    for (int o : {1, 2}) outputs[o] = outputs[o].narrow(-1, 0, s.J).contiguous();
  return outputs;
}

std::vector<at::Tensor> routing_backward(const at::Tensor& grad_poses, const std::optional<at::Tensor>& grad_coefficients,
                                         const std::optional<at::Tensor>& grad_agreement, const at::Tensor& children,
                                         const at::Tensor& weight, const at::Tensor& parents,
                                         const std::optional<at::Tensor>& activations, int64_t kernel_size,
                                         int64_t stride, int64_t parent_cols, double scale) {
  const Sizes s = sizes_of(children, weight, kernel_size, stride, parent_cols);
  check_inputs(children, weight, parents, activations, s);
  TORCH_CHECK(grad_poses.is_contiguous(), "contiguous gradients expected");
  for (const auto* t : {&grad_coefficients, &grad_agreement})
    TORCH_CHECK(!*t || ((*t)->is_contiguous() && (*t)->numel() == s.G * s.I * s.J), "gradient of (G, I, J) expected");
  if (!padded_to_16(children, s))
    return backward_pass(grad_poses, grad_coefficients, grad_agreement, children, weight, parents, activations, s, scale);
  const auto pad_routing = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t) return std::nullopt;
    return at::constant_pad_nd(t->view({s.G, s.I, s.J}), {0, 16 - s.J});
  };
  auto grads = backward_pass(pad_parents(grad_poses, s.J), pad_routing(grad_coefficients), pad_routing(grad_agreement),
                             children, pad_parents(weight, s.J), pad_parents(parents, s.J), activations,
                             with_16_parents(s), scale);
  for (int o : {1, 2}) grads[o] = unpad_parents(grads[o], s.J);
  return grads;
}

// ---- LayerNorm over each pose's 16 entries -----------------------------------------------------------------
// torch's layer_norm pays a fixed cost per row that dominates rows of 16 values (the paper's 4x4 poses): about 1.2
// ns a value, 5 ms for the primary capsules of a CIFAR batch of 32, as much as their conv. Here a float pose is
// one vector, and its mean and variance are butterfly sums in registers; doubles (gradcheck) and other pose
// sizes run plain loops. Nothing but the input is kept for the backward pass, which recomputes the statistics.

namespace {

template <typename T>
struct PoseStats {  // a pose's mean and 1 / standard deviation
  T mean, rstd;
};

template <typename T>
PoseStats<T> pose_stats(const T* x, int64_t d, T eps) {
  T mean = 0, var = 0;
  for (int64_t e = 0; e < d; ++e) mean += x[e];
  mean /= d;
  for (int64_t e = 0; e < d; ++e) var += (x[e] - mean) * (x[e] - mean);
  return {mean, T(1) / std::sqrt(var / d + eps)};
}

// (the mean of a float pose, its entries minus the mean) in every lane
TC_INLINE vec64<float> centered_pose(vec64<float> x) {
  const auto add = [](vec64<float> a, vec64<float> b) { return a + b; };
  return x - all_lanes(x, add) * (1.f / 16);
}

TC_INLINE float pose_rstd(vec64<float> centered, float eps) {
  const auto add = [](vec64<float> a, vec64<float> b) { return a + b; };
  return 1.f / std::sqrt(all_lanes(centered * centered, add)[0] * (1.f / 16) + eps);
}

template <typename scalar_t>
void pose_norm_rows(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t eps, scalar_t* y, int64_t d,
                    int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (d == 16) {
      const vec64<float> wv = load_vec(w), bv = load_vec(b);
      for (int64_t row = begin; row < end; ++row) {
        const vec64<float> centered = centered_pose(load_vec(x + row * 16));
        store_vec(y + row * 16, centered * (wv * pose_rstd(centered, eps)) + bv);
      }
      return;
    }
  }
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = x + row * d;
    const PoseStats<scalar_t> st = pose_stats(xr, d, eps);
    for (int64_t e = 0; e < d; ++e) y[row * d + e] = (xr[e] - st.mean) * st.rstd * w[e] + b[e];
  }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dy w; dw += dy xhat and db += dy, summed in double per
// block of rows (a float sum over a whole batch's poses would lose digits)
template <typename scalar_t>
void pose_norm_backward_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* w, scalar_t eps, scalar_t* dx,
                             double* dw, double* db, int64_t d, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (d == 16) {
      const auto add = [](vec64<float> a, vec64<float> b) { return a + b; };
      const vec64<float> wv = load_vec(w);
      for (int64_t block = begin; block < end; block += 64) {
        vec64<float> dw_block = {}, db_block = {};
        for (int64_t row = block; row < std::min(block + 64, end); ++row) {
          const vec64<float> centered = centered_pose(load_vec(x + row * 16));
          const float rstd = pose_rstd(centered, eps);
          const vec64<float> xhat = centered * rstd, dyr = load_vec(dy + row * 16), g = dyr * wv;
          const vec64<float> g_mean = all_lanes(g, add) * (1.f / 16), gx_mean = all_lanes(g * xhat, add) * (1.f / 16);
          store_vec(dx + row * 16, (g - g_mean - xhat * gx_mean) * rstd);
          dw_block += dyr * xhat, db_block += dyr;
        }
        for (int e = 0; e < 16; ++e) dw[e] += dw_block[e], db[e] += db_block[e];
      }
      return;
    }
  }
  std::vector<scalar_t> g(d), xhat(d);
  for (int64_t row = begin; row < end; ++row) {
    const scalar_t* xr = x + row * d;
    const scalar_t* dyr = dy + row * d;
    const PoseStats<scalar_t> st = pose_stats(xr, d, eps);
    scalar_t g_mean = 0, gx_mean = 0;
    for (int64_t e = 0; e < d; ++e) {
      xhat[e] = (xr[e] - st.mean) * st.rstd, g[e] = dyr[e] * w[e];
      g_mean += g[e], gx_mean += g[e] * xhat[e];
      dw[e] += dyr[e] * xhat[e], db[e] += dyr[e];
    }
    g_mean /= d, gx_mean /= d;
    for (int64_t e = 0; e < d; ++e) dx[row * d + e] = (g[e] - g_mean - xhat[e] * gx_mean) * st.rstd;
  }
}

void check_pose_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "pose_norm: a contiguous CPU tensor expected");
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->is_contiguous() && t->dim() == 1 && t->size(0) == x.size(-1) && t->scalar_type() == x.scalar_type(),
                "pose_norm: weight and bias (d,) of the input's dtype expected");
}

}  // namespace

at::Tensor pose_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_pose_norm(x, weight, bias);
  auto y = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pose_norm_forward", [&] {
    at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
      pose_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
                               static_cast<scalar_t>(eps), y.data_ptr<scalar_t>(), d, begin, end);
    });
  });
  return y;
}

// gradients for x, weight and bias
std::vector<at::Tensor> pose_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                           double eps) {
  check_pose_norm(x, weight, weight);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes(), "pose_norm: a contiguous gradient like x expected");
  auto grad_x = at::empty_like(x);
  const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(d, 1);
  // each thread sums its own weight and bias gradients (rows: w, then b); they are added up afterwards
  auto sums = at::zeros({at::get_num_threads(), 2, d}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pose_norm_backward", [&] {
    at::parallel_for(0, rows, 2048, [&](int64_t begin, int64_t end) {
      double* mine = sums.data_ptr<double>() + at::get_thread_num() * 2 * d;
      pose_norm_backward_rows<scalar_t>(grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                        static_cast<scalar_t>(eps), grad_x.data_ptr<scalar_t>(), mine, mine + d, d,
                                        begin, end);
    });
  });
  return {grad_x, sums.select(1, 0).sum(0).to(x.scalar_type()), sums.select(1, 1).sum(0).to(x.scalar_type())};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &routing_forward, "fused attention routing pass over a child grid's windows (CPU)");
  m.def("backward", &routing_backward, "its backward pass, votes recomputed (CPU)");
  m.def("pose_norm_forward", &pose_norm_forward, "LayerNorm over each pose's last-axis entries (CPU)");
  m.def("pose_norm_backward", &pose_norm_backward, "its backward pass, statistics recomputed (CPU)");
}
