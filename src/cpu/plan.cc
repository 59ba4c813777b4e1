#include "cpu/plan.h"

#include <algorithm>
#include <mutex>

#include "bnorm/batch_norm.h"

namespace bnorm::cpu {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::shared_ptr<Plan> build_plan(const detail::Geometry& g, int arrays, bool local) {
  auto p = std::make_shared<Plan>();
  p->n = g.n;
  p->c = g.c;
  p->s = g.s;
  p->channels_last = g.layout == Layout::kChannelsLast || g.s == 1;
  int64_t slot = 0;
  auto add_block = [&](int64_t c0, int64_t c1, int64_t i0, int64_t i1, int64_t j0, int64_t j1) {
    p->blocks.push_back(Block{c0, c1, i0, i1, j0, j1, slot});
    slot += 2 * (c1 - c0);
  };
  if (p->channels_last) {
    p->rows = g.n * g.s;
    p->group_channels = g.c;
    const int64_t rows_per_block = std::max(kMinRowsLast, ceil_div(kBlockElemsLast, g.c));
    p->group_first_block.push_back(0);
    p->group_first_channel = {0, g.c};
    for (int64_t r = 0; r < p->rows; r += rows_per_block)
      add_block(0, g.c, r, std::min(p->rows, r + rows_per_block), 0, 1);
    p->group_first_block.push_back(static_cast<int64_t>(p->blocks.size()));
  } else {
    const int64_t channel_bytes = g.n * g.s * 4;
    p->local =
        local && channel_bytes <= kLocalMaxChannelBytes && (arrays == 1 || g.s >= kLocalMinS2);
    const int64_t group = std::clamp<int64_t>(
        p->local ? kLocalGroupBytes / channel_bytes : kBlockElems / g.s, 1, g.c);
    p->group_channels = group;
    for (int64_t c0 = 0; c0 < g.c; c0 += group) {
      const int64_t c1 = std::min(g.c, c0 + group);
      p->group_first_block.push_back(static_cast<int64_t>(p->blocks.size()));
      p->group_first_channel.push_back(c0);
      const int64_t run = (c1 - c0) * g.s;  // floats per batch item
      if (run > kBlockElems) {              // pieces of one row (group == 1 here)
        const int64_t pieces = ceil_div(g.s, kBlockElems);
        const int64_t piece = ceil_div(g.s, pieces);
        for (int64_t i = 0; i < g.n; ++i)
          for (int64_t j = 0; j < g.s; j += piece)
            add_block(c0, c1, i, i + 1, j, std::min(g.s, j + piece));
      } else {
        const int64_t rows_per_block = std::max<int64_t>(1, kBlockElems / run);
        for (int64_t i = 0; i < g.n; i += rows_per_block)
          add_block(c0, c1, i, std::min(g.n, i + rows_per_block), 0, g.s);
      }
    }
    p->group_first_block.push_back(static_cast<int64_t>(p->blocks.size()));
    p->group_first_channel.push_back(g.c);
  }
  p->partial_doubles = slot;

  // Waves of whole groups within the cache budget (at least one group each).
  const int64_t groups = p->groups();
  const int64_t group_bytes = p->group_channels * g.n * g.s * 4 * arrays;
  const int64_t groups_per_wave =
      std::max<int64_t>(1, kWaveBytes / std::max<int64_t>(1, group_bytes));
  for (int64_t k = 0; k < groups; k += groups_per_wave) {
    const int64_t k1 = std::min(groups, k + groups_per_wave);
    p->waves.push_back(Wave{p->group_first_block[k], p->group_first_block[k1],
                            p->group_first_channel[k], p->group_first_channel[k1]});
  }

  int64_t min_wave_blocks = INT64_MAX;
  for (const Wave& w : p->waves) min_wave_blocks = std::min(min_wave_blocks, w.b1 - w.b0);
  const int64_t by_size = g.numel() * arrays / kParallelMinElems;
  // A local plan's training passes hand out whole groups; its other passes, blocks.
  const int64_t units = p->local ? groups : min_wave_blocks;
  p->max_threads = static_cast<int>(std::clamp<int64_t>(std::min(by_size, units), 1, 1024));
  return p;
}

struct PlanKey {
  int64_t n, c, s;
  Layout layout;
  int arrays;
  bool local;
  bool operator==(const PlanKey&) const = default;
};

// A shape takes up to four plans (forward and backward, local and wide), and a ResNet-50 has
// a dozen batch-norm shapes or more; a linear scan of 64 keys costs far less than a plan.
constexpr int kCacheSize = 64;

struct PlanCache {
  std::mutex mutex;
  PlanKey keys[kCacheSize] = {};
  std::shared_ptr<const Plan> plans[kCacheSize];
  int next = 0;
};

}  // namespace

std::shared_ptr<const Plan> get_plan(const detail::Geometry& g, int arrays, bool local) {
  static PlanCache cache;
  const PlanKey key{g.n, g.c, g.s, g.layout, arrays, local};
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    for (int k = 0; k < kCacheSize; ++k)
      if (cache.plans[k] && cache.keys[k] == key) return cache.plans[k];
  }
  std::shared_ptr<const Plan> plan = build_plan(g, arrays, local);
  std::lock_guard<std::mutex> lock(cache.mutex);
  cache.keys[cache.next] = key;
  cache.plans[cache.next] = plan;
  cache.next = (cache.next + 1) % kCacheSize;
  return plan;
}

double* Workspace::partial_data(int64_t count) {
  if (partials.size() < static_cast<size_t>(count)) partials.resize(static_cast<size_t>(count));
  return partials.data();
}
double* Workspace::channel_data(int64_t count) {
  if (channel.size() < static_cast<size_t>(count)) channel.resize(static_cast<size_t>(count));
  return channel.data();
}
float* Workspace::param_data(int64_t count) {
  if (params.size() < static_cast<size_t>(count)) params.resize(static_cast<size_t>(count));
  return params.data();
}

Workspace& thread_workspace() {
  thread_local Workspace workspace;
  return workspace;
}

int call_threads(const Plan& plan) { return std::min(bnorm::num_threads(), plan.max_threads); }

}  // namespace bnorm::cpu
