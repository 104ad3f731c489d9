// Vector math shared by the fused CPU kernels (routing.cpp, em_routing.cpp): an exp that vectorises, sums
// and maxima across a vector without serial chains, a softmax built from them, rows of values held in vector
// registers, and the pose product both backward passes share (du = dv W^T).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// One 64-byte vector (16 floats, 8 doubles), GCC's vector extension: arithmetic on it is one instruction.
// (Spelled per type: GCC drops the attribute from an alias of a dependent type.) `unaligned` reads and
// writes one anywhere in a row of scalars.
template <typename T>
struct Vector64;
template <>
struct Vector64<float> {
  using type = float __attribute__((vector_size(64)));
  using unaligned = float __attribute__((vector_size(64), aligned(4), may_alias));
};
template <>
struct Vector64<double> {
  using type = double __attribute__((vector_size(64)));
  using unaligned = double __attribute__((vector_size(64), aligned(8), may_alias));
};
template <typename T>
using vec64 = typename Vector64<T>::type;

#define TC_INLINE inline __attribute__((always_inline))

template <typename T>
TC_INLINE vec64<T> load_vec(const T* x) {
  return *reinterpret_cast<const typename Vector64<T>::unaligned*>(x);
}

template <typename T>
TC_INLINE void store_vec(T* x, vec64<T> v) {
  *reinterpret_cast<typename Vector64<T>::unaligned*>(x) = v;
}

// A row of Width values (a multiple of a vector) in vector registers. A local scalar_t acc[Width] summed over
// in a nested loop is spilled to the stack by GCC, and every addition then waits on a store and a reload;
// a Row's loops over its vectors unroll at compile time, so it stays in registers.
template <typename T, int Width>
struct Row {
  static constexpr int kVectors = Width * static_cast<int>(sizeof(T)) / 64;
  static_assert(kVectors > 0 && Width * sizeof(T) % 64 == 0, "a Row is whole vectors");
  vec64<T> x[kVectors];

  static TC_INLINE Row filled(T value) {
    Row row;
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) row.x[k] = vec64<T>{} + value;
    return row;
  }
  static TC_INLINE Row load(const T* p) {
    Row row;
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) row.x[k] = load_vec(p + k * (64 / sizeof(T)));
    return row;
  }
  TC_INLINE void store(T* p) const {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) store_vec(p + k * (64 / sizeof(T)), x[k]);
  }
  TC_INLINE Row& operator+=(const Row& o) {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) x[k] += o.x[k];
    return *this;
  }
  friend TC_INLINE Row operator+(Row a, const Row& b) { return a += b; }
  friend TC_INLINE Row operator-(Row a, const Row& b) {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) a.x[k] -= b.x[k];
    return a;
  }
  friend TC_INLINE Row operator*(Row a, const Row& b) {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) a.x[k] *= b.x[k];
    return a;
  }
  friend TC_INLINE Row operator*(Row a, T b) {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) a.x[k] *= b;
    return a;
  }
  // elementwise max(m, |x|)
  friend TC_INLINE Row max_abs(Row m, const Row& x) {
#pragma GCC unroll 8
    for (int k = 0; k < kVectors; ++k) {
      const vec64<T> a = x.x[k] < 0 ? -x.x[k] : x.x[k];
      m.x[k] = a > m.x[k] ? a : m.x[k];
    }
    return m;
  }
  T max_lane() const {
    T lanes[Width];
    store(lanes);
    return max_of(lanes, Width);
  }
};

// e^x for vectors of floats, x <= 0: exp_nonpositive's arithmetic lane by lane
TC_INLINE vec64<float> exp_nonpositive(vec64<float> x) {
  using ints = int32_t __attribute__((vector_size(64)));
  x = x > -87.0f ? x : vec64<float>{} - 87.0f;
  const vec64<float> n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vec64<float> r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  vec64<float> q = vec64<float>{} + 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const vec64<float> e_r = q * r * r + r + 1.0f;
  return e_r * reinterpret_cast<vec64<float>>((__builtin_convertvector(n, ints) + 127) << 23);
}

// op over the 16 lanes of v, in every lane (a butterfly: no lane waits on a store)
template <typename Op>
TC_INLINE vec64<float> all_lanes(vec64<float> v, const Op& op) {
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  return op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
}

// the sum of a row of floats
template <int Width>
TC_INLINE float sum_lanes(const Row<float, Width>& row) {
  vec64<float> sum = row.x[0];
#pragma GCC unroll 8
  for (int k = 1; k < Row<float, Width>::kVectors; ++k) sum += row.x[k];
  return all_lanes(sum, [](vec64<float> a, vec64<float> b) { return a + b; })[0];
}

