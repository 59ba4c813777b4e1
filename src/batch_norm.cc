// The functional passes: validate every argument, then run the selected implementation.
// Nothing is written before the last check has passed.
#include "bnorm/batch_norm.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <array>
#include <type_traits>
#include <limits>
#include <new>
#include <vector>

#include "kernels.h"
#include "util/check.h"
#include "util/staging.h"

namespace bnorm {

using detail::Geometry;

#ifndef BNORM_VERSION_STRING
#define BNORM_VERSION_STRING "0.0.0"
#endif

const char* version() { return BNORM_VERSION_STRING; }

std::string layout_name(Layout layout) {
  switch (layout) {
    case Layout::kChannelsFirst:
      return "channels_first";
    case Layout::kChannelsLast:
      return "channels_last";
  }
  return "invalid(" + std::to_string(static_cast<int>(layout)) + ")";
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return "float32";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat16:
      return "float16";
  }
  return "invalid(" + std::to_string(static_cast<int>(dtype)) + ")";
}

namespace {


// What both forwards check first: x, y (same shape, y == x or disjoint), weight and bias.
template <class Args>
Status check_forward_common(const Args& a, Geometry* g) {
  BNORM_RETURN_IF_ERROR(detail::check_tensor("x", a.x, g));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("y", a.y, "x", a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("y", a.y.raw(), "x", a.x.raw(), g->numel(), dtype_size(a.x.dtype())));
  BNORM_RETURN_IF_ERROR(detail::check_channel_vector("weight", a.weight.size(), g->c, false, a.x));
  BNORM_RETURN_IF_ERROR(detail::check_channel_vector("bias", a.bias.size(), g->c, false, a.x));
  return Status();
}

// The kernel call of each pass's (validated) arguments; the fused forms set relu, z, y and dz.
template <class E = float>
detail::TrainCallOf<E> train_call(const ForwardTrainArgs& a, const Geometry& g, double factor) {
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  detail::TrainCallOf<E> call;
  call.g = g;
  call.x = a.x.template data_as<E>();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.bias = a.bias.empty() ? nullptr : a.bias.data();
  call.running_mean = tracking ? a.running_mean.data() : nullptr;
  call.running_var = tracking ? a.running_var.data() : nullptr;
  call.factor = factor;
  call.eps = a.eps;
  call.y = a.y.template data_as<E>();
  call.save_mean = a.save_mean.empty() ? nullptr : a.save_mean.data();
  call.save_invstd = a.save_invstd.empty() ? nullptr : a.save_invstd.data();
  return call;
}

template <class E = float>
detail::EvalCallOf<E> eval_call(const ForwardEvalArgs& a, const Geometry& g) {
  detail::EvalCallOf<E> call;
  call.g = g;
  call.x = a.x.template data_as<E>();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.bias = a.bias.empty() ? nullptr : a.bias.data();
  call.running_mean = a.running_mean.data();
  call.running_var = a.running_var.data();
  call.eps = a.eps;
  call.y = a.y.template data_as<E>();
  return call;
}

template <class E = float>
detail::BackwardCallOf<E> backward_call(const BackwardArgs& a, const Geometry& g) {
  detail::BackwardCallOf<E> call;
  call.g = g;
  call.dy = a.dy.template data_as<E>();
  call.x = a.x.template data_as<E>();
  call.weight = a.weight.empty() ? nullptr : a.weight.data();
  call.training = a.training;
  if (a.training) {
    call.save_mean = a.save_mean.data();
    call.save_invstd = a.save_invstd.data();
  } else {
    call.running_mean = a.running_mean.data();
    call.running_var = a.running_var.data();
  }
  call.eps = a.eps;
  call.dx = a.dx.template data_as<E>();
  call.dweight = a.dweight.empty() ? nullptr : a.dweight.data();
  call.dbias = a.dbias.empty() ? nullptr : a.dbias.data();
  return call;
}

// Chunk k of a ghost pass: samples [k * G, min((k + 1) * G, N)), a contiguous memory range in
// both layouts (a sample is C * S consecutive floats either way).
struct Chunk {
  Geometry g;
  int64_t offset = 0;  // floats from the start of x
};

Chunk chunk_of(const Geometry& g, int64_t ghost, int64_t k) {
  Chunk ch;
  ch.g = g;
  const int64_t first = k * ghost;
  ch.g.n = std::min(ghost, g.n - first);
  ch.offset = first * g.c * g.s;
  return ch;
}

// y = a[c] * y + b[c] per channel, in place.
void affine_in_place(const Geometry& g, const std::vector<double>& a, const std::vector<double>& b,
                     float* y) {
  if (g.layout == Layout::kChannelsFirst) {
    for (int64_t i = 0; i < g.n; ++i)
      for (int64_t c = 0; c < g.c; ++c) {
        float* row = y + (i * g.c + c) * g.s;
        const double ac = a[c], bc = b[c];
        for (int64_t j = 0; j < g.s; ++j) row[j] = static_cast<float>(ac * row[j] + bc);
      }
  } else {
    const double* pa = a.data();
    const double* pb = b.data();
    for (int64_t r = 0; r < g.n * g.s; ++r) {
      float* row = y + r * g.c;
      for (int64_t c = 0; c < g.c; ++c) row[c] = static_cast<float>(pa[c] * row[c] + pb[c]);
    }
  }
}

// The extensions' training forward (everything validated). The running statistics are updated
// in working copies and written (in place or to the *_out buffers) after the last kernel, so a
// failure leaves the state as it was; batch renorm reads mu and sigma from the untouched inputs.
Status forward_train_extended(const ForwardTrainArgs& a, const Geometry& g, int64_t batches,
                              int64_t chunks, const CallOptions& options) {
  const bool tracking = !a.running_mean.empty();
  const bool stateless = !a.running_mean_out.empty();
  const auto c = static_cast<size_t>(g.c);
  const int64_t ghost = a.ghost_batch != 0 ? a.ghost_batch : g.n;
  std::vector<float> rm, rv, mean, invstd;
  std::vector<double> scale, shift;
  try {
    if (tracking) {
      rm.assign(a.running_mean.begin(), a.running_mean.end());
      rv.assign(a.running_var.begin(), a.running_var.end());
    }
    if (a.batch_renorm) {
      mean.resize(c);
      invstd.resize(c);
      scale.resize(c);
      shift.resize(c);
    }
  } catch (const std::bad_alloc&) {
    return Status::internal("out of memory");
  }
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
    for (int64_t k = 0; k < chunks; ++k) {
      const Chunk ch = chunk_of(g, ghost, k);
      detail::TrainCall call;
      call.g = ch.g;
      call.x = a.x.data() + ch.offset;
      call.y = a.y.data() + ch.offset;
      // Batch renorm: the kernel gives xhat; r, d and the affine follow.
      call.weight = a.batch_renorm || a.weight.empty() ? nullptr : a.weight.data();
      call.bias = a.batch_renorm || a.bias.empty() ? nullptr : a.bias.data();
      call.running_mean = tracking ? rm.data() : nullptr;
      call.running_var = tracking ? rv.data() : nullptr;
      call.factor = a.momentum ? *a.momentum : 1.0 / static_cast<double>(batches + k + 1);
      call.eps = a.eps;
      if (a.batch_renorm) {
        call.save_mean = mean.data();
        call.save_invstd = invstd.data();
      } else {
        call.save_mean = a.save_mean.empty() ? nullptr : a.save_mean.data() + k * g.c;
        call.save_invstd = a.save_invstd.empty() ? nullptr : a.save_invstd.data() + k * g.c;
      }
      impl.forward_train(call);
    }
  }));
  if (a.batch_renorm) {
    for (size_t i = 0; i < c; ++i) {
      // sigma from the running statistics as the call found them, sigma_B from the batch.
      const double sigma = std::sqrt(static_cast<double>(a.running_var[i]) + a.eps);
      const double sigma_b = 1.0 / static_cast<double>(invstd[i]);
      const double r = std::clamp(sigma_b / sigma, 1.0 / a.rmax, a.rmax);
      const double d = std::clamp((static_cast<double>(mean[i]) - a.running_mean[i]) / sigma,
                                  -a.dmax, a.dmax);
      const double w = a.weight.empty() ? 1.0 : a.weight[i];
      const double b = a.bias.empty() ? 0.0 : a.bias[i];
      scale[i] = w * r;
      shift[i] = w * d + b;
      if (!a.save_r.empty()) a.save_r[i] = static_cast<float>(r);
      if (!a.save_d.empty()) a.save_d[i] = static_cast<float>(d);
      if (!a.save_mean.empty()) a.save_mean[i] = mean[i];
      if (!a.save_invstd.empty()) a.save_invstd[i] = invstd[i];
    }
    affine_in_place(g, scale, shift, a.y.data());
  }
  if (tracking) {
    float* out_mean = stateless ? a.running_mean_out.data() : a.running_mean.data();
    float* out_var = stateless ? a.running_var_out.data() : a.running_var.data();
    std::memcpy(out_mean, rm.data(), c * sizeof(float));
    std::memcpy(out_var, rv.data(), c * sizeof(float));
    int64_t* counter = stateless ? a.num_batches_tracked_out : a.num_batches_tracked;
    if (counter != nullptr) *counter = batches + chunks;
  }
  return Status();
}

