// Vector math shared by the fused CPU kernels (routing.cpp, em_routing.cpp): an exp that vectorises, sums
// and maxima across a vector without serial chains, and a softmax built from them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace timm_capsules {

// e^x for x <= 0 (a logit minus the maximum) in a form the compiler vectorises, which std::exp is not:
// x = n ln2 + r with |r| <= ln2 / 2 (n rounded by adding and subtracting 1.5 * 2^23, which GCC vectorises
// where it leaves std::floor scalar without -ffast-math), e^r by Cephes' degree-6 polynomial (relative error
// < 2e-7), times 2^n written into the exponent bits. Below -87 e^x underflows a float; it is clamped there
// (a softmax share below 1e-37). Doubles (gradcheck) keep std::exp.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round: std::floor stays scalar
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts: r stays exact
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e_r = q * r * r + r + 1.0f;
  return e_r * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

inline double exp_nonpositive(double x) { return std::exp(x); }

// Sums and maxima across a vector without a serial chain: for a reduction clause GCC stores the vector and
// adds its 16 lanes one after another (64 dependent cycles); a halving tree over 16 lanes stays in registers.
constexpr int kLanes = 16;

template <int Width, typename scalar_t, typename Op>
inline void fold(scalar_t* lanes, const Op& op) {
  if constexpr (Width > 0) {
#pragma omp simd
    for (int l = 0; l < Width; ++l) lanes[l] = op(lanes[l], lanes[l + Width]);
    fold<Width / 2>(lanes, op);
  }
}

// op over x[0..n), n a multiple of kLanes
template <typename scalar_t, typename Op>
inline scalar_t reduce_lanes(const scalar_t* x, int64_t n, const Op& op) {
  scalar_t lanes[kLanes];
  std::copy(x, x + kLanes, lanes);
  for (int64_t i = kLanes; i < n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] = op(lanes[l], x[i + l]);
  }
  fold<kLanes / 2>(lanes, op);
  return lanes[0];
}

template <typename scalar_t>
inline scalar_t sum_of(const scalar_t* x, int64_t n) {
  if (n % kLanes == 0) return reduce_lanes(x, n, [](scalar_t a, scalar_t b) { return a + b; });
  scalar_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  return total;
}

// sum_i x[i] y[i]
template <typename scalar_t>
inline scalar_t dot_of(const scalar_t* x, const scalar_t* y, int64_t n) {
  if (n % kLanes != 0) {
    scalar_t total = 0;
    for (int64_t i = 0; i < n; ++i) total += x[i] * y[i];
    return total;
  }
  scalar_t lanes[kLanes] = {};
  for (int64_t i = 0; i < n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * y[i + l];
  }
  fold<kLanes / 2>(lanes, [](scalar_t a, scalar_t b) { return a + b; });
  return lanes[0];
}

// max_i |x[i]|, 0 for n = 0
template <typename scalar_t>
inline scalar_t max_abs_of(const scalar_t* x, int64_t n) {
  scalar_t lanes[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], std::abs(x[i + l]));
  }
  for (int64_t i = whole; i < n; ++i) lanes[0] = std::max(lanes[0], std::abs(x[i]));
  fold<kLanes / 2>(lanes, [](scalar_t a, scalar_t b) { return std::max(a, b); });
  return lanes[0];
}

template <typename scalar_t>
inline scalar_t max_of(const scalar_t* x, int64_t n) {
  if (n % kLanes == 0) return reduce_lanes(x, n, [](scalar_t a, scalar_t b) { return std::max(a, b); });
  return *std::max_element(x, x + n);
}

// softmax over the J parents
template <typename scalar_t>
inline void softmax(const scalar_t* logits, scalar_t* out, int64_t J) {
  const scalar_t max = max_of(logits, J);
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) out[j] = exp_nonpositive(logits[j] - max);
  const scalar_t inverse = scalar_t(1) / sum_of(out, J);
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) out[j] *= inverse;
}

}  // namespace timm_capsules
