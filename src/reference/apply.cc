#include "reference/reference.h"

namespace bnorm::ref {

template <class T>
void apply(const Geometry& g, const T* x, const double* mean, const double* invstd,
           const double* weight, const double* bias, T* y) {
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t c = 0; c < g.c; ++c) {
      const double w = weight ? weight[c] : 1.0;
      const double b = bias ? bias[c] : 0.0;
      for (int64_t j = 0; j < g.s; ++j) {
        const int64_t k = g.index(i, c, j);
        const double xhat = (static_cast<double>(x[k]) - mean[c]) * invstd[c];
        y[k] = static_cast<T>(w * xhat + b);  // read x[k] before writing y[k]: in-place is fine
      }
    }
}

template void apply<float>(const Geometry&, const float*, const double*, const double*,
                           const double*, const double*, float*);
template void apply<double>(const Geometry&, const double*, const double*, const double*,
                            const double*, const double*, double*);

}  // namespace bnorm::ref

namespace bnorm::ref {

template <class T>
void apply_relu(const Geometry& g, const T* x, const double* mean, const double* invstd,
                const double* weight, const double* bias, const T* z, T* y) {
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t c = 0; c < g.c; ++c) {
      const double w = weight ? weight[c] : 1.0;
      const double b = bias ? bias[c] : 0.0;
      for (int64_t j = 0; j < g.s; ++j) {
        const int64_t k = g.index(i, c, j);
        const double xhat = (static_cast<double>(x[k]) - mean[c]) * invstd[c];
        double v = w * xhat + b;
        if (z != nullptr) v += static_cast<double>(z[k]);  // read before y[k] is written
        y[k] = static_cast<T>(v <= 0 ? 0.0 : v);            // NaN kept, as torch.relu
      }
    }
}

template <class T>
void relu_mask(const Geometry& g, const T* dy, const T* y, T* out) {
  for (int64_t k = 0; k < g.numel(); ++k) out[k] = y[k] > 0 ? dy[k] : T(0);
}

template void apply_relu<float>(const Geometry&, const float*, const double*, const double*,
                                const double*, const double*, const float*, float*);
template void apply_relu<double>(const Geometry&, const double*, const double*, const double*,
                                 const double*, const double*, const double*, double*);
template void relu_mask<float>(const Geometry&, const float*, const float*, float*);
template void relu_mask<double>(const Geometry&, const double*, const double*, double*);

}  // namespace bnorm::ref