// The extensions' backward (everything validated).
Status backward_extended(const BackwardArgs& a, const detail::BackwardCall& base,
                         const CallOptions& options) {
  const Geometry& g = base.g;
  const auto c = static_cast<size_t>(g.c);
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  const bool want = !a.dweight.empty() || !a.dbias.empty();
  if (!a.renorm_r.empty()) {
    // r and d constant: the batch-norm backward with weight * r; dweight from its sums.
    std::vector<float> wr, sum_dy, sum_dy_xhat;
    try {
      wr.resize(c);
      sum_dy.resize(c);
      sum_dy_xhat.resize(c);
    } catch (const std::bad_alloc&) {
      return Status::internal("out of memory");
    }
    for (size_t i = 0; i < c; ++i)
      wr[i] = static_cast<float>((a.weight.empty() ? 1.0 : static_cast<double>(a.weight[i])) *
                                 a.renorm_r[i]);
    detail::BackwardCall call = base;
    call.weight = wr.data();
    call.dweight = sum_dy_xhat.data();
    call.dbias = sum_dy.data();
    BNORM_RETURN_IF_ERROR(detail::run_kernels([&] { impl.backward(call); }));
    for (size_t i = 0; i < c; ++i) {
      if (!a.dweight.empty())
        a.dweight[i] = static_cast<float>(static_cast<double>(a.renorm_r[i]) * sum_dy_xhat[i] +
                                          static_cast<double>(a.renorm_d[i]) * sum_dy[i]);
      if (!a.dbias.empty()) a.dbias[i] = sum_dy[i];
    }
    return Status();
  }
  // Ghost batch norm: the backward of each chunk with its statistics; parameter gradients summed.
  const int64_t chunks = (g.n + a.ghost_batch - 1) / a.ghost_batch;
  std::vector<float> part_w, part_b;
  std::vector<double> acc_w, acc_b;
  try {
    if (want) {
      part_w.resize(c);
      part_b.resize(c);
      acc_w.assign(c, 0.0);
      acc_b.assign(c, 0.0);
    }
  } catch (const std::bad_alloc&) {
    return Status::internal("out of memory");
  }
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
    for (int64_t k = 0; k < chunks; ++k) {
      const Chunk ch = chunk_of(g, a.ghost_batch, k);
      detail::BackwardCall call = base;
      call.g = ch.g;
      call.dy = base.dy + ch.offset;
      call.x = base.x + ch.offset;
      call.dx = base.dx + ch.offset;
      call.save_mean = base.save_mean + k * g.c;
      call.save_invstd = base.save_invstd + k * g.c;
      call.dweight = want ? part_w.data() : nullptr;
      call.dbias = want ? part_b.data() : nullptr;
      impl.backward(call);
      for (size_t i = 0; want && i < c; ++i) {
        acc_w[i] += part_w[i];
        acc_b[i] += part_b[i];
      }
    }
  }));
  for (size_t i = 0; i < c; ++i) {
    if (!a.dweight.empty()) a.dweight[i] = static_cast<float>(acc_w[i]);
    if (!a.dbias.empty()) a.dbias[i] = static_cast<float>(acc_b[i]);
  }
  return Status();
}