// softmax over a row of float logits, in registers
template <int Width>
TC_INLINE Row<float, Width> softmax(Row<float, Width> logits) {
  using R = Row<float, Width>;
  const auto larger = [](vec64<float> a, vec64<float> b) { return a > b ? a : b; };
  vec64<float> max = logits.x[0];
#pragma GCC unroll 8
  for (int k = 1; k < R::kVectors; ++k) max = larger(max, logits.x[k]);
  max = all_lanes(max, larger);
  vec64<float> sum = {};
#pragma GCC unroll 8
  for (int k = 0; k < R::kVectors; ++k) {
    logits.x[k] = exp_nonpositive(logits.x[k] - max);
    sum += logits.x[k];
  }
  const vec64<float> inverse = 1.0f / all_lanes(sum, [](vec64<float> a, vec64<float> b) { return a + b; });
#pragma GCC unroll 8
  for (int k = 0; k < R::kVectors; ++k) logits.x[k] *= inverse;
  return logits;
}

// softmax over the J parents; in registers for the common float widths (the conv layers' 16 and 32 parents)
template <typename scalar_t>
inline void softmax(const scalar_t* logits, scalar_t* out, int64_t J) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (J == 32) return softmax(Row<float, 32>::load(logits)).store(out);
    if (J == 16) return softmax(Row<float, 16>::load(logits)).store(out);
  }
  const scalar_t max = max_of(logits, J);
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) out[j] = exp_nonpositive(logits[j] - max);
  const scalar_t inverse = scalar_t(1) / sum_of(out, J);
#pragma omp simd
  for (int64_t j = 0; j < J; ++j) out[j] *= inverse;
}

// du (R, C) += dv (R, K) @ w (C, K)^T: R C dot products over K, each summed in lanes, then folded
template <typename scalar_t, int N>
inline void add_dv_wt(const scalar_t* __restrict__ dv, const scalar_t* __restrict__ w, scalar_t* __restrict__ du,
                      int64_t R, int64_t C, int64_t K) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* x = dv + r * K;
      const scalar_t* y = w + c * K;
      if (K % kLanes == 0) {
        scalar_t lanes[kLanes] = {};
        for (int64_t k = 0; k < K; k += kLanes) {
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) lanes[l] += x[k + l] * y[k + l];
        }
        fold<kLanes / 2>(lanes, [](scalar_t a, scalar_t b) { return a + b; });
        du[r * C + c] += lanes[0];
      } else {
        scalar_t sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += x[k] * y[k];
        du[r * C + c] += sum;
      }
    }
}

// The same for 4x4 float poses and K a multiple of 16: the 16 dot products are summed in 16 vectors, and a
// transpose-and-add tree folds them into one vector of 16 sums in 15 additions (instead of 16 trees of 4).
template <>
inline void add_dv_wt<float, 4>(const float* __restrict__ dv, const float* __restrict__ w, float* __restrict__ du,
                                int64_t, int64_t, int64_t K) {
  if (K % 16 != 0) {
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t c = 0; c < 4; ++c) {
        float sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += dv[r * K + k] * w[c * K + k];
        du[r * 4 + c] += sum;
      }
    return;
  }
  vec64<float> a[16] = {};  // a[r * 4 + c]: lanes of the dot product (r, c)
  for (int64_t k = 0; k < K; k += 16) {
    const vec64<float> x[4] = {load_vec(dv + k), load_vec(dv + K + k), load_vec(dv + 2 * K + k),
                               load_vec(dv + 3 * K + k)};
    const vec64<float> y[4] = {load_vec(w + k), load_vec(w + K + k), load_vec(w + 2 * K + k),
                               load_vec(w + 3 * K + k)};
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) a[r * 4 + c] += x[r] * y[c];
  }
  // after each stage, vector m holds 8, 4, 2, then 1 partial sums of each of the dot products it covers
  vec64<float> b[8], c[4], e[2];
  for (int m = 0; m < 8; ++m)  // lanes: m (8) | m + 8 (8)
    b[m] = __builtin_shufflevector(a[m], a[m + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[m], a[m + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int m = 0; m < 4; ++m)  // lanes: m (4) | m + 4 | m + 8 | m + 12
    c[m] = __builtin_shufflevector(b[m], b[m + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[m], b[m + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int m = 0; m < 2; ++m)  // lanes: m (2) | m + 2 | m + 4 | ... | m + 14
    e[m] = __builtin_shufflevector(c[m], c[m + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[m], c[m + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  const vec64<float> sums =
      __builtin_shufflevector(e[0], e[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
      __builtin_shufflevector(e[0], e[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  for (int rc = 0; rc < 16; ++rc) du[rc] += sums[rc];
}

}  // namespace timm_capsules
