// The three whole passes of the CPU kernels, one dynamic dispatch each.
//
// Training forward and training backward run wave by wave (plan.h): the blocks of a wave are
// reduced, the wave's channels merged, then the same blocks applied by the same threads, so the
// second read of the inputs comes from cache when a wave fits in it. Each thread handles the
// same contiguous range of a wave's blocks in both sweeps.
//
// The sweeps are pipelined: wave k is applied in the same sweep that reduces wave k + 1, each
// thread alternating between its apply blocks and its reduce blocks. The apply reads from cache
// and writes to DRAM while the reduce reads from DRAM, so both directions of the memory system
// are busy at once, as in a copy, instead of a read-only sweep followed by a write-only one.
// Waves are disjoint channel ranges, so the interleaving cannot change a result (in-place
// included), and the partials of a block do not depend on when it is reduced.
//
// A local plan (plan.h: channels-first groups whose data fits in L2) runs instead in one pool
// job of whole groups: a thread reduces a group's blocks, merges its channels and applies its
// blocks, then takes the next group. The second read comes from L2, and there is no pool job (a
// wait for the slowest thread) per wave. Each group's sums and parameters are its own, so the
// result is the same whichever thread takes it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/passes.cc"
// clang-format off
#include "hwy/foreach_target.h"  // IWYU pragma: keep
// clang-format on

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cpu/cpu.h"
#include "cpu/internal.h"
#include "cpu/ops-inl.h"
#include "cpu/thread_pool.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace bnorm::cpu::HWY_NAMESPACE {
namespace {

// Which sweep of a wave a job runs; the caller runs them in order, one pool job each.
enum class Phase { kReduce, kMerge, kApply, kReduceApply, kApplyThenReduce, kGroups };

// Runs apply(k) for k in [a0, a1) and reduce(k) for k in [r0, r1), alternating so that both
// progress at the same rate.
template <class Apply, class Reduce>
void interleave(int64_t a0, int64_t a1, int64_t r0, int64_t r1, const Apply& apply,
                const Reduce& reduce) {
  const int64_t na = a1 - a0, nr = r1 - r0;
  int64_t ia = 0, ir = 0;
  while (ia < na || ir < nr) {
    if (ir >= nr || (ia < na && ia * nr <= ir * na)) {
      apply(a0 + ia++);
    } else {
      reduce(r0 + ir++);
    }
  }
}

// The sweeps of a pipelined wave loop: reduce(0), merge(0), then for k >= 1
// [apply(k - 1) + reduce(k)], merge(k), and at last apply(K - 1).
template <class Job>
void run_waves(const Plan& plan, int threads, Job* job, void (*task)(void*, int, int)) {
  ThreadPool& pool = ThreadPool::instance();
  const size_t count = plan.waves.size();
  for (size_t k = 0; k <= count; ++k) {
    const Wave* prev = k > 0 ? &plan.waves[k - 1] : nullptr;
    const Wave* cur = k < count ? &plan.waves[k] : nullptr;
    const int64_t prev_blocks = prev ? prev->b1 - prev->b0 : 0;
    const int64_t cur_blocks = cur ? cur->b1 - cur->b0 : 0;
    const int slots = block_slots(std::max(prev_blocks, cur_blocks), threads);
    if (prev && cur) {
      job->wave = prev;
      job->next = cur;
      job->phase = Phase::kApplyThenReduce;
    } else if (cur) {
      job->wave = cur;
      job->phase = Phase::kReduce;
    } else {
      job->wave = prev;
      job->phase = Phase::kApply;
    }
    pool.run(threads, slots, task, job);
    if (cur) {
      job->wave = cur;
      job->phase = Phase::kMerge;
      pool.run(threads, threads, task, job);
    }
  }
}

// The pool job of a local plan: slots of whole groups, each reduced, merged and applied.
template <class Job>
void run_groups(const Plan& plan, int threads, Job* job, void (*task)(void*, int, int)) {
  job->phase = Phase::kGroups;
  ThreadPool::instance().run(threads, block_slots(plan.groups(), threads), task, job);
}

// Slot t of n of a local plan's job: each of its groups reduced block by block, its channels
// merged, then applied block by block.
template <class Reduce, class Merge, class Apply>
void run_group_slot(const Plan& p, int t, int n, bool stream, const Reduce& reduce,
                    const Merge& merge, const Apply& apply) {
  int64_t begin, end;
  split_range(0, p.groups(), t, n, &begin, &end);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t b0 = p.group_first_block[g], b1 = p.group_first_block[g + 1];
    for (int64_t k = b0; k < b1; ++k) reduce(k);
    merge(p.group_first_channel[g], p.group_first_channel[g + 1]);
    for (int64_t k = b0; k < b1; ++k) apply(k);
  }
  if (stream) hwy::FlushStream();
}

