// Source selection for edgead_stream, and the loader of its OpenCV I/O module (opencv_io.cpp).
#include "sources.hpp"

#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace fs = std::filesystem;

namespace edgead {
namespace {

#ifndef EDGEAD_IO_MODULE_INSTALLED
#define EDGEAD_IO_MODULE_INSTALLED "../lib/edgead/libedgead_opencv_io.so"
#endif
constexpr const char* kModule = "libedgead_opencv_io.so";

using OpenFn = Source* (*)(const char*, const char*, char*, size_t);
using WriteFn = int (*)(const char*, const cv::Mat*);

struct IoModule {
  OpenFn open = nullptr;
  WriteFn write = nullptr;
};

// Loaded once per process and never unloaded (sources it made point into it).
const IoModule& io_module() {
  static IoModule m;
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> tried;
    if (const char* env = std::getenv("EDGEAD_IO_MODULE")) tried.push_back(env);
    std::error_code ec;
    const fs::path exe_dir = fs::read_symlink("/proc/self/exe", ec).parent_path();
    if (!ec) {
      tried.push_back((exe_dir / kModule).string());                     // build tree
      tried.push_back((exe_dir / EDGEAD_IO_MODULE_INSTALLED).string());  // cmake --install layout
    }
    for (const auto& path : tried) {
      if (!fs::exists(path)) continue;
      void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) {
        error = std::string(kModule) + " at " + path + " does not load (" + dlerror() + "); rebuild with `make native`";
        return;
      }
      m.open = reinterpret_cast<OpenFn>(dlsym(h, "edgead_io_open_source"));
      m.write = reinterpret_cast<WriteFn>(dlsym(h, "edgead_io_imwrite"));
      if (!m.open || !m.write) error = path + " is not edgead's OpenCV I/O module; rebuild with `make native`";
      return;
    }
    std::string where;
    for (const auto& p : tried) where += (where.empty() ? "" : ", ") + p;
    error = std::string(kModule) + " (OpenCV cameras, GStreamer, image folders, --save-ng) not found (looked at " + where +
            "); rebuild with `make native` or reinstall with `cmake --install`";
  });
  if (!error.empty()) throw SourceError(error);
  return m;
}

}  // namespace

std::unique_ptr<Source> open_source(const std::string& kind, const std::string& target, const std::string& reader) {
  if (reader != "ffmpeg" && reader != "opencv") throw SourceError("--reader " + reader + ": choose ffmpeg or opencv");
  if (kind == "camera") {
    if (target.empty() || target.find_first_not_of("0123456789") != std::string::npos)
      throw SourceError("--camera " + target + ": give a camera index (0 = first camera)");
  } else if (kind == "video") {
    if (!fs::is_regular_file(target)) throw SourceError("video file " + target + " not found");
  } else if (kind == "images") {
    if (!fs::is_directory(target)) throw SourceError("image folder " + target + " not found");
  } else if (kind != "rtsp" && kind != "gstreamer") {
    throw SourceError("unknown source kind " + kind);
  }
  if ((kind == "video" || kind == "rtsp") && reader == "ffmpeg") return open_ffmpeg_source(kind, target);
  char error[512] = {0};
  Source* s = io_module().open(kind.c_str(), target.c_str(), error, sizeof error);
  if (!s) throw SourceError(error);
  return std::unique_ptr<Source>(s);
}

bool write_image(const std::string& path, const cv::Mat& image) {
  return io_module().write(path.c_str(), &image) == 1;
}

}  // namespace edgead
