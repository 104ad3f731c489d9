// The windows of a child grid that a convolutional capsule layer routes, shared by both fused kernels:
// group g = (b, ho, wo) is the k x k window at (ho s, wo s) and its child i = (ky, kx, n) the capsule of type n
// at (ho s + ky, wo s + kx), so a layer's windows (9x its grid for k = 3) are never copied out, and their
// gradients are added back into the grid. A fully connected layer is one 1 x 1 window per image.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace timm_capsules {

struct Windows {
  int64_t B = 0, H = 0, W = 0, N = 0, k = 0, stride = 0, Ho = 0, Wo = 0, G = 0, I = 0;

  Windows() = default;
  // grid (B, H, W, N, ...)
  Windows(const at::Tensor& grid, int64_t kernel_size, int64_t stride_)
      : B(grid.size(0)), H(grid.size(1)), W(grid.size(2)), N(grid.size(3)), k(kernel_size), stride(stride_) {
    TORCH_CHECK(k >= 1 && stride >= 1 && H >= k && W >= k, "the windows do not fit the child grid");
    Ho = (H - k) / stride + 1, Wo = (W - k) / stride + 1, G = B * Ho * Wo, I = k * k * N;
  }

  // where child i of a window is, in capsules from the window's corner: (ky W + kx) N + n
  std::vector<int64_t> offsets() const {
    std::vector<int64_t> offsets(I);
    for (int64_t ky = 0; ky < k; ++ky)
      for (int64_t kx = 0; kx < k; ++kx)
        for (int64_t n = 0; n < N; ++n) offsets[(ky * k + kx) * N + n] = (ky * W + kx) * N + n;
    return offsets;
  }

  // the capsule at group g's window corner
  int64_t corner(int64_t g) const {
    const int64_t b = g / (Ho * Wo), ho = g / Wo % Ho, wo = g % Wo;
    return ((b * H + ho * stride) * W + wo * stride) * N;
  }

  int64_t windows_per_image() const { return Ho * Wo; }

  // Zeroes image b's share of a (B, H, W, N, values) grid. A backward pass whose threads own whole images zeroes
  // an image's gradient when it reaches that image's first window: from the thread that adds into it, while it
  // is in that core's cache, rather than in a pass over the whole gradient beforehand.
  template <typename T>
  void zero_image(T* grid, int64_t image, int64_t values) const {
    const int64_t size = H * W * N * values;
    std::fill(grid + image * size, grid + (image + 1) * size, T(0));
  }
};

}  // namespace timm_capsules