// E: the tensors' element type (float, bfloat16, float16); the plans, parameters and partials
// are those of the fp32 kernels, whatever E is, so the bits are too (ops-inl.h: load_e).
template <class E>
struct TrainJob {
  const Plan* plan;
  const detail::TrainCallOf<E>* call;
  double* pivot;
  double* mean;
  double* var;
  double* invstd;
  double* partials;
  float *mhi, *mlo, *a, *b;
  bool stream;
  const Wave* wave;
  const Wave* next;  // kApplyThenReduce: the wave reduced while `wave` is applied
  Phase phase;
};

// Mean, variance, running statistics, saved statistics and apply parameters of channels
// [begin, end) from the stats partials.
template <class E>
void train_merge(const TrainJob<E>& job, int64_t begin, int64_t end) {
  if (end == begin) return;
  const Plan& p = *job.plan;
  const detail::TrainCallOf<E>& call = *job.call;
  merge_stats(p, call.x, job.partials, begin, end, job.pivot, job.mean, job.var);
  detail::Geometry part = call.g;
  part.c = end - begin;
  finalize(part, job.mean + begin, job.var + begin, call.eps, call.factor, job.invstd + begin,
           call.running_mean ? call.running_mean + begin : nullptr,
           call.running_var ? call.running_var + begin : nullptr);
  for (int64_t c = begin; c < end; ++c) {
    if (call.save_mean) call.save_mean[c] = static_cast<float>(job.mean[c]);
    if (call.save_invstd) call.save_invstd[c] = static_cast<float>(job.invstd[c]);
    set_apply_params(job.mean[c], job.invstd[c], call.weight ? call.weight[c] : 1.0,
                     call.bias ? call.bias[c] : 0.0, c, job.mhi, job.mlo, job.a, job.b);
  }
}

template <class E>
void train_task(void* ctx, int t, int n) {
  const TrainJob<E>& job = *static_cast<const TrainJob<E>*>(ctx);
  const Plan& p = *job.plan;
  const detail::TrainCallOf<E>& call = *job.call;
  auto reduce = [&](int64_t k) { stats_block(p, call.x, p.blocks[k], job.pivot, job.partials); };
  const ApplyParamsOf<E> q{job.mhi, job.mlo, job.a, job.b, call.z, call.relu};
  auto apply = [&](int64_t k) { apply_block(p, call.x, p.blocks[k], q, call.y, job.stream); };
  int64_t begin, end;
  if (job.phase == Phase::kGroups) {
    run_group_slot(
        p, t, n, job.stream, reduce, [&](int64_t c0, int64_t c1) { train_merge(job, c0, c1); },
        apply);
    return;
  }
  const Wave& w = *job.wave;
  if (job.phase == Phase::kMerge) {
    split_range(w.c0, w.c1, t, n, &begin, &end);
    train_merge(job, begin, end);
    return;
  }
  split_range(w.b0, w.b1, t, n, &begin, &end);
  if (job.phase == Phase::kReduce) {
    for (int64_t k = begin; k < end; ++k) reduce(k);
    return;
  }
  if (job.phase == Phase::kApplyThenReduce) {
    int64_t r0, r1;
    split_range(job.next->b0, job.next->b1, t, n, &r0, &r1);
    interleave(begin, end, r0, r1, apply, reduce);
  } else {
    for (int64_t k = begin; k < end; ++k) apply(k);
  }
  if (job.stream) hwy::FlushStream();
}

template <class E>
struct BackwardJob {
  const Plan* plan;
  const detail::BackwardCallOf<E>* call;
  double* invstd;
  double* sum0;  // sum dy
  double* sum1;  // sum dy * (x - m)
  double* partials;
  float *m, *alpha, *beta, *gamma;
  bool stream;
  const Wave* wave;
  const Wave* next;  // kApplyThenReduce: the wave reduced while `wave` is applied
  Phase phase;
};

