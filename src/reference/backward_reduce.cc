#include "reference/reference.h"

namespace bnorm::ref {

template <class T>
void backward_reduce(const Geometry& g, const T* dy, const T* x, const double* mean,
                     const double* invstd, double* sum_dy, double* sum_dy_xhat) {
  for (int64_t c = 0; c < g.c; ++c) {
    double s_dy = 0, s_dy_xhat = 0;
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t j = 0; j < g.s; ++j) {
        const int64_t k = g.index(i, c, j);
        const double xhat = (static_cast<double>(x[k]) - mean[c]) * invstd[c];
        s_dy += static_cast<double>(dy[k]);              // dbias
        s_dy_xhat += static_cast<double>(dy[k]) * xhat;  // dweight
      }
    sum_dy[c] = s_dy;
    sum_dy_xhat[c] = s_dy_xhat;
  }
}

template void backward_reduce<float>(const Geometry&, const float*, const float*, const double*,
                                     const double*, double*, double*);
template void backward_reduce<double>(const Geometry&, const double*, const double*, const double*,
                                      const double*, double*, double*);

}  // namespace bnorm::ref
