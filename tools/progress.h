// Progress of a long run: a one-line bar redrawn in place on a terminal, plain periodic lines
// otherwise (logs, CI), so that a redirected run stays readable.
#ifndef BNORM_TOOLS_PROGRESS_H_
#define BNORM_TOOLS_PROGRESS_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace bnorm::tools {

class Progress {
 public:
  // label: what runs ("with BN"); total: steps to do; out: the stream to draw on.
  Progress(std::string label, int64_t total, std::FILE* out = stderr);

  // Reports that `step` steps are done, with the latest figures. Draws at most ~10 times a
  // second on a terminal, every ~10 % of the run otherwise.
  void update(int64_t step, double loss, double accuracy);

  // The final line: steps, wall time, steps/s.
  void finish(double loss, double accuracy);

  double seconds() const;

 private:
  void draw(int64_t step, double loss, double accuracy, bool final_line);

  std::string label_;
  int64_t total_;
  std::FILE* out_;
  bool terminal_;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  int64_t next_plain_step_;
  int64_t last_step_ = 0;
};

// "1m05s", "12.3s"
std::string format_duration(double seconds);

}  // namespace bnorm::tools

#endif  // BNORM_TOOLS_PROGRESS_H_
