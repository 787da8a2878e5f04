// The OpenCV I/O module of edgead_stream (libedgead_opencv_io.so, loaded with dlopen only when needed):
// cameras, GStreamer pipelines and image folders through OpenCV's videoio/imgcodecs, and image writing
// (--save-ng). Kept out of the program itself because Debian's videoio and imgcodecs pull in ~240 shared
// libraries (FFmpeg, GStreamer, GDAL, ...) that cost ~60 MB of resident memory in every process that links them;
// a stream from a video file or RTSP (FFmpeg directly, ffmpeg_source.cpp) never loads them.
#include <algorithm>
#include <cstring>
#include <filesystem>

#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/videoio.hpp>

#include "edgead/edgead.hpp"
#include "sources.hpp"

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
    return read_reconnecting(
        name, reconnect_ && live, max_retries_, [&] { return cap_.read(frame) && !frame.empty(); },
        [&] {
          cap_.release();
          open();
        });
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
}  // namespace edgead

namespace {
void set_error(char* error, size_t size, const std::string& what) {
  if (error && size) {
    std::strncpy(error, what.c_str(), size - 1);
    error[size - 1] = '\0';
  }
}
}  // namespace

extern "C" {

// kind: camera | video | rtsp | gstreamer | images (target already checked by open_source). nullptr + error on failure.
edgead::Source* edgead_io_open_source(const char* kind, const char* target, char* error, size_t error_size) {
  try {
    const std::string k(kind), t(target);
    if (k == "images") return new edgead::FolderSource(t);
    return new edgead::CaptureSource(t, k, k == "rtsp" || k == "gstreamer");
  } catch (const std::exception& e) {
    set_error(error, error_size, e.what());
    return nullptr;
  }
}

// cv::imwrite; 1 on success.
int edgead_io_imwrite(const char* path, const cv::Mat* image) {
  try {
    return cv::imwrite(path, *image) ? 1 : 0;
  } catch (const std::exception&) {
    return 0;
  }
}

}  // extern "C"
