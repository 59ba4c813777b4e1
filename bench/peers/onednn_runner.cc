// oneDNN 2.x batch normalization as a benchmark peer (see onednn_runner.h).
//
// Flags: use_scale | use_shift (weight and bias as two vectors; oneDNN 2.6 also has the older
// use_scale_shift, one 2xC tensor), + use_global_stats for inference (the running statistics
// as inputs). Backward is prop_kind::backward: dx, dweight (diff_scale), dbias (diff_shift).
// Data is reordered from the problem's channels-first buffers into the layout once, outside the
// timed calls, and the outputs are reordered back to channels-first to be validated.
#include "peers/onednn_runner.h"

#include <dlfcn.h>

#include <cstdio>
#include <functional>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"

namespace bench::onednn {
namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

struct LayoutCase {
  std::string name;
  memory::dims dims;  // oneDNN's logical dims
  tag user;           // how the problem's channels-first bytes read with these dims
  tag layout;         // the layout timed
};

std::vector<LayoutCase> layouts(const Shape& s) {
  if (s.rank() == 2) {
    memory::dims d2 = {s.n(), s.c()}, d4 = {s.n(), s.c(), 1, 1};
    // nc_as_nhwc: the same bytes described as a 4-D nhwc tensor, which reaches oneDNN's JIT
    // kernel (plain nc goes to a generic path).
    return {{"nc", d2, tag::nc, tag::nc}, {"nc_as_nhwc", d4, tag::nchw, tag::nhwc}};
  }
  memory::dims d = {s.dims[0], s.dims[1], s.dims[2], s.dims[3]};
  return {{"nchw", d, tag::nchw, tag::nchw},
          {"nhwc", d, tag::nchw, tag::nhwc},
          {"nChw16c", d, tag::nchw, tag::nChw16c}};
}

memory vector_memory(const dnnl::engine& eng, const float* data, int64_t c) {
  return memory({{c}, dt::f32, tag::a}, eng, const_cast<float*>(data));
}

}  // namespace

bool available() { return true; }

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

