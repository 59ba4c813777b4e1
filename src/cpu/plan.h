// How the CPU kernels cut a problem into blocks, and the per-shape plan cache.
//
// Determinism rests on this file: the blocks depend on the shape only, never on the thread count.
// Each block's partial sums are stored in its own slot and merged per channel in block order, so
// every thread count gives the same bits; threads only choose which blocks they compute.
//
//   channels-first: groups of G = kBlockElems / S channels (at least 1), so that a block reads
//       runs of G*S ~ kBlockElems contiguous floats per batch item (short rows scattered at a
//       stride of C*S floats would defeat the prefetchers and the TLB); a block is such runs
//       for several batch items, or, for S > kBlockElems, a piece of one row.
//   channels-last (and channels-first with S = 1, the same bytes): one group of all channels; a
//       block is a range of rows r = i*S + j, each row C contiguous floats.
//
//   channels-first, local (`Plan::local`; asked for by the passes that reduce): when one
//       channel of one array (n * S floats) is at most kLocalMaxChannelBytes, groups of
//       G = max(1, kLocalGroupBytes / (4 n S)) channels instead, so that a group's whole data
//       stays in the core's L2 cache, with blocks of G*S floats per item for several items as
//       above. The training passes run a group's reduce, merge and apply in turn on one thread
//       (passes.cc): the second read of the inputs comes from L2, with no pool job between. The
//       blocks, hence the order of the sums, differ from the wide groups', so the stats and
//       backward_reduce passes ask for the same plan (sync batch norm composes them and must
//       give the bits of forward_train and backward); the apply-only passes keep the wide groups
//       (their bits do not depend on the blocks, and longer runs stream faster). Two-array plans
//       (backward) are local only for S >= kLocalMinS2: at 7x7 the backward's reduce, walking G
//       channels of 8 items, 16 short streams, ran 0.93-0.96x of the wide groups (1.27x at
//       14x14). Measured at batch 32 (docs/benchmarks.md): 1.1-1.27x on 14x14 and 28x28, 1.15x
//       on the 7x7 forward, 1.08-1.13x on 56x56 (one channel of 392 KiB a group); 256 KiB
//       groups beat 128 and 512.
//
// Waves: consecutive groups whose data fits in the cache budget. A forward (or backward) runs
// stats, merge and apply wave by wave, so the second read of x (and dy) comes from cache.
// Channels-last has a single group, hence a single wave. Waves only order the work: the result
// is the same for any wave split.
#ifndef BNORM_SRC_CPU_PLAN_H_
#define BNORM_SRC_CPU_PLAN_H_

#include <algorithm>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"

namespace bnorm::cpu {

inline constexpr int64_t kBlockElems = 16384;             // channels-first block size (64 KiB)
inline constexpr int64_t kBlockElemsLast = 32768;         // channels-last block size (128 KiB)
inline constexpr int64_t kMinRowsLast = 32;               // channels-last rows per block, at least
inline constexpr int64_t kWaveBytes = int64_t{6} << 20;  // data per wave; two are in flight
inline constexpr int64_t kParallelMinElems = int64_t{1} << 17;  // below: one thread
inline constexpr int64_t kStreamMinBytes = int64_t{16} << 20;   // output larger: streaming stores
inline constexpr int64_t kLocalGroupBytes = int64_t{256} << 10;  // one array of a local group
inline constexpr int64_t kLocalMaxChannelBytes = int64_t{512} << 10;  // a channel alone, at most
inline constexpr int64_t kLocalMinS2 = 64;  // local plans of two arrays (backward): S at least

// A product set of elements: channels [c0, c1) x (channels-first) batch [i0, i1) x spatial
// [j0, j1), or (channels-last) rows [i0, i1) with j0 = 0, j1 = 1.
struct Block {
  int64_t c0, c1, i0, i1, j0, j1;
  int64_t slot;  // first of the block's 2 * (c1 - c0) partial sums
  int64_t count() const { return (i1 - i0) * (j1 - j0); }  // elements per channel
};

struct Wave {
  int64_t b0, b1;  // blocks
  int64_t c0, c1;  // channels (whole groups)
};

struct Plan {
  bool channels_last = false;  // also channels-first with S = 1
  bool local = false;          // channels-first groups sized for L2, run group by group
  int64_t n = 0, c = 0, s = 0;
  int64_t rows = 0;                        // channels-last: n * s
  int64_t group_channels = 0;              // channels of a group, at most
  std::vector<Block> blocks;               // group-major; a group's blocks are consecutive
  std::vector<int64_t> group_first_block;  // per group, and one past the end
  std::vector<int64_t> group_first_channel;  // per group, and one past the end (c)
  std::vector<Wave> waves;
  int64_t partial_doubles = 0;
  int max_threads = 1;  // threads worth waking for this shape
  int64_t groups() const { return static_cast<int64_t>(group_first_block.size()) - 1; }
  // The group of channel c.
  int64_t group_of(int64_t c) const {
    return std::upper_bound(group_first_channel.begin(), group_first_channel.end(), c) -
           group_first_channel.begin() - 1;
  }
};

// The plan of a shape; `arrays` is the number of inputs read twice (1 forward, 2 backward);
// `local`: L2-sized groups where the shape allows (every pass that reduces asks for them).
// Built on first use and cached (64 plans, under a mutex); no allocation when cached.
std::shared_ptr<const Plan> get_plan(const detail::Geometry& g, int arrays, bool local = false);

// [begin, end) of part t of n of the range [b0, b1), contiguous and balanced.
inline void split_range(int64_t b0, int64_t b1, int t, int n, int64_t* begin, int64_t* end) {
  const int64_t len = b1 - b0;
  *begin = b0 + len * t / n;
  *end = b0 + len * (t + 1) / n;
}

// Grow-only scratch of the calling thread: after the first call for a shape, nothing allocates.
struct Workspace {
  std::vector<double> partials;
  std::vector<double> channel;  // per-channel fp64 vectors
  std::vector<float> params;    // per-channel fp32 vectors for the apply kernels
  double* partial_data(int64_t count);
  double* channel_data(int64_t count);
  float* param_data(int64_t count);
};
Workspace& thread_workspace();

// Threads for a call: bnorm::num_threads(), at most what the plan can use.
int call_threads(const Plan& plan);

// Pool slots for a sweep over `blocks` blocks: several per thread, so that a descheduled thread
// holds up little (threads claim slots dynamically; the blocks, not the slots, fix the result).
inline int block_slots(int64_t blocks, int threads) {
  if (threads <= 1) return 1;
  return static_cast<int>(blocks < 8 * threads ? blocks : 8 * threads);
}

}  // namespace bnorm::cpu

#endif  // BNORM_SRC_CPU_PLAN_H_
