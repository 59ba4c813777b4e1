#include <cstring>
#include <string>

#include "bnorm/nn/layers.h"
#include "common.h"

namespace bnorm::nn {
namespace {

Status prefixed(size_t index, const Status& s) {
  std::string m = std::to_string(index) + ": " + s.message();
  switch (s.code()) {
    case StatusCode::kNonFinite:
      return Status::non_finite(std::move(m));
    case StatusCode::kInternal:
      return Status::internal(std::move(m));
    default:
      return Status::invalid_argument(std::move(m));
  }
}

}  // namespace

Status Sequential::add(std::unique_ptr<Module> module) {
  if (module == nullptr)
    return Status::invalid_argument("Sequential::add: module " + std::to_string(size()) +
                                    ": is null");
  module->train(training_);
  x_ = nullptr;  // growing outputs_ may move the tensors the children remembered
  modules_.push_back(std::move(module));
  outputs_.emplace_back();
  grads_.emplace_back();
  return Status();
}

bool Sequential::fusable(size_t i) const {
  if (!fuse_bn_relu_ || i + 1 >= modules_.size()) return false;
  const auto* bn = dynamic_cast<const BatchNormNd*>(modules_[i].get());
  return bn != nullptr && bn->layer().sync_communicator() == nullptr &&
         dynamic_cast<const ReLU*>(modules_[i + 1].get()) != nullptr;
}

Status Sequential::forward(const Tensor& x, Tensor* y) {
  if (y == nullptr) return Status::invalid_argument("Sequential: y: is null");
  if (y == &x) return Status::invalid_argument("Sequential: y: must not be x");
  const Tensor* in = &x;
  fused_.assign(modules_.size(), 0);
  for (size_t i = 0; i < modules_.size(); ++i) {
    if (fusable(i)) {
      // The batch norm writes the ReLU's output; its own output stays empty.
      Status s = static_cast<BatchNormNd&>(*modules_[i]).forward_relu(*in, &outputs_[i + 1]);
      if (!s.ok()) {
        x_ = nullptr;
        return prefixed(i, s);
      }
      outputs_[i].resize({0});
      fused_[i] = 1;
      in = &outputs_[++i];
      continue;
    }
    Status s = modules_[i]->forward(*in, &outputs_[i]);
    if (!s.ok()) {
      x_ = nullptr;
      return prefixed(i, s);
    }
    in = &outputs_[i];
  }
  *y = *in;  // copies; reuses y's allocation
  x_ = &x;
  return Status();
}

Status Sequential::backward(const Tensor& dy, Tensor* dx) {
  if (x_ == nullptr)
    return Status::invalid_argument("Sequential: backward: no successful forward before it");
  if (dx == &dy) return Status::invalid_argument("Sequential: dx: must not be dy");
  if (modules_.empty()) {
    if (!dy.same_shape(*x_))
      return detail::shape_error("Sequential", "dy", "the forward's output shape " +
                                                         x_->size_string(), dy);
    if (dx != nullptr) *dx = dy;
    return Status();
  }
  if (!dy.same_shape(outputs_.back()))
    return detail::shape_error("Sequential", "dy",
                               "the forward's output shape " + outputs_.back().size_string(), dy);
  const Tensor* g = &dy;
  for (size_t i = modules_.size(); i-- > 0;) {
    if (i > 0 && fused_[i - 1]) {  // the ReLU at i and the batch norm at i - 1, fused
      --i;
      Tensor* target = i == 0 ? dx : &grads_[i];
      Status s = static_cast<BatchNormNd&>(*modules_[i]).backward_relu(*g, outputs_[i + 1], target);
      if (!s.ok()) return prefixed(i, s);
      g = target;
      continue;
    }
    Tensor* target = i == 0 ? dx : &grads_[i];
    Status s = modules_[i]->backward(*g, target);
    if (!s.ok()) return prefixed(i, s);
    g = target;
  }
  return Status();
}

void Sequential::train(bool on) {
  training_ = on;
  for (auto& m : modules_) m->train(on);
}

void Sequential::set_sync(Communicator* comm, SyncMode mode) {
  for (auto& m : modules_) m->set_sync(comm, mode);
}

void Sequential::set_sync_split(const std::vector<int64_t>& split) {
  for (auto& m : modules_) m->set_sync_split(split);
}

void Sequential::zero_grad() {
  for (auto& m : modules_) m->zero_grad();
}

std::string Sequential::repr() const {
  if (modules_.empty()) return "Sequential()";
  std::string r = "Sequential(\n";
  for (size_t i = 0; i < modules_.size(); ++i) {
    std::string child = modules_[i]->repr();
    // Indent the child's continuation lines as PyTorch does.
    std::string indented;
    for (char ch : child) {
      indented += ch;
      if (ch == '\n') indented += "  ";
    }
    r += "  (" + std::to_string(i) + "): " + indented + "\n";
  }
  return r + ")";
}

std::string Sequential::architecture() const {
  std::string r = "[";
  for (size_t i = 0; i < modules_.size(); ++i) {
    if (i) r += ",";
    r += modules_[i]->architecture();
  }
  return r + "]";
}

void Sequential::append_state(const std::string& prefix, std::vector<StateEntry>* out) {
  for (size_t i = 0; i < modules_.size(); ++i)
    modules_[i]->append_state(prefix + std::to_string(i) + ".", out);
}

}  // namespace bnorm::nn