// dweight, dbias and (training) the dx parameters beta, gamma of channels [begin, end) from the
// backward_reduce partials.
template <class E>
void backward_merge(const BackwardJob<E>& job, int64_t begin, int64_t end) {
  const detail::BackwardCallOf<E>& call = *job.call;
  // Eval's single sweep may have written dx over dy, x or y, or dz over dy, already. 16-bit
  // tensors: never in eval, as the staged path (batch_norm.cc), whose fp32 backward runs in
  // place (dx over the copy of dy, or of x with dz over the copy of dy), never re-sums there:
  // the native pass gives its bits whatever the aliasing.
  const bool resum =
      call.training || (std::is_same_v<E, float> && call.dx != call.dy && call.dx != call.x &&
                        call.dx != call.y && call.dz != call.dy);
  merge_backward_sums(*job.plan, call.dy, call.x, call.y, job.m, job.partials, begin, end, resum,
                      job.sum0, job.sum1);
  const double count = static_cast<double>(call.g.count());
  for (int64_t c = begin; c < end; ++c) {
    const double invstd = job.invstd[c];
    const double sum_dy = job.sum0[c];
    const double sum_dy_xhat = job.sum1[c] * invstd;
    if (call.dweight) call.dweight[c] = static_cast<float>(sum_dy_xhat);
    if (call.dbias) call.dbias[c] = static_cast<float>(sum_dy);
    if (!call.training) continue;
    const double wc = call.weight ? call.weight[c] : 1.0;
    job.beta[c] = static_cast<float>(-wc * invstd * invstd * sum_dy_xhat / count);
    job.gamma[c] = static_cast<float>(-wc * invstd * sum_dy / count);
  }
}

// Training: dx depends on the merged sums, so reduce, merge and apply wave by wave (or group by
// group). Eval with dweight or dbias: dx does not, so each block is reduced and written in one
// sweep (kReduceApply: block k's dx overwrites only block k's dy or x, already read), then merged.
template <class E>
void backward_task(void* ctx, int t, int n) {
  const BackwardJob<E>& job = *static_cast<const BackwardJob<E>*>(ctx);
  const Plan& p = *job.plan;
  const detail::BackwardCallOf<E>& call = *job.call;
  const BackwardParamsOf<E> q{job.m, job.alpha, job.beta, job.gamma, call.y, call.dz};
  auto reduce = [&](int64_t k) {
    backward_reduce_block(p, call.dy, call.x, call.y, p.blocks[k], job.m, job.partials);
  };
  auto apply = [&](int64_t k, bool training) {
    backward_apply_block(p, call.dy, call.x, p.blocks[k], q, training, call.dx, job.stream);
  };
  int64_t begin, end;
  if (job.phase == Phase::kGroups) {  // training
    run_group_slot(
        p, t, n, job.stream, reduce, [&](int64_t c0, int64_t c1) { backward_merge(job, c0, c1); },
        [&](int64_t k) { apply(k, true); });
    return;
  }
  const Wave& w = *job.wave;
  if (job.phase == Phase::kMerge) {
    split_range(w.c0, w.c1, t, n, &begin, &end);
    backward_merge(job, begin, end);
    return;
  }
  split_range(w.b0, w.b1, t, n, &begin, &end);
  if (job.phase == Phase::kApplyThenReduce) {
    int64_t r0, r1;
    split_range(job.next->b0, job.next->b1, t, n, &r0, &r1);
    interleave(
        begin, end, r0, r1, [&](int64_t k) { apply(k, true); }, reduce);
  } else if (job.phase != Phase::kApply) {
    for (int64_t k = begin; k < end; ++k) {
      reduce(k);
      if (job.phase == Phase::kReduceApply) apply(k, false);
    }
  } else {
    for (int64_t k = begin; k < end; ++k) apply(k, call.training);
  }
  if (job.stream) hwy::FlushStream();
}

template <class E>
void forward_train_impl(const detail::TrainCallOf<E>& call) {
  const detail::Geometry& g = call.g;
  const std::shared_ptr<const Plan> plan = get_plan(g, 1, true);
  Workspace& ws = thread_workspace();
  double* channel = ws.channel_data(4 * g.c);
  float* params = ws.param_data(4 * g.c);
  TrainJob<E> job{plan.get(),
               &call,
               channel,
               channel + g.c,
               channel + 2 * g.c,
               channel + 3 * g.c,
               ws.partial_data(plan->partial_doubles),
               params,
               params + g.c,
               params + 2 * g.c,
               params + 3 * g.c,
               g.numel() * 4 >= kStreamMinBytes,
               nullptr,
               nullptr,
               Phase::kReduce};
  // Pivots before anything is written: y may be x.
  for (int64_t c = 0; c < g.c; ++c) job.pivot[c] = channel_pivot(*plan, call.x, c);
  if (plan->local) {
    run_groups(*plan, call_threads(*plan), &job, &train_task<E>);
  } else {
    run_waves(*plan, call_threads(*plan), &job, &train_task<E>);
  }
}

