#include "sources.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>

#include "edgead/edgead.hpp"

namespace fs = std::filesystem;

namespace edgead {
namespace {

class CaptureSource final : public Source {
 public:
  CaptureSource(std::string target, std::string kind, bool reconnect, int max_retries = 5)
      : target_(std::move(target)), kind_(std::move(kind)), reconnect_(reconnect), max_retries_(max_retries) {
    live = kind_ == "camera" || kind_ == "rtsp" || kind_ == "gstreamer";
    name = kind_ + ":" + target_;
    open();
  }

  bool read(cv::Mat& frame) override {
    int retries = 0;
    while (true) {
      if (cap_.read(frame) && !frame.empty()) return true;
      if (!(reconnect_ && live)) return false;  // end of file, or a dead camera: stop cleanly
      if (++retries > max_retries_)
        throw SourceError(name + ": stream lost and " + std::to_string(max_retries_) + " reconnects failed; giving up");
      const double delay = std::min(30.0, 0.5 * std::pow(2.0, retries));
      std::fprintf(stderr, "WARNING %s: stream lost, reconnecting in %.1fs (try %d/%d)\n", name.c_str(), delay, retries,
                   max_retries_);
      std::this_thread::sleep_for(std::chrono::duration<double>(delay));
      cap_.release();
      try {
        open();
      } catch (const SourceError& e) {
        std::fprintf(stderr, "WARNING %s\n", e.what());
      }
    }
  }

  void close() override { cap_.release(); }

 private:
  void open() {
    // OpenCV prints its own multi-line warnings for a camera that does not open; we print one line instead
    const auto level = cv::utils::logging::getLogLevel();
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_SILENT);
    if (kind_ == "camera") cap_.open(std::stoi(target_));
    else if (kind_ == "gstreamer") cap_.open(target_, cv::CAP_GSTREAMER);
    else cap_.open(target_);
    cv::utils::logging::setLogLevel(level);
    if (!cap_.isOpened()) {
      std::string hint;
      if (kind_ == "camera") hint = "check the index (try 0, 1), that no other program holds it, and permissions on /dev/video*";
      else if (kind_ == "video") hint = "check the path and that OpenCV can decode the codec";
      else if (kind_ == "rtsp") hint = "check the URL, credentials and network";
      else hint = "check the pipeline and that OpenCV was built with GStreamer";
      const std::string shown = kind_ == "camera" ? target_ : "'" + target_ + "'";
      throw SourceError("cannot open " + kind_ + " " + shown + ": " + hint);
    }
  }

  std::string target_, kind_;
  bool reconnect_;
  int max_retries_;
  cv::VideoCapture cap_;
};

class FolderSource final : public Source {
 public:
  explicit FolderSource(const std::string& folder) {
    if (!fs::is_directory(folder)) throw SourceError("image folder " + folder + " not found");
    for (const auto& e : fs::directory_iterator(folder)) {
      std::string ext = e.path().extension().string();
      std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      if (ext == ".png" || ext == ".jpg" || ext == ".jpeg" || ext == ".bmp" || ext == ".tif" || ext == ".tiff")
        files_.push_back(e.path().string());
    }
    if (files_.empty())
      throw SourceError("image folder " + folder + " holds no images (.png, .jpg, .jpeg, .bmp, .tif, .tiff)");
    std::sort(files_.begin(), files_.end());
    name = "folder:" + folder;
  }

  bool read(cv::Mat& frame) override {
    if (next_ >= files_.size()) return false;
    const std::string& p = files_[next_++];
    cv::Mat img = cv::imread(p, cv::IMREAD_UNCHANGED);
    if (img.empty()) throw SourceError(p + ": not a readable image (corrupt or unsupported format); remove or replace it");
    frame = as_bgr(img);
    return true;
  }

 private:
  std::vector<std::string> files_;
  size_t next_ = 0;
};

}  // namespace

std::unique_ptr<Source> open_source(const std::string& kind, const std::string& target) {
  if (kind == "camera") {
    if (target.empty() || target.find_first_not_of("0123456789") != std::string::npos)
      throw SourceError("--camera " + target + ": give a camera index (0 = first camera)");
    return std::make_unique<CaptureSource>(target, "camera", false);
  }
  if (kind == "video") {
    if (!fs::is_regular_file(target)) throw SourceError("video file " + target + " not found");
    return std::make_unique<CaptureSource>(target, "video", false);
  }
  if (kind == "rtsp") return std::make_unique<CaptureSource>(target, "rtsp", true);
  if (kind == "gstreamer") return std::make_unique<CaptureSource>(target, "gstreamer", true);
  if (kind == "images") return std::make_unique<FolderSource>(target);
  throw SourceError("unknown source kind " + kind);
}

}  // namespace edgead