// ---- bf16 and fp16 tensors ----
//
// A call on 16-bit tensors runs the implementation's native pass when it has one (no extension
// used), else it is staged: the 16-bit inputs are widened into fp32 copies (exact), the fp32
// pass runs on them, and the outputs are rounded to nearest even. The native passes give the
// staged results bit for bit (tests/cpu/half_kernel_test.cc). Validation has passed before
// either path starts, so nothing is written unless the fp32 pass succeeds.

// fn(E{}) for the 16-bit dtype d.
template <class Fn>
Status by_dtype(DType d, Fn&& fn) {
  if (d == DType::kBFloat16) return fn(bfloat16{});
  return fn(float16{});
}

CallOptions staged_options(const CallOptions& options) {
  CallOptions o = options;
  o.check_finite = false;  // checked on the 16-bit tensors already
  return o;
}

// A forward through fp32 copies: x (its copy also taking y, which may alias x) and z (when set)
// are widened, run(fp32 args, fp32 z) runs the fp32 pass, and y is rounded when it succeeded.
template <class Args, class Run>
Status staged_forward(const Args& a, ConstTensorView z, const Geometry& g, const Run& run) {
  detail::Fp32Copy xs, zs;
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
    detail::widen_to_fp32(a.x, g.numel(), &xs);
    if (z.raw() != nullptr) detail::widen_to_fp32(z, g.numel(), &zs);
  }));
  Args f = a;
  f.x = detail::fp32_view_like(a.x, xs.data());
  f.y = detail::fp32_view_like(a.x, xs.data());
  const Status st =
      run(f, z.raw() != nullptr ? detail::fp32_view_like(z, zs.data()) : ConstTensorView());
  if (st.ok()) detail::narrow_from_fp32(xs, a.y);
  return st;
}