template <class E>
void forward_eval_impl(const detail::EvalCallOf<E>& call) {
  const detail::Geometry& g = call.g;
  float* params = thread_workspace().param_data(4 * g.c);
  float *mhi = params, *mlo = params + g.c, *a = params + 2 * g.c, *b = params + 3 * g.c;
  // The running mean is an fp32 value, so mlo is +0 unless it is infinite or NaN.
  bool mlo_zero = true;
  for (int64_t c = 0; c < g.c; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(call.running_var[c]) + call.eps);
    set_apply_params(call.running_mean[c], invstd, call.weight ? call.weight[c] : 1.0,
                     call.bias ? call.bias[c] : 0.0, c, mhi, mlo, a, b);
    mlo_zero = mlo_zero && std::bit_cast<uint32_t>(mlo[c]) == 0;
  }
  apply_with_params(g, call.x, ApplyParamsOf<E>{mhi, mlo, a, b, call.z, call.relu, mlo_zero},
                    call.y);
}

template <class E>
void backward_impl(const detail::BackwardCallOf<E>& call) {
  const detail::Geometry& g = call.g;
  Workspace& ws = thread_workspace();
  double* channel = ws.channel_data(3 * g.c);
  float* params = ws.param_data(4 * g.c);
  BackwardJob<E> job{nullptr,
                  &call,
                  channel,
                  channel + g.c,
                  channel + 2 * g.c,
                  nullptr,
                  params,
                  params + g.c,
                  params + 2 * g.c,
                  params + 3 * g.c,
                  g.numel() * 4 >= kStreamMinBytes,
                  nullptr,
                  nullptr,
                  Phase::kReduce};
  for (int64_t c = 0; c < g.c; ++c) {
    const double invstd =
        call.training ? static_cast<double>(call.save_invstd[c])
                      : 1.0 / std::sqrt(static_cast<double>(call.running_var[c]) + call.eps);
    job.invstd[c] = invstd;
    job.m[c] = call.training ? call.save_mean[c] : call.running_mean[c];
    job.alpha[c] = static_cast<float>((call.weight ? call.weight[c] : 1.0) * invstd);
    job.beta[c] = 0;
    job.gamma[c] = 0;
  }
  const BackwardParamsOf<E> q{job.m, job.alpha, job.beta, job.gamma, call.y, call.dz};
  if (!call.training && call.dweight == nullptr && call.dbias == nullptr) {
    backward_apply_with_params(g, call.dy, call.x, q, false, call.dx);
    return;
  }
  const std::shared_ptr<const Plan> plan = get_plan(g, 2, true);
  job.plan = plan.get();
  job.partials = ws.partial_data(plan->partial_doubles);
  const int threads = call_threads(*plan);
  ThreadPool& pool = ThreadPool::instance();
  if (!call.training) {
    // One wave of everything: the sweep reads each element once.
    const Wave all{0, static_cast<int64_t>(plan->blocks.size()), 0, g.c};
    job.wave = &all;
    job.phase = Phase::kReduceApply;
    pool.run(threads, block_slots(all.b1, threads), &backward_task<E>, &job);
    job.phase = Phase::kMerge;
    pool.run(threads, threads, &backward_task<E>, &job);
    return;
  }
  if (plan->local) {
    run_groups(*plan, threads, &job, &backward_task<E>);
  } else {
    run_waves(*plan, threads, &job, &backward_task<E>);
  }
}

}  // namespace

void forward_train_pass(const detail::TrainCall& call) { forward_train_impl(call); }
void forward_eval_pass(const detail::EvalCall& call) { forward_eval_impl(call); }
void backward_pass(const detail::BackwardCall& call) { backward_impl(call); }
void forward_train_bf16_pass(const detail::TrainCallOf<bfloat16>& call) {
  forward_train_impl(call);
}
void forward_eval_bf16_pass(const detail::EvalCallOf<bfloat16>& call) { forward_eval_impl(call); }
void backward_bf16_pass(const detail::BackwardCallOf<bfloat16>& call) { backward_impl(call); }
void forward_train_f16_pass(const detail::TrainCallOf<float16>& call) { forward_train_impl(call); }
void forward_eval_f16_pass(const detail::EvalCallOf<float16>& call) { forward_eval_impl(call); }
void backward_f16_pass(const detail::BackwardCallOf<float16>& call) { backward_impl(call); }

// The staged calls' conversions (util/staging.cc): widening is exact, narrowing rounds to
// nearest even as store_e does, so every element's result is the same whatever the chunks.
struct ConvertJob {
  DType dtype;
  bool widen;
  const void* in;
  void* out;
  int64_t n;
  int64_t chunk;
};