int max_threads() {
  // oneDNN in Debian runs on OpenMP (libgomp, loaded with libdnnl): ask the runtime itself,
  // without building this program with OpenMP.
  using Fn = int (*)();
  if (auto fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"))) return fn();
  return -1;
}

std::vector<Row> run(const Problem& p, const std::vector<Op>& ops, const TimingOptions& timing,
                     Buffer& scratch) {
  std::vector<Row> rows;
  const Shape& shape = p.shape;
  const int64_t C = shape.c();
  const size_t count = static_cast<size_t>(shape.numel());
  const Tolerances tol = tolerances(p);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const float eps = static_cast<float>(p.eps);

  // The reference's biased variance, for backward's input and for validating fwd_train.
  std::vector<float> ref_var(C);
  for (int64_t c = 0; c < C; ++c)
    ref_var[c] = static_cast<float>(1.0 / (double(p.save_invstd[c]) * p.save_invstd[c]) - p.eps);
  std::vector<float> got_mean(C), got_var(C), dweight(C), dbias(C);

  for (const LayoutCase& lc : layouts(shape)) {
    const std::string who = "onednn " + shape.text + " " + lc.name;
    memory::desc user_md(lc.dims, dt::f32, lc.user), md(lc.dims, dt::f32, lc.layout);
    // Copies into / out of the layout.
    auto to_layout = [&](const float* src) {
      memory user(user_md, eng, const_cast<float*>(src)), m(md, eng);
      dnnl::reorder(user, m).execute(strm, user, m);
      strm.wait();
      return m;
    };
    auto to_first = [&](const memory& m) -> const float* {
      memory user(user_md, eng, scratch.data());
      dnnl::reorder(m, user).execute(strm, const_cast<memory&>(m), user);
      strm.wait();
      return scratch.data();
    };
    memory x = to_layout(p.x.data());
    memory y(md, eng);
    std::memset(y.get_data_handle(), 0, md.get_size());
    memory weight = vector_memory(eng, p.weight.data(), C);
    memory bias = vector_memory(eng, p.bias.data(), C);
    const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

    // The training forward's primitive descriptor is also backward's hint.
    dnnl::batch_normalization_forward::primitive_desc train_pd(
        {dnnl::prop_kind::forward_training, md, eps, flags}, eng);

    for (Op op : ops) {
      Row r;
      r.impl = "onednn";
      r.shape = shape.text;
      r.layout = lc.name;
      r.op = op_name(op);
      r.bytes = min_traffic_bytes(op, shape);
      try {
        dnnl::primitive prim;
        std::unordered_map<int, memory> args;
        memory dy, dx, workspace;
        double err = 0;
        if (op == Op::kFwdTrain) {
          memory mean = vector_memory(eng, got_mean.data(), C);
          memory var = vector_memory(eng, got_var.data(), C);
          prim = dnnl::batch_normalization_forward(train_pd);
          args = {{DNNL_ARG_SRC, x},        {DNNL_ARG_DST, y},   {DNNL_ARG_SCALE, weight},
                  {DNNL_ARG_SHIFT, bias},   {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}};
          r.note = train_pd.impl_info_str();
        } else if (op == Op::kFwdInfer) {
          dnnl::batch_normalization_forward::primitive_desc pd(
              {dnnl::prop_kind::forward_inference, md, eps,
               flags | dnnl::normalization_flags::use_global_stats},
              eng);
          prim = dnnl::batch_normalization_forward(pd);
          args = {{DNNL_ARG_SRC, x},
                  {DNNL_ARG_DST, y},
                  {DNNL_ARG_SCALE, weight},
                  {DNNL_ARG_SHIFT, bias},
                  {DNNL_ARG_MEAN, vector_memory(eng, p.eval_mean.data(), C)},
                  {DNNL_ARG_VARIANCE, vector_memory(eng, p.eval_var.data(), C)}};
          r.note = pd.impl_info_str();
        } else {
          dnnl::batch_normalization_backward::primitive_desc pd(
              {dnnl::prop_kind::backward, md, md, eps, flags}, eng, train_pd);
          dy = to_layout(p.dy.data());
          dx = memory(pd.diff_src_desc(), eng);
          std::memset(dx.get_data_handle(), 0, pd.diff_src_desc().get_size());
          prim = dnnl::batch_normalization_backward(pd);
          // The reference's batch statistics, so that backward is judged on its own.
          args = {{DNNL_ARG_SRC, x},
                  {DNNL_ARG_MEAN, vector_memory(eng, p.save_mean.data(), C)},
                  {DNNL_ARG_VARIANCE, vector_memory(eng, ref_var.data(), C)},
                  {DNNL_ARG_DIFF_DST, dy},
                  {DNNL_ARG_SCALE, weight},
                  {DNNL_ARG_SHIFT, bias},  // unused by the math; oneDNN 2.6 asks for it
                  {DNNL_ARG_DIFF_SRC, dx},
                  {DNNL_ARG_DIFF_SCALE, vector_memory(eng, dweight.data(), C)},
                  {DNNL_ARG_DIFF_SHIFT, vector_memory(eng, dbias.data(), C)}};
          r.note = pd.impl_info_str();
        }
        auto call = [&] {
          prim.execute(strm, args);
          strm.wait();
          return true;
        };
        call();
        if (op == Op::kFwdTrain) {
          err = compare("y", who + " fwd_train", to_first(y), p.y_train.data(), count, tol.y_train);
          err = std::max(err, compare("mean", who + " fwd_train", got_mean.data(), p.save_mean.data(), C, tol.mean));
          err = std::max(err, compare("variance", who + " fwd_train", got_var.data(), ref_var.data(), C, tol.var));
        } else if (op == Op::kFwdInfer) {
          err = compare("y", who + " fwd_infer", to_first(y), p.y_eval.data(), count, tol.y_eval);
        } else {
          err = compare("dx", who + " bwd", to_first(dx), p.dx.data(), count, tol.dx);
          err = std::max(err, compare("dweight", who + " bwd", dweight.data(), p.dweight.data(), C, tol.dweight));
          err = std::max(err, compare("dbias", who + " bwd", dbias.data(), p.dbias.data(), C, tol.dbias));
        }
        r.err_ratio = err;
        if (!(err <= 1.0)) {
          r.status = "FAIL";
          r.note += "; validation failed (see the log); not timed";
        } else {
          Timing t = time_calls(call, timing);
          r.status = t.ok ? "ok" : "error";
          r.median_ms = t.median_ms;
          r.min_ms = t.min_ms;
          r.reps = t.reps;
        }
      } catch (const dnnl::error& e) {
        r.status = "error";
        r.note = std::string("oneDNN error: ") + e.what();
        std::fprintf(stderr, "\n!!! %s %s: %s\n\n", who.c_str(), op_name(op), e.what());
      }
      rows.push_back(r);
    }
  }
  return rows;
}

}  // namespace bench::onednn
