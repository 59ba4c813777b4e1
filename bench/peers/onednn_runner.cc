// oneDNN 2.x batch normalization as a benchmark peer (see onednn_runner.h).
//
// Flags: use_scale | use_shift (weight and bias as two vectors; oneDNN 2.6 also has the older
// use_scale_shift, one 2xC tensor), + use_global_stats for inference (the running statistics
// as inputs). Backward is prop_kind::backward: dx, dweight (diff_scale), dbias (diff_shift).
// Data is reordered from the problem's channels-first buffers into the layout once, outside the
// timed calls, and the outputs are reordered back to channels-first to be validated.
//
// bf16 and f16 problems: the tensors (src, dst, diff_src, diff_dst) in the layout are of that
// data type (the reorder from the problem's fp32 values, already representable, is exact), the
// per-channel vectors fp32 as oneDNN requires. oneDNN reports a data type / ISA combination it
// does not implement by failing the primitive descriptor's creation (dnnl_unimplemented): such a
// case is a "skip" row whose note starts "unsupported by oneDNN <version>", never a pass.
#include "peers/onednn_runner.h"

#include <dlfcn.h>

#include <cstdio>
#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
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

dt data_type(Dtype d) {
  return d == Dtype::kBF16 ? dt::bf16 : d == Dtype::kF16 ? dt::f16 : dt::f32;
}