template <class E>
Status half_forward_train(const ForwardTrainArgs& a, ConstTensorView z, bool relu,
                          const Geometry& g, double factor, int64_t batches,
                          const CallOptions& options) {
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  const auto native = detail::native_forward_train<E>(impl);
  if (native != nullptr && !detail::has_extensions(a)) {
    detail::TrainCallOf<E> call = train_call<E>(a, g, factor);
    call.relu = relu;
    call.z = z.template data_as<E>();
    BNORM_RETURN_IF_ERROR(detail::run_kernels([&] { native(call); }));
    const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
    if (tracking && a.num_batches_tracked != nullptr) *a.num_batches_tracked = batches + 1;
    return Status();
  }
  return staged_forward(a, z, g, [&](const ForwardTrainArgs& f, ConstTensorView fz) {
    return relu ? forward_train_relu(f, fz, staged_options(options))
                : forward_train(f, staged_options(options));
  });
}

template <class E>
Status half_forward_eval(const ForwardEvalArgs& a, ConstTensorView z, bool relu, const Geometry& g,
                         const CallOptions& options) {
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  const auto native = detail::native_forward_eval<E>(impl);
  if (native != nullptr) {
    detail::EvalCallOf<E> call = eval_call<E>(a, g);
    call.relu = relu;
    call.z = z.template data_as<E>();
    return detail::run_kernels([&] { native(call); });
  }
  return staged_forward(a, z, g, [&](const ForwardEvalArgs& f, ConstTensorView fz) {
    return relu ? forward_eval_relu(f, fz, staged_options(options))
                : forward_eval(f, staged_options(options));
  });
}

// y (the fused forms' forward output) set: backward_relu, with dz when it has data.
template <class E>
Status half_backward(const BackwardArgs& a, ConstTensorView y, TensorView dz, const Geometry& g,
                     const CallOptions& options) {
  const bool relu = y.raw() != nullptr;
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  const auto native = detail::native_backward<E>(impl);
  if (native != nullptr && !detail::has_extensions(a)) {
    detail::BackwardCallOf<E> call = backward_call<E>(a, g);
    call.y = y.template data_as<E>();
    call.dz = dz.template data_as<E>();
    return detail::run_kernels([&] { native(call); });
  }
  // dx goes to the copy of dy (it may alias dy), or with the ReLU to the copy of x, dz then
  // taking the copy of dy (dz may alias dy, dx must not overlap dz).
  detail::Fp32Copy dys, xs, ys;
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] {
    detail::widen_to_fp32(a.dy, g.numel(), &dys);
    detail::widen_to_fp32(a.x, g.numel(), &xs);
    if (relu) detail::widen_to_fp32(y, g.numel(), &ys);
  }));
  BackwardArgs f = a;
  f.dy = detail::fp32_view_like(a.x, dys.data());
  f.x = detail::fp32_view_like(a.x, xs.data());
  f.dx = detail::fp32_view_like(a.x, relu ? xs.data() : dys.data());
  Status st;
  if (relu) {
    const bool want_dz = dz.raw() != nullptr;
    st = backward_relu(f, detail::fp32_view_like(a.x, ys.data()),
                       want_dz ? detail::fp32_view_like(a.x, dys.data()) : TensorView(),
                       staged_options(options));
    if (st.ok()) {
      detail::narrow_from_fp32(xs, a.dx);
      if (want_dz) detail::narrow_from_fp32(dys, dz);
    }
  } else {
    st = backward(f, staged_options(options));
    if (st.ok()) detail::narrow_from_fp32(dys, a.dx);
  }
  return st;
}

}  // namespace

