#include <algorithm>
#include <cmath>
#include <string>

#include "bnorm/nn/layers.h"
#include "common.h"
#include "parallel.h"

namespace bnorm::nn {
namespace {

// Short-row copy and fill (im2col rows are 7..28 floats here): a plain loop the compiler
// vectorizes, instead of a memmove/memset call per row.
#if defined(__GNUC__) && !defined(__clang__)
#define BNORM_NN_NO_LIBCALL __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define BNORM_NN_NO_LIBCALL
#endif

BNORM_NN_NO_LIBCALL inline void copy_short(const float* __restrict src, int64_t n,
                                           float* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
BNORM_NN_NO_LIBCALL inline void zero_short(float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;
}

struct Geometry {
  int64_t c, h, w, k, stride, pad, ho, wo;
};

// cols[(ci * k + ki) * k + kj][oh * wo + ow] (rows ld apart) = x[ci][oh * s - p + ki][ow * s - p + kj], 0 outside.
BNORM_NN_NO_LIBCALL void im2col_strided(const float* x, const Geometry& g, float* cols, int64_t ld) {
  for (int64_t ci = 0; ci < g.c; ++ci) {
    const float* xc = x + ci * g.h * g.w;
    for (int64_t ki = 0; ki < g.k; ++ki) {
      for (int64_t kj = 0; kj < g.k; ++kj) {
        float* row = cols + ((ci * g.k + ki) * g.k + kj) * ld;
        // Output columns ow whose input column ow*s - p + kj lies in [0, w).
        const int64_t off = kj - g.pad;
        int64_t ow_lo = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
        int64_t ow_hi = (g.w - 1 - off) >= 0 ? (g.w - 1 - off) / g.stride + 1 : 0;
        ow_lo = std::min(ow_lo, g.wo);
        ow_hi = std::clamp(ow_hi, ow_lo, g.wo);
        for (int64_t oh = 0; oh < g.ho; ++oh) {
          float* r = row + oh * g.wo;
          const int64_t ih = oh * g.stride - g.pad + ki;
          if (ih < 0 || ih >= g.h) {
            zero_short(r, g.wo);
            continue;
          }
          const float* xr = xc + ih * g.w;  // input column of ow: ow * s + off
          zero_short(r, ow_lo);
          if (g.stride == 1) {
            copy_short(xr + ow_lo + off, ow_hi - ow_lo, r + ow_lo);
          } else {
            for (int64_t ow = ow_lo; ow < ow_hi; ++ow) r[ow] = xr[ow * g.stride + off];
          }
          zero_short(r + ow_hi, g.wo - ow_hi);
        }
      }
    }
  }
}

// The adjoint of im2col: dx[ci][ih][iw] += every cols entry that im2col copied from there.
void col2im_add_strided(const float* cols, int64_t ld, const Geometry& g, float* dx) {
  for (int64_t ci = 0; ci < g.c; ++ci) {
    float* dc = dx + ci * g.h * g.w;
    for (int64_t ki = 0; ki < g.k; ++ki) {
      for (int64_t kj = 0; kj < g.k; ++kj) {
        const float* row = cols + ((ci * g.k + ki) * g.k + kj) * ld;
        const int64_t off = kj - g.pad;
        int64_t ow_lo = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
        int64_t ow_hi = (g.w - 1 - off) >= 0 ? (g.w - 1 - off) / g.stride + 1 : 0;
        ow_lo = std::min(ow_lo, g.wo);
        ow_hi = std::clamp(ow_hi, ow_lo, g.wo);
        for (int64_t oh = 0; oh < g.ho; ++oh) {
          const int64_t ih = oh * g.stride - g.pad + ki;
          if (ih < 0 || ih >= g.h) continue;
          const float* r = row + oh * g.wo;
          float* dr = dc + ih * g.w;
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) dr[ow * g.stride + off] += r[ow];
        }
      }
    }
  }
}

}  // namespace

Status Conv2d::create(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride,
                      int64_t padding, bool bias, Rng& rng, std::unique_ptr<Conv2d>* out) {
  if (out == nullptr) return Status::invalid_argument("Conv2d: out: is null");
  auto bad = [](const char* name, const char* req, int64_t v) {
    return Status::invalid_argument(std::string("Conv2d: ") + name + ": must be " + req +
                                    ", got " + std::to_string(v));
  };
  if (in_channels < 1 || in_channels > (1 << 20)) return bad("in_channels", "in [1, 2^20]", in_channels);
  if (out_channels < 1 || out_channels > (1 << 20))
    return bad("out_channels", "in [1, 2^20]", out_channels);
  if (kernel < 1 || kernel > 64) return bad("kernel", "in [1, 64]", kernel);
  if (stride < 1 || stride > 64) return bad("stride", "in [1, 64]", stride);
  if (padding < 0 || padding > 64) return bad("padding", "in [0, 64]", padding);
  std::unique_ptr<Conv2d> m(new Conv2d());
  m->in_ = in_channels;
  m->out_ = out_channels;
  m->k_ = kernel;
  m->stride_ = stride;
  m->pad_ = padding;
  const auto w = static_cast<size_t>(out_channels * in_channels * kernel * kernel);
  m->weight_.resize(w);
  m->weight_grad_.assign(w, 0.0f);
  if (bias) {
    m->bias_.resize(static_cast<size_t>(out_channels));
    m->bias_grad_.assign(static_cast<size_t>(out_channels), 0.0f);
  }
  m->reset_parameters(rng);
  *out = std::move(m);
  return Status();
}

void Conv2d::reset_parameters(Rng& rng) {
  const int64_t fan_in = in_ * k_ * k_;
  kaiming_uniform_(weight_, fan_in, std::sqrt(5.0), rng);
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  uniform_(bias_, -bound, bound, rng);
}

namespace {

// Images per GEMM: enough columns for an efficient (and multi-threaded) GEMM, with the im2col
// workspace kept near 4 MB.
int64_t images_per_chunk(int64_t kdim, int64_t plane, int64_t n) {
  const int64_t budget = (int64_t{4} << 20) / static_cast<int64_t>(sizeof(float));
  return std::clamp<int64_t>(budget / std::max<int64_t>(1, kdim * plane), 1, n);
}

}  // namespace

Status Conv2d::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument(repr() + ": y: is null");
  if (x.rank() != 4 || x.dim(1) != in_ || x.dim(0) < 1)
    return detail::shape_error(repr(), "x", "shape [N >= 1, " + std::to_string(in_) + ", H, W]",
                               x);
  if (x.dim(2) + 2 * pad_ < k_ || x.dim(3) + 2 * pad_ < k_)
    return detail::shape_error(
        repr(), "x",
        "H + 2 * padding and W + 2 * padding >= kernel (" + std::to_string(k_) + ")", x);
  if (y == &x) return Status::invalid_argument(repr() + ": y: must not be x");
  const int64_t n = x.dim(0);
  const Geometry g{in_, x.dim(2), x.dim(3), k_, stride_, pad_,
                   (x.dim(2) + 2 * pad_ - k_) / stride_ + 1, (x.dim(3) + 2 * pad_ - k_) / stride_ + 1};
  const int64_t plane = g.ho * g.wo;
  const int64_t kdim = in_ * k_ * k_;
  const int64_t in_size = in_ * g.h * g.w;
  const int64_t chunk = images_per_chunk(kdim, plane, n);
  // cols[K, b * plane + j]: the chunk's images side by side, so one GEMM covers them all;
  // its product out[out, b * plane + j] is then copied into y's NCHW planes.
  cols_.resize(static_cast<size_t>(kdim * plane * chunk));
  dcols_.resize(static_cast<size_t>(out_ * plane * chunk));
  y->resize({n, out_, g.ho, g.wo});
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t b = std::min(chunk, n - i0);
    const int64_t cols_ld = b * plane;
    detail::parallel_for(b, 1, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i)
        im2col_strided(x.data() + (i0 + i) * in_size, g, cols_.data() + i * plane, cols_ld);
    });
    float* prod = dcols_.data();
    detail::sgemm(false, false, out_, cols_ld, kdim, 1.0f, weight_.data(), kdim, cols_.data(),
                  cols_ld, 0.0f, prod, cols_ld);
    float* yd = y->data();
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    detail::parallel_for(b * out_, 8, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const int64_t i = r / out_, o = r % out_;
        const float* src = prod + o * cols_ld + i * plane;
        float* dst = yd + ((i0 + i) * out_ + o) * plane;
        const float bo = bias != nullptr ? bias[o] : 0.0f;
        for (int64_t j = 0; j < plane; ++j) dst[j] = src[j] + bo;
      }
    });
  }
  x_ = &x;
  out_shape_ = y->shape();
  return Status();
}

