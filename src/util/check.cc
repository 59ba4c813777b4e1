#include "util/check.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>

namespace bnorm::detail {

std::string format_number(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), value);
  return std::string(buf, result.ptr);
}

Status check_tensor(const char* name, ConstTensorView t, Geometry* geometry) {
  const std::string n = name;
  if (t.raw() == nullptr) return Status::invalid_argument(n + ": data is null");
  if (dtype_size(t.dtype()) == 0)
    return Status::invalid_argument(n + ": dtype must be float32 (0), bfloat16 (1) or float16 (2), got " +
                                    dtype_name(t.dtype()));
  if (t.layout() != Layout::kChannelsFirst && t.layout() != Layout::kChannelsLast)
    return Status::invalid_argument(
        n + ": layout must be channels_first (0) or channels_last (1), got " +
        std::to_string(static_cast<int>(t.layout())));
  if (t.rank() < 2 || t.rank() > kMaxRank)
    return Status::invalid_argument(
        n + ": rank must be 2 to 5 ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got " +
        std::to_string(t.rank()) + " dims, size " + t.size_string());
  if (t.dim(0) == 0)
    return Status::invalid_argument(n + ": empty batch (N = 0), size " + t.size_string());
  for (int i = 0; i < t.rank(); ++i)
    if (t.dim(i) <= 0)
      return Status::invalid_argument(n + ": dim " + std::to_string(i) + " must be > 0, got " +
                                      std::to_string(t.dim(i)) + " in size " + t.size_string());
  // At most 2^56 elements: no address space holds more (x86-64's largest is 2^57 bytes), and the
  // kernels' sizes in bytes of a few per-channel fp64 arrays, e.g. 32 * C, stay far from int64's
  // range (a C of 2^62 with N = 1 used to pass and overflow there).
  constexpr int64_t kMaxElements = int64_t{1} << 56;
  int64_t numel = 1;
  for (int i = 0; i < t.rank(); ++i) {
    if (numel > kMaxElements / t.dim(i))
      return Status::invalid_argument(
          n + ": number of elements exceeds 2^56 (no address space holds such a tensor), size " +
          t.size_string());
    numel *= t.dim(i);
  }
  geometry->layout = t.layout();
  geometry->n = t.batch();
  geometry->c = t.channels();
  geometry->s = t.spatial();
  return Status();
}

Status check_same_shape(const char* name, ConstTensorView t, const char* like_name,
                        ConstTensorView like) {
  const std::string n = name;
  if (t.raw() == nullptr) return Status::invalid_argument(n + ": data is null");
  if (t.dtype() != like.dtype())
    return Status::invalid_argument(n + ": dtype " + dtype_name(t.dtype()) + " must equal " +
                                    like_name + "'s dtype " + dtype_name(like.dtype()) +
                                    " (every tensor of a call has one dtype)");
  bool same = t.rank() == like.rank();
  for (int i = 0; same && i < t.rank(); ++i) same = t.dim(i) == like.dim(i);
  if (!same)
    return Status::invalid_argument(n + ": size " + t.size_string() + " must equal " + like_name +
                                    "'s size " + like.size_string());
  if (t.layout() != like.layout())
    return Status::invalid_argument(n + ": layout " + layout_name(t.layout()) + " must equal " +
                                    like_name + "'s layout " + layout_name(like.layout()));
  return Status();
}

Status check_no_partial_overlap(const char* out_name, const void* out, const char* in_name,
                                const void* in, int64_t numel, int64_t element_size) {
  if (out == in) return Status();
  const auto a = reinterpret_cast<uintptr_t>(out), b = reinterpret_cast<uintptr_t>(in);
  const auto bytes = static_cast<uintptr_t>(numel) * static_cast<uintptr_t>(element_size);
  if (a < b + bytes && b < a + bytes)
    return Status::invalid_argument(std::string(out_name) + ": partially overlaps " + in_name +
                                    " (in-place needs " + out_name + " == " + in_name +
                                    " exactly)");
  return Status();
}

Status check_channel_vector(const char* name, size_t size, int64_t c, bool required,
                            ConstTensorView x) {
  if (size == 0 && !required) return Status();
  if (size == 0)
    return Status::invalid_argument(std::string(name) + ": required, one value per channel (C = " +
                                    std::to_string(c) + "), got none");
  if (static_cast<int64_t>(size) != c)
    return Status::invalid_argument(
        std::string(name) + ": must hold one value per channel, C = " + std::to_string(c) +
        " (x size " + x.size_string() + "), got " + std::to_string(size));
  return Status();
}

