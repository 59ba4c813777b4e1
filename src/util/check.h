// Argument checks shared by the functional passes, the layer and the C API. Each returns a
// Status whose message names the argument and its value; none writes anything.
#ifndef BNORM_SRC_UTIL_CHECK_H_
#define BNORM_SRC_UTIL_CHECK_H_

#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "bnorm/status.h"
#include "bnorm/tensor.h"
#include "kernels.h"

namespace bnorm::detail {

// Shortest decimal that round-trips ("1e-05", "nan", "-inf").
std::string format_number(double value);

// A tensor argument: data set, layout known, rank 2..5, every dim > 0, N*C*S fits in int64.
Status check_tensor(const char* name, ConstTensorView t, Geometry* geometry);

// Another tensor of the same call: data set, same dims and layout as `like`.
Status check_same_shape(const char* name, ConstTensorView t, const char* like_name,
                        ConstTensorView like);

// An output that may alias an input exactly but must not partially overlap it.
Status check_no_partial_overlap(const char* out_name, const float* out, const char* in_name,
                                const float* in, int64_t numel);

// A per-channel vector: absent (empty) unless required, else exactly c values.
Status check_channel_vector(const char* name, size_t size, int64_t c, bool required,
                            ConstTensorView x);

// eps: finite and > 0.
Status check_eps(double eps);

// momentum: nullopt (cumulative average) or a number in [0, 1].
Status check_momentum(std::optional<double> momentum);

// Training needs more than one value per channel (PyTorch's wording).
Status check_more_than_one_value_per_channel(ConstTensorView x, const Geometry& g);

// NaN/Inf in t, naming the first bad element (memory order) by its logical index and channel.
Status check_finite(const char* name, ConstTensorView t, const Geometry& g);

// What a training forward checks beyond x, y, weight and bias (g: x's geometry): the running and
// saved statistics' sizes, eps, momentum and num_batches_tracked. Sets *factor, the running-stat
// factor (momentum, or 1 / the incremented counter), and *batches, the counter's value.
Status check_train_args(const ForwardTrainArgs& a, const Geometry& g, double* factor,
                        int64_t* batches);

// What a backward checks beyond its three tensors: the per-channel vectors and eps.
Status check_backward_args(const BackwardArgs& a, const Geometry& g);

}  // namespace bnorm::detail

#endif  // BNORM_SRC_UTIL_CHECK_H_