Status Conv2d::backward(const Tensor& dy, Tensor* dx) {
  if (x_ == nullptr) return Status::invalid_argument(repr() + ": backward: no forward before it");
  if (dy.shape() != out_shape_)
    return detail::shape_error(repr(), "dy", "the forward's output shape " +
                                                 shape_string(out_shape_), dy);
  if (dx == &dy) return Status::invalid_argument(repr() + ": dx: must not be dy");
  const Tensor& x = *x_;
  const int64_t n = x.dim(0);
  const Geometry g{in_, x.dim(2), x.dim(3), k_, stride_, pad_, out_shape_[2], out_shape_[3]};
  const int64_t plane = g.ho * g.wo;
  const int64_t kdim = in_ * k_ * k_;
  const int64_t in_size = in_ * g.h * g.w;
  const int64_t chunk = images_per_chunk(kdim, plane, n);
  cols_.resize(static_cast<size_t>(kdim * plane * chunk));
  dy_cat_.resize(static_cast<size_t>(out_ * plane * chunk));
  if (dx != nullptr) {
    dx->resize(x.shape());
    dcols_.resize(static_cast<size_t>(kdim * plane * chunk));
  }
  for (int64_t i0 = 0; i0 < n; i0 += chunk) {
    const int64_t b = std::min(chunk, n - i0);
    const int64_t ld = b * plane;
    // dy_cat[out, b * plane + j] gathers the chunk's dy planes side by side.
    detail::parallel_for(b, 1, [&](int64_t ib, int64_t ie) {
      for (int64_t i = ib; i < ie; ++i) {
        const float* dyi = dy.data() + (i0 + i) * out_ * plane;
        for (int64_t o = 0; o < out_; ++o)
          std::copy(dyi + o * plane, dyi + (o + 1) * plane, dy_cat_.data() + o * ld + i * plane);
        im2col_strided(x.data() + (i0 + i) * in_size, g, cols_.data() + i * plane, ld);
      }
    });
    // dW[out, K] += dy_cat[out, ld] cols^T[ld, K]
    detail::sgemm(false, true, out_, kdim, ld, 1.0f, dy_cat_.data(), ld, cols_.data(), ld, 1.0f,
                  weight_grad_.data(), kdim);
    if (!bias_grad_.empty()) {
      detail::parallel_for(out_, 4, [&](int64_t ob, int64_t oe) {
        for (int64_t o = ob; o < oe; ++o) {
          float s = 0.0f;
          const float* r = dy_cat_.data() + o * ld;
          for (int64_t j = 0; j < ld; ++j) s += r[j];
          bias_grad_[o] += s;
        }
      });
    }
    if (dx != nullptr) {
      // dcols[K, ld] = W^T[K, out] dy_cat[out, ld]; then scattered back onto each dx_i.
      detail::sgemm(true, false, kdim, ld, out_, 1.0f, weight_.data(), kdim, dy_cat_.data(), ld,
                    0.0f, dcols_.data(), ld);
      detail::parallel_for(b, 1, [&](int64_t ib, int64_t ie) {
        for (int64_t i = ib; i < ie; ++i) {
          float* dxi = dx->data() + (i0 + i) * in_size;
          std::fill_n(dxi, in_size, 0.0f);
          col2im_add_strided(dcols_.data() + i * plane, ld, g, dxi);
        }
      });
    }
  }
  return Status();
}

