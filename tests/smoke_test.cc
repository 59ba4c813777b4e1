#include <vector>

#include <gtest/gtest.h>

#include "bnorm/batch_norm.h"

TEST(Smoke, TrainForward) {
  std::vector<float> x = {1, 2, 3, 4}, y(4), mean(2), invstd(2);
  bnorm::ForwardTrainArgs a;
  a.x = bnorm::ConstTensorView(x.data(), {2, 2});
  a.y = bnorm::TensorView(y.data(), {2, 2});
  a.save_mean = mean;
  a.save_invstd = invstd;
  ASSERT_TRUE(bnorm::ForwardTrain(a).ok());
  EXPECT_FLOAT_EQ(mean[0], 2.0f);
  EXPECT_FLOAT_EQ(mean[1], 3.0f);
}