Status check_eps(double eps) {
  if (!std::isfinite(eps) || eps <= 0)
    return Status::invalid_argument("eps: must be finite and > 0, got " + format_number(eps));
  return Status();
}

Status check_momentum(std::optional<double> momentum) {
  if (momentum && !(*momentum >= 0.0 && *momentum <= 1.0))
    return Status::invalid_argument(
        "momentum: must be in [0, 1] or none (cumulative average), got " +
        format_number(*momentum));
  return Status();
}

Status check_more_than_one_value_per_channel(ConstTensorView x, const Geometry& g) {
  if (g.count() > 1) return Status();
  return Status::invalid_argument(
      "Expected more than 1 value per channel when training, got input size " + x.size_string());
}

namespace {

float element(ConstTensorView t, int64_t k) {
  switch (t.dtype()) {
    case DType::kBFloat16:
      return to_float(t.data_as<bfloat16>()[k]);
    case DType::kFloat16:
      return to_float(t.data_as<float16>()[k]);
    default:
      return t.data()[k];
  }
}

}  // namespace

Status check_finite(const char* name, ConstTensorView t, const Geometry& g) {
  const int64_t numel = g.numel();
  for (int64_t k = 0; k < numel; ++k) {
    if (std::isfinite(element(t, k))) continue;
    // Memory index -> logical (i, c, j) -> (i, c, spatial...).
    int64_t i, c, j;
    if (g.layout == Layout::kChannelsFirst) {
      j = k % g.s;
      c = (k / g.s) % g.c;
      i = k / (g.s * g.c);
    } else {
      c = k % g.c;
      j = (k / g.c) % g.s;
      i = k / (g.s * g.c);
    }
    std::string spatial;
    for (int d = t.rank() - 1; d >= 2; --d) {
      spatial = ", " + std::to_string(j % t.dim(d)) + spatial;
      j /= t.dim(d);
    }
    return Status::non_finite(std::string(name) + ": " + format_number(element(t, k)) + " at index [" +
                              std::to_string(i) + ", " + std::to_string(c) + spatial +
                              "] (channel " + std::to_string(c) + ")");
  }
  return Status();
}

