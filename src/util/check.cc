#include "util/check.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>

namespace bnorm::detail {

std::string FormatNumber(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), value);
  return std::string(buf, result.ptr);
}

Status CheckTensor(const char* name, ConstTensorView t, Geometry* geometry) {
  const std::string n = name;
  if (t.data() == nullptr) return Status::InvalidArgument(n + ": data is null");
  if (t.layout() != Layout::kChannelsFirst && t.layout() != Layout::kChannelsLast)
    return Status::InvalidArgument(
        n + ": layout must be channels_first (0) or channels_last (1), got " +
        std::to_string(static_cast<int>(t.layout())));
  if (t.rank() < 2 || t.rank() > kMaxRank)
    return Status::InvalidArgument(
        n + ": rank must be 2 to 5 ((N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W)), got " +
        std::to_string(t.rank()) + " dims, size " + t.SizeString());
  if (t.dim(0) == 0)
    return Status::InvalidArgument(n + ": empty batch (N = 0), size " + t.SizeString());
  for (int i = 0; i < t.rank(); ++i)
    if (t.dim(i) <= 0)
      return Status::InvalidArgument(n + ": dim " + std::to_string(i) + " must be > 0, got " +
                                     std::to_string(t.dim(i)) + " in size " + t.SizeString());
  int64_t numel = 1;
  for (int i = 0; i < t.rank(); ++i) {
    if (numel > std::numeric_limits<int64_t>::max() / t.dim(i))
      return Status::InvalidArgument(n + ": number of elements overflows int64, size " +
                                     t.SizeString());
    numel *= t.dim(i);
  }
  geometry->layout = t.layout();
  geometry->n = t.batch();
  geometry->c = t.channels();
  geometry->s = t.spatial();
  return Status::Ok();
}

Status CheckSameShape(const char* name, ConstTensorView t, const char* like_name,
                      ConstTensorView like) {
  const std::string n = name;
  if (t.data() == nullptr) return Status::InvalidArgument(n + ": data is null");
  bool same = t.rank() == like.rank();
  for (int i = 0; same && i < t.rank(); ++i) same = t.dim(i) == like.dim(i);
  if (!same)
    return Status::InvalidArgument(n + ": size " + t.SizeString() + " must equal " + like_name +
                                   "'s size " + like.SizeString());
  if (t.layout() != like.layout())
    return Status::InvalidArgument(n + ": layout " + LayoutName(t.layout()) + " must equal " +
                                   like_name + "'s layout " + LayoutName(like.layout()));
  return Status::Ok();
}

Status CheckNoPartialOverlap(const char* out_name, const float* out, const char* in_name,
                             const float* in, int64_t numel) {
  if (out == in) return Status::Ok();
  const auto a = reinterpret_cast<uintptr_t>(out), b = reinterpret_cast<uintptr_t>(in);
  const auto bytes = static_cast<uintptr_t>(numel) * sizeof(float);
  if (a < b + bytes && b < a + bytes)
    return Status::InvalidArgument(std::string(out_name) + ": partially overlaps " + in_name +
                                   " (in-place needs " + out_name + " == " + in_name + " exactly)");
  return Status::Ok();
}

Status CheckChannelVector(const char* name, size_t size, int64_t c, bool required,
                          ConstTensorView x) {
  if (size == 0 && !required) return Status::Ok();
  if (size == 0)
    return Status::InvalidArgument(std::string(name) + ": required, one value per channel (C = " +
                                   std::to_string(c) + "), got none");
  if (static_cast<int64_t>(size) != c)
    return Status::InvalidArgument(std::string(name) +
                                   ": must hold one value per channel, C = " + std::to_string(c) +
                                   " (x size " + x.SizeString() + "), got " + std::to_string(size));
  return Status::Ok();
}

Status CheckEps(double eps) {
  if (!std::isfinite(eps) || eps <= 0)
    return Status::InvalidArgument("eps: must be finite and > 0, got " + FormatNumber(eps));
  return Status::Ok();
}

Status CheckMomentum(std::optional<double> momentum) {
  if (momentum && !(*momentum >= 0.0 && *momentum <= 1.0))
    return Status::InvalidArgument(
        "momentum: must be in [0, 1] or none (cumulative average), got " + FormatNumber(*momentum));
  return Status::Ok();
}

Status CheckMoreThanOneValuePerChannel(ConstTensorView x, const Geometry& g) {
  if (g.count() > 1) return Status::Ok();
  return Status::InvalidArgument(
      "Expected more than 1 value per channel when training, got input size " + x.SizeString());
}

Status CheckFinite(const char* name, ConstTensorView t, const Geometry& g) {
  const float* data = t.data();
  const int64_t numel = g.numel();
  for (int64_t k = 0; k < numel; ++k) {
    if (std::isfinite(data[k])) continue;
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
    return Status::NonFinite(std::string(name) + ": " + FormatNumber(data[k]) + " at index [" +
                             std::to_string(i) + ", " + std::to_string(c) + spatial +
                             "] (channel " + std::to_string(c) + ")");
  }
  return Status::Ok();
}

}  // namespace bnorm::detail