void Conv2d::zero_grad() {
  std::fill(weight_grad_.begin(), weight_grad_.end(), 0.0f);
  std::fill(bias_grad_.begin(), bias_grad_.end(), 0.0f);
}

std::string Conv2d::repr() const {
  const std::string k = std::to_string(k_), s = std::to_string(stride_), p = std::to_string(pad_);
  std::string r = "Conv2d(" + std::to_string(in_) + ", " + std::to_string(out_) +
                  ", kernel_size=(" + k + ", " + k + "), stride=(" + s + ", " + s + ")";
  if (pad_ != 0) r += ", padding=(" + p + ", " + p + ")";
  if (bias_.empty()) r += ", bias=False";
  return r + ")";
}

std::string Conv2d::architecture() const {
  return "{\"type\":\"Conv2d\",\"in\":" + std::to_string(in_) + ",\"out\":" +
         std::to_string(out_) + ",\"kernel\":" + std::to_string(k_) + ",\"stride\":" +
         std::to_string(stride_) + ",\"padding\":" + std::to_string(pad_) +
         ",\"bias\":" + (bias_.empty() ? "false" : "true") + "}";
}

void Conv2d::append_state(const std::string& prefix, std::vector<StateEntry>* out) {
  StateEntry w;
  w.name = prefix + "weight";
  w.shape = {out_, in_, k_, k_};
  w.data = weight_.data();
  w.is_parameter = true;
  w.grad = weight_grad_.data();
  out->push_back(std::move(w));
  if (!bias_.empty()) {
    StateEntry b;
    b.name = prefix + "bias";
    b.shape = {out_};
    b.data = bias_.data();
    b.is_parameter = true;
    b.grad = bias_grad_.data();
    out->push_back(std::move(b));
  }
}

}  // namespace bnorm::nn