Status check_train_args(const ForwardTrainArgs& a, const Geometry& g, double* factor,
                        int64_t* batches) {
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  if (tracking) {
    BNORM_RETURN_IF_ERROR(check_channel_vector("running_mean", a.running_mean.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(check_channel_vector("running_var", a.running_var.size(), g.c, true, a.x));
  }
  if (a.ghost_batch == 0) {  // ghost batch norm's K * C statistics: check_train_extensions
    BNORM_RETURN_IF_ERROR(check_channel_vector("save_mean", a.save_mean.size(), g.c, false, a.x));
    BNORM_RETURN_IF_ERROR(
        check_channel_vector("save_invstd", a.save_invstd.size(), g.c, false, a.x));
  }
  BNORM_RETURN_IF_ERROR(check_eps(a.eps));
  BNORM_RETURN_IF_ERROR(check_momentum(a.momentum));
  *factor = 0;
  *batches = 0;
  if (!tracking) return Status();
  if (a.num_batches_tracked != nullptr) *batches = *a.num_batches_tracked;
  if (!a.momentum) {
    if (a.num_batches_tracked == nullptr)
      return Status::invalid_argument(
          "num_batches_tracked: required when momentum is none (cumulative average) and "
          "running statistics are tracked, got null");
    if (*batches < 0)
      return Status::invalid_argument("num_batches_tracked: must be >= 0, got " +
                                      std::to_string(*batches));
  }
  if (a.num_batches_tracked != nullptr && *batches == std::numeric_limits<int64_t>::max())
    return Status::invalid_argument("num_batches_tracked: cannot be incremented, got " +
                                    std::to_string(*batches) + " (the int64 maximum)");
  *factor = a.momentum ? *a.momentum : 1.0 / static_cast<double>(*batches + 1);
  return Status();
}

Status check_backward_args(const BackwardArgs& a, const Geometry& g) {
  BNORM_RETURN_IF_ERROR(check_channel_vector("weight", a.weight.size(), g.c, false, a.x));
  if (a.training && a.ghost_batch != 0) {
    // K * C chunk statistics: check_backward_extensions.
  } else if (a.training) {
    BNORM_RETURN_IF_ERROR(check_channel_vector("save_mean", a.save_mean.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(check_channel_vector("save_invstd", a.save_invstd.size(), g.c, true, a.x));
  } else {
    BNORM_RETURN_IF_ERROR(check_channel_vector("running_mean", a.running_mean.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(check_channel_vector("running_var", a.running_var.size(), g.c, true, a.x));
  }
  BNORM_RETURN_IF_ERROR(check_channel_vector("dweight", a.dweight.size(), g.c, false, a.x));
  BNORM_RETURN_IF_ERROR(check_channel_vector("dbias", a.dbias.size(), g.c, false, a.x));
  return check_eps(a.eps);
}

namespace {

// Per-chunk statistics of ghost batch norm: K * C values (required or optional).
Status check_chunk_vector(const char* name, size_t size, int64_t c, int64_t chunks, bool required,
                          ConstTensorView x, int64_t ghost_batch) {
  if (size == 0 && !required) return Status();
  if (static_cast<int64_t>(size) != c * chunks)
    return Status::invalid_argument(
        std::string(name) + ": must hold one value per chunk and channel with ghost_batch = " +
        std::to_string(ghost_batch) + ", K * C = " + std::to_string(chunks) + " * " +
        std::to_string(c) + " = " + std::to_string(chunks * c) + " (x size " + x.size_string() +
        "), got " + std::to_string(size));
  return Status();
}

// G against the batch: 2 <= G <= N, the last chunk more than one value per channel.
Status check_ghost_against_batch(int64_t ghost_batch, const Geometry& g, ConstTensorView x,
                                 int64_t* chunks) {
  BNORM_RETURN_IF_ERROR(check_ghost_batch(ghost_batch));
  if (ghost_batch > g.n)
    return Status::invalid_argument("ghost_batch: must be <= N = " + std::to_string(g.n) +
                                    " in training (x size " + x.size_string() + "), got " +
                                    std::to_string(ghost_batch));
  const int64_t rest = g.n % ghost_batch;
  if (rest != 0 && rest * g.s < 2)
    return Status::invalid_argument(
        "ghost_batch: " + std::to_string(ghost_batch) + " leaves a last chunk of N mod G = " +
        std::to_string(rest) + " sample with 1 value per channel (x size " + x.size_string() +
        "); expected more than 1 value per channel when training");
  *chunks = (g.n + ghost_batch - 1) / ghost_batch;
  return Status();
}

}  // namespace

Status check_renorm_limits(double rmax, double dmax) {
  if (!(rmax >= 1.0))
    return Status::invalid_argument("rmax: must be >= 1 (1: no rescaling), got " +
                                    format_number(rmax));
  if (!(dmax >= 0.0))
    return Status::invalid_argument("dmax: must be >= 0 (0: no shift), got " +
                                    format_number(dmax));
  return Status();
}

Status check_ghost_batch(int64_t ghost_batch) {
  if (ghost_batch != 0 && ghost_batch < 2)
    return Status::invalid_argument("ghost_batch: must be 0 (off) or >= 2, got " +
                                    std::to_string(ghost_batch));
  return Status();
}

bool has_extensions(const ForwardTrainArgs& a) {
  return !a.running_mean_out.empty() || !a.running_var_out.empty() ||
         a.num_batches_tracked_out != nullptr || a.batch_renorm || !a.save_r.empty() ||
         !a.save_d.empty() || a.ghost_batch != 0;
}

bool has_extensions(const BackwardArgs& a) {
  return !a.renorm_r.empty() || !a.renorm_d.empty() || a.ghost_batch != 0;
}

Status check_train_extensions(const ForwardTrainArgs& a, const Geometry& g, int64_t batches,
                              int64_t* chunks) {
  *chunks = 1;
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  if (a.running_mean_out.empty() != a.running_var_out.empty())
    return Status::invalid_argument(
        std::string("running_mean_out and running_var_out: give both (stateless update) or "
                    "neither, got only ") +
        (a.running_mean_out.empty() ? "running_var_out" : "running_mean_out"));
  const bool stateless = !a.running_mean_out.empty();
  if (stateless) {
    if (!tracking)
      return Status::invalid_argument(
          "running_mean_out: a stateless update needs the running statistics it starts from "
          "(running_mean, running_var), got none");
    BNORM_RETURN_IF_ERROR(
        check_channel_vector("running_mean_out", a.running_mean_out.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(
        check_channel_vector("running_var_out", a.running_var_out.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(check_no_partial_overlap("running_var_out", a.running_var_out.data(),
                                                   "running_mean_out", a.running_mean_out.data(),
                                                   g.c));
    if (a.running_var_out.data() == a.running_mean_out.data())
      return Status::invalid_argument("running_var_out: is the same buffer as running_mean_out");
  } else if (a.num_batches_tracked_out != nullptr) {
    return Status::invalid_argument(
        "num_batches_tracked_out: only with running_mean_out and running_var_out (stateless "
        "update), which are absent");
  }
  if (a.batch_renorm) {
    if (!tracking)
      return Status::invalid_argument(
          "batch_renorm: requires running_mean and running_var (mu and sigma^2), got none");
    BNORM_RETURN_IF_ERROR(check_renorm_limits(a.rmax, a.dmax));
    if (a.ghost_batch != 0)
      return Status::invalid_argument("ghost_batch: " + std::to_string(a.ghost_batch) +
                                      " cannot be combined with batch_renorm");
  } else if (!a.save_r.empty() || !a.save_d.empty()) {
    return Status::invalid_argument(std::string(a.save_r.empty() ? "save_d" : "save_r") +
                                    ": only with batch_renorm, which is off");
  }
  BNORM_RETURN_IF_ERROR(check_channel_vector("save_r", a.save_r.size(), g.c, false, a.x));
  BNORM_RETURN_IF_ERROR(check_channel_vector("save_d", a.save_d.size(), g.c, false, a.x));
  if (a.ghost_batch != 0) {
    BNORM_RETURN_IF_ERROR(check_ghost_against_batch(a.ghost_batch, g, a.x, chunks));
    BNORM_RETURN_IF_ERROR(check_chunk_vector("save_mean", a.save_mean.size(), g.c, *chunks, false,
                                             a.x, a.ghost_batch));
    BNORM_RETURN_IF_ERROR(check_chunk_vector("save_invstd", a.save_invstd.size(), g.c, *chunks,
                                             false, a.x, a.ghost_batch));
  }
  const bool counted = tracking && (stateless ? a.num_batches_tracked_out != nullptr
                                              : a.num_batches_tracked != nullptr);
  if (counted && batches > std::numeric_limits<int64_t>::max() - *chunks)
    return Status::invalid_argument("num_batches_tracked: cannot be incremented by " +
                                    std::to_string(*chunks) + ", got " + std::to_string(batches));
  return Status();
}

Status check_backward_extensions(const BackwardArgs& a, const Geometry& g) {
  if (a.renorm_r.empty() != a.renorm_d.empty())
    return Status::invalid_argument(
        std::string("renorm_r and renorm_d: give both (batch renorm) or neither, got only ") +
        (a.renorm_r.empty() ? "renorm_d" : "renorm_r"));
  if (!a.renorm_r.empty()) {
    if (!a.training)
      return Status::invalid_argument(
          "renorm_r: batch renorm's backward is a training-mode backward, got training = false");
    BNORM_RETURN_IF_ERROR(check_channel_vector("renorm_r", a.renorm_r.size(), g.c, true, a.x));
    BNORM_RETURN_IF_ERROR(check_channel_vector("renorm_d", a.renorm_d.size(), g.c, true, a.x));
    if (a.ghost_batch != 0)
      return Status::invalid_argument("ghost_batch: " + std::to_string(a.ghost_batch) +
                                      " cannot be combined with batch renorm (renorm_r)");
  }
  if (a.ghost_batch != 0) {
    if (!a.training)
      return Status::invalid_argument("ghost_batch: " + std::to_string(a.ghost_batch) +
                                      " is for a training-mode backward, got training = false");
    int64_t chunks = 1;
    BNORM_RETURN_IF_ERROR(check_ghost_against_batch(a.ghost_batch, g, a.x, &chunks));
    BNORM_RETURN_IF_ERROR(check_chunk_vector("save_mean", a.save_mean.size(), g.c, chunks, true,
                                             a.x, a.ghost_batch));
    BNORM_RETURN_IF_ERROR(check_chunk_vector("save_invstd", a.save_invstd.size(), g.c, chunks,
                                             true, a.x, a.ghost_batch));
  }
  return Status();
}

Status check_no_extensions_for_sync(const ForwardTrainArgs& a) {
  const char* what = nullptr;
  if (!a.running_mean_out.empty() || !a.running_var_out.empty() ||
      a.num_batches_tracked_out != nullptr)
    what = "running_mean_out (stateless update)";
  else if (a.batch_renorm || !a.save_r.empty() || !a.save_d.empty())
    what = "batch_renorm";
  else if (a.ghost_batch != 0)
    what = "ghost_batch";
  if (what == nullptr) return Status();
  return Status::invalid_argument(std::string(what) +
                                  ": not supported by synchronized batch norm");
}

Status check_no_extensions_for_sync(const BackwardArgs& a) {
  const char* what = nullptr;
  if (!a.renorm_r.empty() || !a.renorm_d.empty())
    what = "renorm_r (batch renorm)";
  else if (a.ghost_batch != 0)
    what = "ghost_batch";
  if (what == nullptr) return Status();
  return Status::invalid_argument(std::string(what) +
                                  ": not supported by synchronized batch norm");
}

}  // namespace bnorm::detail
