#include "reference/reference.h"

namespace bnorm::ref {

template <class T>
void backward_apply(const Geometry& g, const T* dy, const T* x, const double* mean,
                    const double* invstd, const double* weight, const double* sum_dy,
                    const double* sum_dy_xhat, bool training, T* dx, int64_t count) {
  const double n = static_cast<double>(count > 0 ? count : g.count());
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t c = 0; c < g.c; ++c) {
      const double w = weight ? weight[c] : 1.0;
      for (int64_t j = 0; j < g.s; ++j) {
        const int64_t k = g.index(i, c, j);
        const double d = static_cast<double>(dy[k]);
        if (!training) {  // statistics constant: y is affine in x
          dx[k] = static_cast<T>(d * w * invstd[c]);
          continue;
        }
        // Through the batch statistics: the mean and the variance depend on every x of the
        // channel, which removes the components of dy along 1 and along xhat.
        const double xhat = (static_cast<double>(x[k]) - mean[c]) * invstd[c];
        dx[k] = static_cast<T>(w * invstd[c] / n * (n * d - sum_dy[c] - xhat * sum_dy_xhat[c]));
      }
    }
}

template void backward_apply<float>(const Geometry&, const float*, const float*, const double*,
                                    const double*, const double*, const double*, const double*,
                                    bool, float*, int64_t);
template void backward_apply<double>(const Geometry&, const double*, const double*, const double*,
                                     const double*, const double*, const double*, const double*,
                                     bool, double*, int64_t);

}  // namespace bnorm::ref