// A primitive or reorder that oneDNN does not implement for this data type on this CPU.
bool unimplemented(const std::exception& e) {
  auto* de = dynamic_cast<const dnnl::error*>(&e);
  return de != nullptr && de->status == dnnl_unimplemented;
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

std::vector<Row> run(const Problem& p, const RunOptions& run, Buffer& scratch) {
  std::vector<Row> rows;
  const Shape& shape = p.shape;
  const int64_t C = shape.c();
  const size_t count = static_cast<size_t>(shape.numel());
  const Tolerances tol = tolerances(p);
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  const float eps = static_cast<float>(p.eps);
  auto row = [&](const std::string& layout, Op op, Mode mode) {
    Row r;
    r.impl = "onednn";
    r.shape = shape.text;
    r.layout = layout;
    r.op = op_name(op);
    r.mode = mode_name(mode);
    r.dtype = dtype_name(p.dtype);
    r.bytes = min_traffic_bytes(op, shape, p.dtype);
    return r;
  };
  const std::string unsupported = "unsupported by oneDNN " + version() + ": ";
  if (std::find(run.ops.begin(), run.ops.end(), Op::kFwdTrainAddRelu) != run.ops.end()) {
    for (Mode mode : run.modes) {
      Row r = row("-", Op::kFwdTrainAddRelu, mode);
      r.status = "skip";
      r.note = "oneDNN " + version() +
               " has no fused BN + add + ReLU on CPU (fuse_norm_add_relu: later versions, GPU only)";
      rows.push_back(r);
    }
  }

  // The reference's biased variance, for backward's input and for validating fwd_train.
  std::vector<float> ref_var(C);
  for (int64_t c = 0; c < C; ++c)
    ref_var[c] = static_cast<float>(1.0 / (double(p.save_invstd[c]) * p.save_invstd[c]) - p.eps);
  std::vector<float> got_mean(C), got_var(C), dweight(C), dbias(C);

  const dt data_dt = data_type(p.dtype);
  const std::string dtype_text = dtype_name(p.dtype);
  for (const LayoutCase& lc : layouts(shape)) {
    const std::string who = "onednn " + shape.text + " " + lc.name +
                            (p.dtype == Dtype::kF32 ? "" : " " + dtype_text);
    // The problem's channels-first fp32 values, and the layout timed in the problem's dtype.
    memory::desc user_md(lc.dims, dt::f32, lc.user), md(lc.dims, data_dt, lc.layout);
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
    memory x, y;
    std::string layout_error;  // the layout's tensors could not be made (e.g. no reorder)
    bool layout_unsupported = false;
    try {
      x = to_layout(p.x.data());
      y = memory(md, eng);
      std::memset(y.get_data_handle(), 0, md.get_size());
    } catch (const std::exception& e) {
      layout_unsupported = unimplemented(e);
      layout_error = (layout_unsupported ? unsupported + "reorder to " + dtype_text + " " + lc.name
                                         : std::string("oneDNN error: ")) + " (" + e.what() + ")";
      if (!layout_unsupported) std::fprintf(stderr, "\n!!! %s: %s\n\n", who.c_str(), layout_error.c_str());
    }
    memory weight = vector_memory(eng, p.weight.data(), C);
    memory bias = vector_memory(eng, p.bias.data(), C);
    const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    const auto relu = dnnl::normalization_flags::fuse_norm_relu;

    // The training forwards' primitive descriptors are also the backwards' hints; made when an
    // op needs them (a data type oneDNN does not implement fails their creation).
    std::optional<dnnl::batch_normalization_forward::primitive_desc> train_pd_, train_relu_pd_;
    auto train_pd_of = [&](bool with_relu) -> const dnnl::batch_normalization_forward::primitive_desc& {
      auto& pd = with_relu ? train_relu_pd_ : train_pd_;
      if (!pd)
        pd.emplace(dnnl::batch_normalization_forward::desc(dnnl::prop_kind::forward_training, md,
                                                           eps, flags | (with_relu ? relu : dnnl::normalization_flags::none)),
                   eng);
      return *pd;
    };

    for (Op op : run.ops) {
      if (op == Op::kFwdTrainAddRelu) continue;  // the skip row above
      const bool with_relu = fused(op);
      Row base_row = row(lc.name, op, run.modes.front());
      double err = 0;
      std::string error = layout_error;
      bool refused = layout_unsupported;  // oneDNN does not implement it: a skip row
      dnnl::primitive prim;
      std::unordered_map<int, memory> args;
      std::vector<int> inputs = {DNNL_ARG_SRC}, outputs;  // the per-call tensors
      memory dy, dx, workspace;
      Buffer dx_ref;  // bwd_relu: the reference on oneDNN's own mask
      std::vector<float> dweight_ref, dbias_ref;
      try {
        if (!error.empty()) throw std::runtime_error(error);
        if (training_forward(op)) {
          const auto& pd = train_pd_of(with_relu);
          memory mean = vector_memory(eng, got_mean.data(), C);
          memory var = vector_memory(eng, got_var.data(), C);
          prim = dnnl::batch_normalization_forward(pd);
          args = {{DNNL_ARG_SRC, x},        {DNNL_ARG_DST, y},   {DNNL_ARG_SCALE, weight},
                  {DNNL_ARG_SHIFT, bias},   {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}};
          outputs = {DNNL_ARG_DST};
          if (with_relu) {  // the mask its backward reads
            workspace = memory(pd.workspace_desc(), eng);
            std::memset(workspace.get_data_handle(), 0, pd.workspace_desc().get_size());
            args[DNNL_ARG_WORKSPACE] = workspace;
            outputs.push_back(DNNL_ARG_WORKSPACE);
          }
          base_row.note = pd.impl_info_str();
        } else if (inference(op)) {
          dnnl::batch_normalization_forward::primitive_desc pd(
              {dnnl::prop_kind::forward_inference, md, eps,
               flags | dnnl::normalization_flags::use_global_stats |
                   (with_relu ? relu : dnnl::normalization_flags::none)},
              eng);
          prim = dnnl::batch_normalization_forward(pd);
          args = {{DNNL_ARG_SRC, x},
                  {DNNL_ARG_DST, y},
                  {DNNL_ARG_SCALE, weight},
                  {DNNL_ARG_SHIFT, bias},
                  {DNNL_ARG_MEAN, vector_memory(eng, p.eval_mean.data(), C)},
                  {DNNL_ARG_VARIANCE, vector_memory(eng, p.eval_var.data(), C)}};
          outputs = {DNNL_ARG_DST};
          base_row.note = pd.impl_info_str();
        } else {
          dnnl::batch_normalization_backward::primitive_desc pd(
              {dnnl::prop_kind::backward, md, md, eps,
               flags | (with_relu ? relu : dnnl::normalization_flags::none)},
              eng, train_pd_of(with_relu));
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
          inputs.push_back(DNNL_ARG_DIFF_DST);
          outputs = {DNNL_ARG_DIFF_SRC};
          if (with_relu) {
            // The workspace of oneDNN's own fused training forward on x: its mask is that
            // forward's y > 0, which can differ from the reference's where y is within
            // rounding of 0, so the reference backward is run on that y.
            workspace = memory(pd.workspace_desc(), eng);
            memory y_fwd(md, eng);
            dnnl::batch_normalization_forward(train_pd_of(true))
                .execute(strm, {{DNNL_ARG_SRC, x},
                                {DNNL_ARG_DST, y_fwd},
                                {DNNL_ARG_SCALE, weight},
                                {DNNL_ARG_SHIFT, bias},
                                {DNNL_ARG_MEAN, vector_memory(eng, got_mean.data(), C)},
                                {DNNL_ARG_VARIANCE, vector_memory(eng, got_var.data(), C)},
                                {DNNL_ARG_WORKSPACE, workspace}});
            strm.wait();
            args[DNNL_ARG_WORKSPACE] = workspace;
            inputs.push_back(DNNL_ARG_WORKSPACE);
            dx_ref = Buffer(count);
            dweight_ref.resize(C);
            dbias_ref.resize(C);
            reference_backward_relu(p, to_first(y_fwd), dx_ref.data(), dweight_ref, dbias_ref);
          }
          base_row.note = pd.impl_info_str();
        }
        prim.execute(strm, args);
        strm.wait();
        const std::string w = who + " " + op_name(op);
        if (training_forward(op)) {
          err = compare("y", w, to_first(y), (with_relu ? p.y_train_relu : p.y_train).data(), count, tol.y_train);
          err = std::max(err, compare("mean", w, got_mean.data(), p.save_mean.data(), C, tol.mean));
          err = std::max(err, compare("variance", w, got_var.data(), ref_var.data(), C, tol.var));
        } else if (inference(op)) {
          err = compare("y", w, to_first(y), (with_relu ? p.y_eval_relu : p.y_eval).data(), count, tol.y_eval);
        } else {
          err = compare("dx", w, to_first(dx), (with_relu ? dx_ref : p.dx).data(), count,
                        with_relu ? tol.dx_relu : tol.dx);
          err = std::max(err, compare("dweight", w, dweight.data(),
                                      (with_relu ? dweight_ref : p.dweight).data(), C, tol.dweight));
          err = std::max(err, compare("dbias", w, dbias.data(),
                                      (with_relu ? dbias_ref : p.dbias).data(), C, tol.dbias));
        }
      } catch (const std::exception& e) {  // dnnl::error, or the reference failing
        if (error.empty()) {
          refused = unimplemented(e);
          // oneDNN's way of saying it has no such primitive: the creation of the primitive
          // descriptor fails with dnnl_unimplemented.
          error = refused ? unsupported + dtype_text +
                                " batch normalization has no implementation on this CPU (" +
                                e.what() + ")"
                          : std::string("oneDNN error: ") + e.what();
          if (!refused)  // a refusal is a skip row, printed with the rows
            std::fprintf(stderr, "\n!!! %s %s: %s\n\n", who.c_str(), op_name(op), error.c_str());
        }
      }

      for (Mode mode : run.modes) {
        Row r = base_row;
        r.mode = mode_name(mode);
        r.err_ratio = err;
        if (refused) {
          r.status = "skip";
          r.note = error;
        } else if (!error.empty()) {
          r.status = "error";
          r.note = error;
        } else if (!(err <= 1.0)) {
          r.status = "FAIL";
          r.note += "; validation failed (see the log); not timed";
        } else {
          try {
            // Buffer sets: the validated one, and in cold mode copies of its inputs with
            // their own outputs (bench_common.h, rotation).
            double set_bytes = 0;
            for (int id : inputs) set_bytes += args.at(id).get_desc().get_size();
            for (int id : outputs) set_bytes += args.at(id).get_desc().get_size();
            const Rotation rot = rotation(mode, set_bytes, run.cold_budget_bytes);
            std::vector<std::unordered_map<int, memory>> sets = {args};
            for (int k = 1; k < rot.sets; ++k) {
              auto a = args;
              for (int id : inputs) {
                memory m(args.at(id).get_desc(), eng);
                std::memcpy(m.get_data_handle(), args.at(id).get_data_handle(),
                            args.at(id).get_desc().get_size());
                a[id] = m;
              }
              for (int id : outputs) {
                memory m(args.at(id).get_desc(), eng);
                std::memset(m.get_data_handle(), 0, args.at(id).get_desc().get_size());
                a[id] = m;
              }
              sets.push_back(std::move(a));
            }
            size_t next = 0;
            Timing t = time_calls(
                [&] {
                  prim.execute(strm, sets[next++ % sets.size()]);
                  strm.wait();
                  return true;
                },
                run.timing);
            r.status = t.ok ? "ok" : "error";
            r.median_ms = t.median_ms;
            r.min_ms = t.min_ms;
            r.reps = t.reps;
            if (!rot.note.empty()) r.note += "; " + rot.note;
          } catch (const std::exception& e) {
            r.status = "error";
            r.note = std::string("oneDNN error: ") + e.what();
          }
        }
        rows.push_back(r);
      }
    }
  }
  return rows;
}

}  // namespace bench::onednn