template <class E>
void convert_range(const ConvertJob& j, int64_t k0, int64_t k1) {
  const hn::ScalableTag<float> df;
  const auto nf = static_cast<int64_t>(hn::Lanes(df));
  int64_t k = k0;
  if (j.widen) {
    const E* in = static_cast<const E*>(j.in);
    float* out = static_cast<float*>(j.out);
    for (; k + nf <= k1; k += nf) hn::StoreU(load_e(df, in + k), df, out + k);
    for (; k < k1; ++k) out[k] = to_float(in[k]);
  } else {
    const float* in = static_cast<const float*>(j.in);
    E* out = static_cast<E*>(j.out);
    for (; k + nf <= k1; k += nf) store_e(df, hn::LoadU(df, in + k), out + k);
    for (; k < k1; ++k) {
      if constexpr (std::is_same_v<E, bfloat16>) {
        out[k] = to_bfloat16(in[k]);
      } else {
        out[k] = to_float16(in[k]);
      }
    }
  }
}

void convert_task(void* ctx, int slot, int /*slots*/) {
  const ConvertJob& j = *static_cast<const ConvertJob*>(ctx);
  const int64_t k0 = slot * j.chunk;
  const int64_t k1 = std::min(j.n, k0 + j.chunk);
  if (k0 >= k1) return;
  if (j.dtype == DType::kBFloat16) {
    convert_range<bfloat16>(j, k0, k1);
  } else {
    convert_range<float16>(j, k0, k1);
  }
}

void convert_pass(DType dtype, bool widen, const void* in, void* out, int64_t n) {
  constexpr int64_t kMinChunk = int64_t{1} << 16;  // elements; smaller tensors: one thread
  const int threads = n < 2 * kMinChunk ? 1 : bnorm::num_threads();
  const int64_t slots = std::clamp<int64_t>(n / kMinChunk, 1, threads <= 1 ? 1 : 8 * threads);
  const int64_t chunk = ((n + slots - 1) / slots + 63) / 64 * 64;
  ConvertJob job{dtype, widen, in, out, n, chunk};
  ThreadPool::instance().run(threads, static_cast<int>(slots), &convert_task, &job);
}

}  // namespace bnorm::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace bnorm::cpu {

HWY_EXPORT(forward_train_pass);
HWY_EXPORT(forward_eval_pass);
HWY_EXPORT(backward_pass);
HWY_EXPORT(forward_train_bf16_pass);
HWY_EXPORT(forward_eval_bf16_pass);
HWY_EXPORT(backward_bf16_pass);
HWY_EXPORT(forward_train_f16_pass);
HWY_EXPORT(forward_eval_f16_pass);
HWY_EXPORT(backward_f16_pass);
HWY_EXPORT(convert_pass);

void forward_train(const detail::TrainCall& call) {
  HWY_DYNAMIC_DISPATCH(forward_train_pass)(call);
}
void forward_eval(const detail::EvalCall& call) { HWY_DYNAMIC_DISPATCH(forward_eval_pass)(call); }
void backward(const detail::BackwardCall& call) { HWY_DYNAMIC_DISPATCH(backward_pass)(call); }

void forward_train_bf16(const detail::TrainCallOf<bfloat16>& call) {
  HWY_DYNAMIC_DISPATCH(forward_train_bf16_pass)(call);
}
void forward_eval_bf16(const detail::EvalCallOf<bfloat16>& call) {
  HWY_DYNAMIC_DISPATCH(forward_eval_bf16_pass)(call);
}
void backward_bf16(const detail::BackwardCallOf<bfloat16>& call) {
  HWY_DYNAMIC_DISPATCH(backward_bf16_pass)(call);
}
void forward_train_f16(const detail::TrainCallOf<float16>& call) {
  HWY_DYNAMIC_DISPATCH(forward_train_f16_pass)(call);
}
void forward_eval_f16(const detail::EvalCallOf<float16>& call) {
  HWY_DYNAMIC_DISPATCH(forward_eval_f16_pass)(call);
}
void backward_f16(const detail::BackwardCallOf<float16>& call) {
  HWY_DYNAMIC_DISPATCH(backward_f16_pass)(call);
}

void widen_to_fp32(DType dtype, const void* in, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(convert_pass)(dtype, true, in, out, n);
}
void narrow_from_fp32(DType dtype, const float* in, void* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(convert_pass)(dtype, false, in, out, n);
}

}  // namespace bnorm::cpu
#endif  // HWY_ONCE