Status forward_train(const ForwardTrainArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  double factor = 0;
  int64_t batches = 0;
  BNORM_RETURN_IF_ERROR(detail::check_train_args(a, g, &factor, &batches));
  int64_t chunks = 1;
  BNORM_RETURN_IF_ERROR(detail::check_train_extensions(a, g, batches, &chunks));
  BNORM_RETURN_IF_ERROR(detail::check_more_than_one_value_per_channel(a.x, g));
  if (options.check_finite) BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_forward_train<decltype(e)>(a, {}, false, g, factor, batches, options);
    });
  if (detail::has_extensions(a)) return forward_train_extended(a, g, batches, chunks, options);

  detail::TrainCall call = train_call(a, g, factor);
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] { impl.forward_train(call); }));
  if (tracking && a.num_batches_tracked != nullptr) *a.num_batches_tracked = batches + 1;
  return Status();
}

Status forward_eval(const ForwardEvalArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_mean", a.running_mean.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_var", a.running_var.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(detail::check_eps(a.eps));
  if (options.check_finite) BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_forward_eval<decltype(e)>(a, {}, false, g, options);
    });

  detail::EvalCall call = eval_call(a, g);
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.forward_eval(call); });
}

Status backward(const BackwardArgs& a, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(detail::check_tensor("x", a.x, &g));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dy", a.dy, "x", a.x));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dx", a.dx, "x", a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.raw(), "dy", a.dy.raw(), g.numel(), dtype_size(a.x.dtype())));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.raw(), "x", a.x.raw(), g.numel(), dtype_size(a.x.dtype())));
  BNORM_RETURN_IF_ERROR(detail::check_backward_args(a, g));
  BNORM_RETURN_IF_ERROR(detail::check_backward_extensions(a, g));
  if (options.check_finite) {
    BNORM_RETURN_IF_ERROR(detail::check_finite("dy", a.dy, g));
    BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
  }
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_backward<decltype(e)>(a, {}, {}, g, options);
    });

  detail::BackwardCall call = backward_call(a, g);
  if (detail::has_extensions(a)) return backward_extended(a, call, options);
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.backward(call); });
}

namespace {

// An output that must not share any element with another array.
Status check_disjoint(const char* out_name, const void* out, const char* in_name,
                      const void* in, int64_t bytes) {
  const auto o = reinterpret_cast<uintptr_t>(out), i = reinterpret_cast<uintptr_t>(in);
  const auto n = static_cast<uintptr_t>(bytes);
  if (o + n <= i || i + n <= o) return Status();
  return Status::invalid_argument(std::string(out_name) + ": overlaps " + in_name +
                                  "; it must be a separate buffer");
}

}  // namespace

Status forward_train_relu(const ForwardTrainArgs& a, ConstTensorView z,
                          const CallOptions& options) {
  if (a.batch_renorm || a.ghost_batch != 0 || !a.running_mean_out.empty() ||
      !a.running_var_out.empty() || a.num_batches_tracked_out != nullptr)
    return Status::invalid_argument(
        "forward_train_relu: batch_renorm, ghost_batch and the *_out outputs are not supported "
        "by the fused forms (call forward_train, then the ReLU)");
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  const bool add = z.raw() != nullptr;
  if (add) {
    BNORM_RETURN_IF_ERROR(detail::check_same_shape("z", z, "x", a.x));
    BNORM_RETURN_IF_ERROR(
        detail::check_no_partial_overlap("y", a.y.raw(), "z", z.raw(), g.numel(), dtype_size(a.x.dtype())));
  }
  const bool tracking = !a.running_mean.empty() || !a.running_var.empty();
  double factor = 0;
  int64_t batches = 0;
  BNORM_RETURN_IF_ERROR(detail::check_train_args(a, g, &factor, &batches));
  BNORM_RETURN_IF_ERROR(detail::check_more_than_one_value_per_channel(a.x, g));
  if (options.check_finite) {
    BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
    if (add) BNORM_RETURN_IF_ERROR(detail::check_finite("z", z, g));
  }
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_forward_train<decltype(e)>(a, z, true, g, factor, batches, options);
    });

  detail::TrainCall call = train_call(a, g, factor);
  call.relu = true;
  call.z = add ? z.data() : nullptr;
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  BNORM_RETURN_IF_ERROR(detail::run_kernels([&] { impl.forward_train(call); }));
  if (tracking && a.num_batches_tracked != nullptr) *a.num_batches_tracked = batches + 1;
  return Status();
}

