// The nn pool's life cycle: a pool whose worker threads have not started yet when it is replaced
// or destroyed must still shut down (a worker that began waiting for "the next generation after
// the one it first saw" would wait forever, and the destructor's join with it).
#include <gtest/gtest.h>

#include <chrono>
#include <future>
#include <thread>

#include "bnorm/nn/layers.h"

namespace {

TEST(NnPool, PoolsReplacedBeforeTheirWorkersStartShutDown) {
  // Each set_num_threads with a new count builds a pool and destroys the previous one at once,
  // usually before its worker has run. Run it on a thread of its own so that a hang fails the
  // test instead of blocking it.
  std::promise<void> finished;
  std::future<void> done = finished.get_future();
  std::thread([&finished] {
    for (int i = 0; i < 2000; ++i) bnorm::nn::set_num_threads(i % 2 == 0 ? 2 : 3);
    bnorm::nn::set_num_threads(0);
    finished.set_value();
  }).detach();
  ASSERT_EQ(done.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "replacing nn pools hung: a worker missed the stop of its pool";
}

}  // namespace
