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

// An output that may alias an input exactly but must not partially overlap it (numel elements
// of element_size bytes each).
Status check_no_partial_overlap(const char* out_name, const void* out, const char* in_name,
                                const void* in, int64_t numel, int64_t element_size = 4);

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

// The extensions of a training forward (stateless outputs, batch renorm, ghost batch norm),
// after check_train_args: batches is the counter's value. Sets *chunks to the number of
// statistics chunks (1 without ghost batch norm).
Status check_train_extensions(const ForwardTrainArgs& a, const Geometry& g, int64_t batches,
                              int64_t* chunks);
// The extensions of a backward (batch renorm's r and d, ghost batch norm).
Status check_backward_extensions(const BackwardArgs& a, const Geometry& g);
// Whether a call uses any extension (else it is PyTorch's pass as it always was).
bool has_extensions(const ForwardTrainArgs& a);
bool has_extensions(const BackwardArgs& a);
// Synchronized batch norm runs none of the extensions: an error naming the first one used.
Status check_no_extensions_for_sync(const ForwardTrainArgs& a);
Status check_no_extensions_for_sync(const BackwardArgs& a);
// rmax >= 1 (inf allowed), dmax >= 0 (inf allowed), not NaN.
Status check_renorm_limits(double rmax, double dmax);
// ghost_batch: 0 (off) or >= 2.
Status check_ghost_batch(int64_t ghost_batch);

}  // namespace bnorm::detail

#endif  // BNORM_SRC_UTIL_CHECK_H_
