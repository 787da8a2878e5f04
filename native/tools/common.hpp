// Small helpers shared by edgead_stream and edgead_bench (header-only).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace edgead {
namespace tools {

// numpy.percentile's default (linear interpolation between closest ranks).
inline double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = (v.size() - 1) * q / 100.0;
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

// Python's round(x, digits) for reporting (last digit may differ on exact ties; never used for decisions).
inline double round_to(double x, int digits) {
  const double f = std::pow(10.0, digits);
  return std::nearbyint(x * f) / f;
}

inline double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

inline std::string iso_now() {
  char buf[64];
  const std::time_t t = std::time(nullptr);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S%z", std::localtime(&t));
  return buf;
}

// Write to a temporary name in the same folder, then rename: never half-written (as runtime.artifact.atomic_write_text).
inline bool atomic_write_text(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return false;
    f << text;
    f.flush();
    if (!f) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

// log line on stderr in the Python runtime's format: "2026-11-30 10:00:00,123 INFO message"
inline void log_line(const char* level, const std::string& msg) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t t = std::chrono::system_clock::to_time_t(now);
  const int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S", std::localtime(&t));
  std::fprintf(stderr, "%s,%03d %s %s\n", buf, ms, level, msg.c_str());
}

}  // namespace tools
}  // namespace edgead
