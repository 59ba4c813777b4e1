// Non-owning views of fp32 tensors in the shapes batch normalization takes.
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
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <type_traits>

namespace bnorm {

enum class Layout : int { kChannelsFirst = 0, kChannelsLast = 1 };

// "channels_first" or "channels_last" (or "invalid(<n>)").
std::string layout_name(Layout layout);

inline constexpr int kMaxRank = 5;

// T is float (mutable view) or const float (read-only view).
template <class T>
class BasicTensorView {
  static_assert(std::is_same_v<std::remove_const_t<T>, float>, "bnorm views hold fp32 data");

 public:
  // An empty view: data() == nullptr, rank() == 0.
  BasicTensorView() = default;

  // dims in logical order (N, C, spatial...); at most kMaxRank of them (extra dims are
  // recorded as an invalid rank and rejected by the call that uses the view).
  BasicTensorView(T* data, std::initializer_list<int64_t> dims,
                  Layout layout = Layout::kChannelsFirst)
      : BasicTensorView(data, std::span<const int64_t>(dims.begin(), dims.size()), layout) {}

  BasicTensorView(T* data, std::span<const int64_t> dims, Layout layout = Layout::kChannelsFirst)
      : data_(data), layout_(layout) {
    // More than kMaxRank dims: an invalid rank, reported by validation with the first ones.
    rank_ = static_cast<int>(dims.size());
    for (int i = 0; i < rank_ && i < kMaxRank; ++i) dims_[i] = dims[i];
  }

  // A mutable view converts to a read-only one.
  template <class U,
            class = std::enable_if_t<std::is_same_v<U, float> && std::is_same_v<T, const float>>>
  BasicTensorView(const BasicTensorView<U>& other)  // NOLINT(google-explicit-constructor)
      : data_(other.data()), rank_(other.rank()), layout_(other.layout()) {
    for (int i = 0; i < kMaxRank; ++i) dims_[i] = other.raw_dim(i);
  }

  T* data() const { return data_; }
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
  T* data_ = nullptr;
  int rank_ = 0;
  Layout layout_ = Layout::kChannelsFirst;
  std::array<int64_t, kMaxRank> dims_{};
};

using TensorView = BasicTensorView<float>;
using ConstTensorView = BasicTensorView<const float>;

}  // namespace bnorm

#endif  // BNORM_TENSOR_H_
