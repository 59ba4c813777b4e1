// The small-batch study (`bnorm train --small-batch-study`, issue 15 part 7): the BN network
// trained at each batch size with plain batch norm, ghost batch norm (G = batch / 2), batch
// renorm (the default schedule) and plain batch norm followed by precise statistics, every run
// seeing the same number of training examples; per run the test accuracy in eval mode (running
// statistics) and in train mode (batch statistics of test batches of the training batch size).
#include <algorithm>

#include "train_internal.h"

namespace bnorm::tools {

Status run_small_batch_study(const TrainConfig& config, const io::Dataset& train,
                             const io::Dataset& test, std::vector<RunResult>* runs,
                             std::vector<StudyRow>* rows) {
  struct Method {
    const char* name;
    bool ghost, renorm, precise;
  };
  const Method methods[] = {{"BN", false, false, true},
                            {"ghost BN", true, false, false},
                            {"batch renorm", false, true, false}};
  for (int64_t b : config.study_batch_sizes) {
    const int64_t steps = std::max<int64_t>(1, config.study_examples / b);
    for (const Method& m : methods) {
      TrainConfig c = config;
      c.batch_size = b;
      c.steps = steps;
      c.epochs = static_cast<double>(steps * b) / static_cast<double>(kTrainExamples);
      c.eval_every = 0;
      c.warmup_steps = std::min(config.warmup_steps, steps - 1);
      c.ghost_batch = m.ghost ? b / 2 : 0;
      c.batch_renorm = m.renorm;
      c.renorm_warmup = -1;
      c.renorm_ramp = -1;
      c.freeze_bn_stats_after = -1;
      c.freeze_bn_affine_after = -1;
      // The same sample budget for every batch size.
      c.precise_bn = m.precise ? (kStudyPreciseSamples + b - 1) / b : 0;
      std::string name = "batch " + std::to_string(b) + ", " + m.name;
      if (m.ghost) name += " (G = " + std::to_string(c.ghost_batch) + ")";
      RunSpec spec{.name = name, .batch_norm = true, .lr = config.lr, .steps = steps,
                   .eval_every = 0, .trace_sigmoid = false, .train_mode_gap = true,
                   .checkpoint = ""};
      RunResult r;
      BNORM_RETURN_IF_ERROR(run_one(c, spec, train, test, nullptr, &r));
      StudyRow row{.batch_size = b, .method = m.name, .run = name, .steps = r.steps_done,
                   .ghost_batch = c.ghost_batch, .precise_batches = 0,
                   .test_accuracy = r.final_test.accuracy,
                   .test_accuracy_train_mode = r.final_test_train_mode.accuracy,
                   .wall_time_s = r.wall_time_s};
      if (m.precise) {
        // The same network before (plain BN's row) and after its statistics were recomputed;
        // train mode does not read the running statistics, so both rows share it.
        row.test_accuracy = r.test_before_precise.accuracy;
        StudyRow precise = row;
        precise.method = "BN + precise statistics";
        precise.precise_batches = r.precise_batches;
        precise.test_accuracy = r.final_test.accuracy;
        rows->push_back(row);
        rows->push_back(precise);
      } else {
        rows->push_back(row);
      }
      runs->push_back(std::move(r));
    }
  }
  return Status();
}

}  // namespace bnorm::tools
