#include "progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace bnorm::tools {

std::string format_duration(double seconds) {
  char buf[32];
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  if (seconds < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  } else {
    const long s = std::lround(seconds);
    if (s < 3600)
      std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
    else
      std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  }
  return buf;
}

Progress::Progress(std::string label, int64_t total, std::FILE* out)
    : label_(std::move(label)),
      total_(std::max<int64_t>(total, 1)),
      out_(out),
      terminal_(isatty(fileno(out)) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_),
      next_plain_step_(std::max<int64_t>(total_ / 10, 1)) {}

double Progress::seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::update(int64_t step, double loss, double accuracy) {
  last_step_ = step;
  if (terminal_) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_draw_ < std::chrono::milliseconds(100)) return;
    last_draw_ = now;
    draw(step, loss, accuracy, false);
  } else if (step >= next_plain_step_ && step < total_) {
    // Every ~10 %; the last step is left to finish(), which prints the total time.
    next_plain_step_ += std::max<int64_t>(total_ / 10, 1);
    draw(step, loss, accuracy, false);
  }
}

void Progress::finish(double loss, double accuracy) { draw(last_step_, loss, accuracy, true); }

void Progress::draw(int64_t step, double loss, double accuracy, bool final_line) {
  const double elapsed = seconds();
  const double rate = elapsed > 0 ? static_cast<double>(step) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total_ - step) / rate : NAN;
  const double fraction = std::clamp(static_cast<double>(step) / static_cast<double>(total_), 0.0, 1.0);
  char acc[32];
  if (std::isnan(accuracy))
    std::snprintf(acc, sizeof acc, "   -  ");
  else
    std::snprintf(acc, sizeof acc, "%5.2f%%", 100 * accuracy);
  if (terminal_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(fraction * kWidth);
    std::string bar(filled, '#');
    bar.resize(kWidth, '.');
    std::fprintf(out_, "\r%-10s [%s] %7lld/%lld  loss %.4f  test acc %s  %6.0f steps/s  %s %s\033[K",
                 label_.c_str(), bar.c_str(), static_cast<long long>(step),
                 static_cast<long long>(total_), loss, acc, rate, final_line ? "took" : "ETA",
                 format_duration(final_line ? elapsed : eta).c_str());
    if (final_line) std::fputc('\n', out_);
  } else {
    std::fprintf(out_, "%s: step %lld/%lld (%3.0f%%)  loss %.4f  test acc %s  %.0f steps/s  %s %s\n",
                 label_.c_str(), static_cast<long long>(step), static_cast<long long>(total_),
                 100 * fraction, loss, acc, rate, final_line ? "took" : "ETA",
                 format_duration(final_line ? elapsed : eta).c_str());
  }
  std::fflush(out_);
}

}  // namespace bnorm::tools