Status forward_eval_relu(const ForwardEvalArgs& a, ConstTensorView z, const CallOptions& options) {
  Geometry g;
  BNORM_RETURN_IF_ERROR(check_forward_common(a, &g));
  const bool add = z.raw() != nullptr;
  if (add) {
    BNORM_RETURN_IF_ERROR(detail::check_same_shape("z", z, "x", a.x));
    BNORM_RETURN_IF_ERROR(
        detail::check_no_partial_overlap("y", a.y.raw(), "z", z.raw(), g.numel(), dtype_size(a.x.dtype())));
  }
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_mean", a.running_mean.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(
      detail::check_channel_vector("running_var", a.running_var.size(), g.c, true, a.x));
  BNORM_RETURN_IF_ERROR(detail::check_eps(a.eps));
  if (options.check_finite) {
    BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
    if (add) BNORM_RETURN_IF_ERROR(detail::check_finite("z", z, g));
  }
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_forward_eval<decltype(e)>(a, z, true, g, options);
    });

  detail::EvalCall call = eval_call(a, g);
  call.relu = true;
  call.z = add ? z.data() : nullptr;
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.forward_eval(call); });
}

Status backward_relu(const BackwardArgs& a, ConstTensorView y, TensorView dz,
                     const CallOptions& options) {
  if (!a.renorm_r.empty() || !a.renorm_d.empty() || a.ghost_batch != 0)
    return Status::invalid_argument(
        "backward_relu: renorm_r, renorm_d and ghost_batch are not supported by the fused forms");
  Geometry g;
  BNORM_RETURN_IF_ERROR(detail::check_tensor("x", a.x, &g));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dy", a.dy, "x", a.x));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("y", y, "x", a.x));
  BNORM_RETURN_IF_ERROR(detail::check_same_shape("dx", a.dx, "x", a.x));
  const int64_t numel = g.numel();
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.raw(), "dy", a.dy.raw(), numel, dtype_size(a.x.dtype())));
  BNORM_RETURN_IF_ERROR(
      detail::check_no_partial_overlap("dx", a.dx.raw(), "x", a.x.raw(), numel, dtype_size(a.x.dtype())));
  BNORM_RETURN_IF_ERROR(detail::check_no_partial_overlap("dx", a.dx.raw(), "y", y.raw(), numel, dtype_size(a.x.dtype())));
  const bool want_dz = dz.raw() != nullptr;
  if (want_dz) {
    BNORM_RETURN_IF_ERROR(detail::check_same_shape("dz", dz, "x", a.x));
    BNORM_RETURN_IF_ERROR(
        detail::check_no_partial_overlap("dz", dz.raw(), "dy", a.dy.raw(), numel, dtype_size(a.x.dtype())));
    BNORM_RETURN_IF_ERROR(check_disjoint("dz", dz.raw(), "x", a.x.raw(), numel * dtype_size(a.x.dtype())));
    BNORM_RETURN_IF_ERROR(check_disjoint("dz", dz.raw(), "y", y.raw(), numel * dtype_size(a.x.dtype())));
    BNORM_RETURN_IF_ERROR(check_disjoint("dz", dz.raw(), "dx", a.dx.raw(), numel * dtype_size(a.x.dtype())));
  }
  BNORM_RETURN_IF_ERROR(detail::check_backward_args(a, g));
  if (options.check_finite) {
    BNORM_RETURN_IF_ERROR(detail::check_finite("dy", a.dy, g));
    BNORM_RETURN_IF_ERROR(detail::check_finite("x", a.x, g));
    BNORM_RETURN_IF_ERROR(detail::check_finite("y", y, g));
  }
  if (a.x.dtype() != DType::kFloat32)
    return by_dtype(a.x.dtype(), [&](auto e) {
      return half_backward<decltype(e)>(a, y, dz, g, options);
    });

  detail::BackwardCall call = backward_call(a, g);
  call.y = y.data();
  call.dz = want_dz ? dz.data() : nullptr;
  const detail::Implementation& impl = detail::select_implementation(options.backend);
  return detail::run_kernels([&] { impl.backward(call); });
}

}  // namespace bnorm
