// Non-owning views of the tensors batch normalization takes: fp32, bf16 or fp16 elements.
//
// Dimensions are always given in PyTorch's logical order: (N, C), (N, C, L), (N, C, H, W) or
// (N, C, D, H, W). The layout says how they lie in memory:
//   Layout::kChannelsFirst: contiguous in logical order, (N, C, S):  index (i*C + c)*S + j
//   Layout::kChannelsLast:  channels innermost,          (N, S, C):  index (i*S + j)*C + c
// where S is the product of the spatial dims (1 for (N, C), for which both layouts coincide).
// These are PyTorch's contiguous and channels_last / channels_last_3d memory formats.
//
// A view never owns or copies the data; the caller keeps it alive for the duration of a call.
// Constructing a view cannot fail: the dimensions are checked by the call that uses the view
// (rank 2..5, every dim > 0, no int64 overflow), which returns a Status naming the problem.
#ifndef BNORM_TENSOR_H_
#define BNORM_TENSOR_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>
#include <string>
#include <type_traits>

namespace bnorm {

enum class Layout : int { kChannelsFirst = 0, kChannelsLast = 1 };

// "channels_first" or "channels_last" (or "invalid(<n>)").
std::string layout_name(Layout layout);

inline constexpr int kMaxRank = 5;

// The element type of a tensor view (x, y, dy, dx, z, dz). Per-channel vectors (weight, bias,
// running statistics, save_*, dweight, dbias) are always fp32, and the statistics are
// accumulated as for fp32 data (fp32 lanes into fp64), so the statistics of a bf16 tensor are
// those of the same values in fp32. Every tensor of one call has the same element type.
// fp64 tensors are not supported: there is no view of double data, and the C API rejects any
// other dtype value with an error naming it.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// "float32", "bfloat16", "float16" (PyTorch's names), or "invalid(<n>)".
std::string dtype_name(DType dtype);

// Bytes per element: 4, 2, 2 (0 for an invalid dtype).
inline constexpr int64_t dtype_size(DType dtype) {
  return dtype == DType::kFloat32 ? 4 : (dtype == DType::kBFloat16 || dtype == DType::kFloat16) ? 2 : 0;
}

// bfloat16 (1 sign, 8 exponent, 7 mantissa bits) and IEEE binary16 (1, 5, 10), as bit patterns.
struct bfloat16 {
  uint16_t bits;
};
struct float16 {
  uint16_t bits;
};

// Exact widening.
inline float to_float(bfloat16 v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1Fu;
  uint32_t mant = v.bits & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (mant << 13);  // Inf, NaN (payload kept)
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: mant * 2^-24
    int e = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --e;
    }
    u = sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rounding to nearest, ties to even. NaN stays NaN: a quiet NaN of the same sign whose payload
// is the top bits of the input's (what x86's VCVTNEPS2BF16 and VCVTPS2PH give); overflow gives
// infinity of the sign.
inline bfloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((u >> 16) | 0x0040u)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline float16 to_float16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu))};
  if (a >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to >= 65520
  if (a < 0x38800000u) {  // below 2^-14: a subnormal (or zero) result, units of 2^-24
    if (a < 0x33000000u) return {sign};  // below 2^-25 rounds to 0 (2^-25 itself ties to 0)
    const uint32_t exp = a >> 23;
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // value = mant * 2^(exp - 150); result units 2^-24
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return {static_cast<uint16_t>(sign | r)};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a
  // carry out of the mantissa moves into the exponent, as it must.
  const uint32_t rebiased = a - 0x38000000u;
  const uint32_t r = (rebiased + 0x0FFFu + ((rebiased >> 13) & 1u)) >> 13;
  return {static_cast<uint16_t>(sign | r)};
}

namespace detail {
template <class T>
struct ViewElement {
  static_assert(std::is_same_v<std::remove_const_t<T>, float>, "bnorm views hold float, "
                "bfloat16 or float16 data and are declared on float or const float");
  using Raw = std::conditional_t<std::is_const_v<T>, const void, void>;
  template <class E>
  using Like = std::conditional_t<std::is_const_v<T>, const E, E>;
};
}  // namespace detail

// T is float (mutable view) or const float (read-only view); the elements are of dtype().
template <class T>
class BasicTensorView {
  using Raw = typename detail::ViewElement<T>::Raw;
  template <class E>
  using Like = typename detail::ViewElement<T>::template Like<E>;

 public:
  // An empty view: data() == nullptr, rank() == 0.
  BasicTensorView() = default;

  // dims in logical order (N, C, spatial...); at most kMaxRank of them (extra dims are
  // recorded as an invalid rank and rejected by the call that uses the view).
  BasicTensorView(T* data, std::initializer_list<int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(data, std::span<const int64_t>(dims.begin(), dims.size()), layout) {}
  BasicTensorView(T* data, std::span<const int64_t> dims, Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<Raw*>(data), DType::kFloat32, dims, layout) {}

  // No data (an absent optional tensor), fp32.
  BasicTensorView(std::nullptr_t, std::initializer_list<int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<T*>(nullptr), dims, layout) {}

  // bf16 and fp16 data.
  BasicTensorView(Like<bfloat16>* data, std::initializer_list<int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<Raw*>(data), DType::kBFloat16,
                        std::span<const int64_t>(dims.begin(), dims.size()), layout) {}
  BasicTensorView(Like<bfloat16>* data, std::span<const int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<Raw*>(data), DType::kBFloat16, dims, layout) {}
  BasicTensorView(Like<float16>* data, std::initializer_list<int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<Raw*>(data), DType::kFloat16,
                        std::span<const int64_t>(dims.begin(), dims.size()), layout) {}
  BasicTensorView(Like<float16>* data, std::span<const int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(static_cast<Raw*>(data), DType::kFloat16, dims, layout) {}

  // Any element type by its dtype (the C API's entry). An invalid dtype is recorded and
  // rejected by the call that uses the view.
  BasicTensorView(Raw* data, DType dtype, std::span<const int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : raw_(data), dtype_(dtype), layout_(layout) {
    // More than kMaxRank dims: an invalid rank, reported by validation with the first ones.
    rank_ = static_cast<int>(dims.size());
    for (int i = 0; i < rank_ && i < kMaxRank; ++i) dims_[i] = dims[i];
  }

  // A mutable view converts to a read-only one.
  template <class U,
            class = std::enable_if_t<std::is_same_v<U, float> && std::is_same_v<T, const float>>>
  BasicTensorView(const BasicTensorView<U>& other)  // NOLINT(google-explicit-constructor)
      : raw_(other.raw()), dtype_(other.dtype()), rank_(other.rank()), layout_(other.layout()) {
    for (int i = 0; i < kMaxRank; ++i) dims_[i] = other.raw_dim(i);
  }

  // The fp32 elements; nullptr when the view holds another dtype (or no data).
  T* data() const { return dtype_ == DType::kFloat32 ? static_cast<T*>(raw_) : nullptr; }
  // The elements of any dtype, and that dtype.
  Raw* raw() const { return raw_; }
  DType dtype() const { return dtype_; }
  // The elements as E (float, bfloat16 or float16); nullptr unless E is the view's dtype.
  template <class E>
  Like<E>* data_as() const {
    constexpr DType want = std::is_same_v<E, float>      ? DType::kFloat32
                           : std::is_same_v<E, bfloat16> ? DType::kBFloat16
                                                         : DType::kFloat16;
    return dtype_ == want ? static_cast<Like<E>*>(raw_) : nullptr;
  }

  int rank() const { return rank_; }
  Layout layout() const { return layout_; }
  // Logical dim i (0 = N, 1 = C, 2.. = spatial); requires 0 <= i < rank() <= kMaxRank.
  int64_t dim(int i) const { return dims_[i]; }
  int64_t raw_dim(int i) const { return i < kMaxRank ? dims_[i] : 0; }

  int64_t batch() const { return rank_ >= 1 ? dims_[0] : 0; }
  int64_t channels() const { return rank_ >= 2 ? dims_[1] : 0; }
  // Product of the spatial dims (1 for rank 2). Meaningful for a validated view only.
  int64_t spatial() const {
    int64_t s = 1;
    for (int i = 2; i < rank_ && i < kMaxRank; ++i) s *= dims_[i];
    return s;
  }
  // N * C * S. Meaningful for a validated view only.
  int64_t numel() const { return batch() * channels() * spatial(); }

  // "[2, 3, 4, 4]", PyTorch's way of printing a size.
  std::string size_string() const {
    std::string out = "[";
    for (int i = 0; i < rank_ && i < kMaxRank; ++i) {
      if (i) out += ", ";
      out += std::to_string(dims_[i]);
    }
    if (rank_ > kMaxRank) out += ", ...";
    return out + "]";
  }

 private:
  Raw* raw_ = nullptr;
  DType dtype_ = DType::kFloat32;
  int rank_ = 0;
  Layout layout_ = Layout::kChannelsFirst;
  std::array<int64_t, kMaxRank> dims_{};
};

using TensorView = BasicTensorView<float>;
using ConstTensorView = BasicTensorView<const float>;

}  // namespace bnorm

#endif  // BNORM_TENSOR_H_
