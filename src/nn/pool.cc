#include <algorithm>
#include <string>

#include "bnorm/nn/layers.h"
#include "common.h"
#include "parallel.h"

namespace bnorm::nn {
namespace {

// One step of the general path's scan: x replaces v when strictly greater, or when x is NaN and
// v is not (NaN propagates; the first maximum / first NaN wins).
inline bool takes(float x, float v) { return x > v || (x != x && v == v); }

// Kernel 2, stride 2: rows 2*oh and 2*oh+1 of each plane, branch-free selects in the general
// path's scan order (0,0), (0,1), (1,0), (1,1). am gets the window position 0..3 coded as the
// plane offset, as the general path stores it.
void pool2x2_planes(const float* xd, float* yd, int32_t* am, int64_t p0, int64_t p1, int64_t h,
                    int64_t w, int64_t ho, int64_t wo) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* xp = xd + p * h * w;
    for (int64_t oh = 0; oh < ho; ++oh) {
      const float* r0 = xp + 2 * oh * w;
      const float* r1 = r0 + w;
      float* yr = yd + (p * ho + oh) * wo;
      int32_t* ar = am + (p * ho + oh) * wo;
      const int32_t base = static_cast<int32_t>(2 * oh * w);
      const int32_t wi = static_cast<int32_t>(w);
      for (int64_t ow = 0; ow < wo; ++ow) {
        const float a = r0[2 * ow], b = r0[2 * ow + 1], c = r1[2 * ow], d = r1[2 * ow + 1];
        const int32_t col = static_cast<int32_t>(2 * ow);
        float v = a;
        int32_t idx = base + col;
        const bool tb = takes(b, v);
        v = tb ? b : v;
        idx = tb ? base + col + 1 : idx;
        const bool tc = takes(c, v);
        v = tc ? c : v;
        idx = tc ? base + wi + col : idx;
        const bool td = takes(d, v);
        v = td ? d : v;
        idx = td ? base + wi + col + 1 : idx;
        yr[ow] = v;
        ar[ow] = idx;
      }
    }
  }
}

}  // namespace

Status MaxPool2d::create(int64_t kernel, int64_t stride, std::unique_ptr<MaxPool2d>* out) {
  if (out == nullptr) return Status::invalid_argument("MaxPool2d: out: is null");
  if (kernel < 1 || kernel > 1024)
    return Status::invalid_argument("MaxPool2d: kernel: must be in [1, 1024], got " +
                                    std::to_string(kernel));
  if (stride < 0 || stride > 1024)
    return Status::invalid_argument("MaxPool2d: stride: must be in [0, 1024], got " +
                                    std::to_string(stride));
  std::unique_ptr<MaxPool2d> m(new MaxPool2d());
  m->k_ = kernel;
  m->stride_ = stride == 0 ? kernel : stride;
  *out = std::move(m);
  return Status();
}

Status MaxPool2d::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument(repr() + ": y: is null");
  if (x.rank() != 4 || x.dim(0) < 1 || x.dim(1) < 1 || x.dim(2) < k_ || x.dim(3) < k_)
    return detail::shape_error(repr(), "x",
                               "shape [N >= 1, C >= 1, H >= " + std::to_string(k_) +
                                   ", W >= " + std::to_string(k_) + "]",
                               x);
  if (x.dim(2) * x.dim(3) > (int64_t{1} << 31) - 1)
    return detail::shape_error(repr(), "x", "H * W < 2^31", x);
  if (y == &x) return Status::invalid_argument(repr() + ": y: must not be x");
  const int64_t n = x.dim(0), c = x.dim(1), h = x.dim(2), w = x.dim(3);
  const int64_t ho = (h - k_) / stride_ + 1, wo = (w - k_) / stride_ + 1;
  y->resize({n, c, ho, wo});
  argmax_.resize(static_cast<size_t>(n * c * ho * wo));
  const float* xd = x.data();
  float* yd = y->data();
  int32_t* am = argmax_.data();
  const int64_t per_plane = h * w;
  const int64_t k = k_, stride = stride_;
  auto general_planes = [k, stride](const float* xd, float* yd, int32_t* am, int64_t p0,
                                    int64_t p1, int64_t h, int64_t w, int64_t ho, int64_t wo) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* xp = xd + p * h * w;
      for (int64_t oh = 0; oh < ho; ++oh) {
        for (int64_t ow = 0; ow < wo; ++ow) {
          const int64_t h0 = oh * stride, w0 = ow * stride;
          int64_t best = h0 * w + w0;
          float v = xp[best];
          for (int64_t i = 0; i < k; ++i) {
            for (int64_t j = 0; j < k; ++j) {
              const int64_t idx = (h0 + i) * w + w0 + j;
              // Strictly greater keeps the first maximum; NaN propagates, as in PyTorch.
              if (takes(xp[idx], v)) {
                v = xp[idx];
                best = idx;
              }
            }
          }
          yd[(p * ho + oh) * wo + ow] = v;
          am[(p * ho + oh) * wo + ow] = static_cast<int32_t>(best);
        }
      }
    }
  };
  if (k_ == 2 && stride_ == 2) {
    detail::parallel_for(n * c, std::max<int64_t>(1, 16384 / per_plane),
                         [&](int64_t p0, int64_t p1) {
                           pool2x2_planes(xd, yd, am, p0, p1, h, w, ho, wo);
                         });
  } else {
    detail::parallel_for(n * c, std::max<int64_t>(1, 16384 / per_plane),
                         [&](int64_t p0, int64_t p1) {
                           general_planes(xd, yd, am, p0, p1, h, w, ho, wo);
                         });
  }
  in_shape_ = x.shape();
  out_shape_ = y->shape();
  return Status();
}

Status MaxPool2d::backward(const Tensor& dy, Tensor* dx) {
  if (in_shape_.empty())
    return Status::invalid_argument(repr() + ": backward: no forward before it");
  if (dy.shape() != out_shape_)
    return detail::shape_error(repr(), "dy",
                               "the forward's output shape " + shape_string(out_shape_), dy);
  if (dx == nullptr) return Status();
  if (dx == &dy) return Status::invalid_argument(repr() + ": dx: must not be dy");
  dx->resize(in_shape_);
  const int64_t planes = in_shape_[0] * in_shape_[1];
  const int64_t h = in_shape_[2], w = in_shape_[3];
  const int64_t in_plane = h * w;
  const int64_t ho = out_shape_[2], wo = out_shape_[3];
  const int64_t out_plane = ho * wo;
  const float* g = dy.data();
  float* d = dx->data();
  const int32_t* am = argmax_.data();
  const int64_t grain = std::max<int64_t>(1, 16384 / in_plane);
  if (k_ == 2 && stride_ == 2) {
    // Every input belongs to at most one window: write dx directly (no zero-fill + scatter).
    detail::parallel_for(planes, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        float* dp = d + p * in_plane;
        const float* gp = g + p * out_plane;
        const int32_t* ap = am + p * out_plane;
        for (int64_t oh = 0; oh < ho; ++oh) {
          float* r0 = dp + 2 * oh * w;
          float* r1 = r0 + w;
          const int32_t base = static_cast<int32_t>(2 * oh * w);
          const int32_t wi = static_cast<int32_t>(w);
          for (int64_t ow = 0; ow < wo; ++ow) {
            const float gv = gp[oh * wo + ow];
            const int32_t a = ap[oh * wo + ow] - base - static_cast<int32_t>(2 * ow);
            r0[2 * ow] = a == 0 ? gv : 0.0f;
            r0[2 * ow + 1] = a == 1 ? gv : 0.0f;
            r1[2 * ow] = a == wi ? gv : 0.0f;
            r1[2 * ow + 1] = a == wi + 1 ? gv : 0.0f;
          }
          if (2 * wo < w) {  // odd W: the last column is in no window
            r0[w - 1] = 0.0f;
            r1[w - 1] = 0.0f;
          }
        }
        if (2 * ho < h) std::fill_n(dp + (h - 1) * w, w, 0.0f);  // odd H: last row
      }
    });
  } else {
    detail::parallel_for(planes, grain, [&](int64_t p0, int64_t p1) {
      std::fill_n(d + p0 * in_plane, (p1 - p0) * in_plane, 0.0f);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = 0; j < out_plane; ++j)
          d[p * in_plane + am[p * out_plane + j]] += g[p * out_plane + j];
    });
  }
  return Status();
}

std::string MaxPool2d::repr() const {
  return "MaxPool2d(kernel_size=" + std::to_string(k_) + ", stride=" + std::to_string(stride_) +
         ", padding=0, dilation=1, ceil_mode=False)";
}

std::string MaxPool2d::architecture() const {
  return "{\"type\":\"MaxPool2d\",\"kernel\":" + std::to_string(k_) +
         ",\"stride\":" + std::to_string(stride_) + "}";
}

}  // namespace bnorm::nn
