// Frame sources for edgead_stream: camera, video file, RTSP, GStreamer, image folder (as runtime/sources.py).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <opencv2/core.hpp>

namespace edgead {

// A source that cannot be opened or read; the message says what to check.
class SourceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Takes a decoded frame as stripes of BGR rows instead of one whole frame (edgead_stream feeds them to an
// edgead::StripeFitter): a whole 1080p BGR frame is 6.2 MB, a stripe of 16 rows 92 KB.
class StripeSink {
 public:
  virtual ~StripeSink() = default;
  // A frame of this size has been decoded: true to take it in stripes, false to get it whole.
  virtual bool begin(int height, int width) = 0;
  // Its next rows, top to bottom: CV_8UC3 (BGR), `width` wide.
  virtual void rows(const cv::Mat& stripe) = 0;
};

class Source {
 public:
  virtual ~Source() = default;
  // Next frame (BGR uint8) into `frame`, reusing its memory when it can; false at the end of the stream.
  virtual bool read(cv::Mat& frame) = 0;
  // Next frame, as stripes into `sink` where this source can convert in stripes and sink.begin() accepts
  // (`striped` true, `frame` untouched), else whole into `frame` as read() does. The same pixels either way.
  virtual bool read_striped(cv::Mat& frame, StripeSink& sink, bool& striped) {
    (void)sink;
    striped = false;
    return read(frame);
  }
  virtual void close() {}
  bool live = false;  // frames arrive on their own clock (camera, RTSP): drop stale ones
  std::string name = "source";
};

// One frame from a source that may drop: `attempt()` reads it (true: got one). When it fails and the source
// may reconnect (a live stream), wait with back-off (1, 2, 4, ... s, at most 30 s), `reopen()` and try again;
// after `max_retries` failed tries throw SourceError. A file that ends (or `reconnect` false) returns false.
// Header-only: the FFmpeg reader (in the program) and the OpenCV I/O module (a dlopen'ed library) share it.
template <class Attempt, class Reopen>
bool read_reconnecting(const std::string& name, bool reconnect, int max_retries, Attempt attempt, Reopen reopen) {
  int retries = 0;
  while (true) {
    if (attempt()) return true;
    if (!reconnect) return false;  // end of file, or a dead camera: stop cleanly
    if (++retries > max_retries)
      throw SourceError(name + ": stream lost and " + std::to_string(max_retries) + " reconnects failed; giving up");
    const double delay = std::min(30.0, 0.5 * std::pow(2.0, retries));
    std::fprintf(stderr, "WARNING %s: stream lost, reconnecting in %.1fs (try %d/%d)\n", name.c_str(), delay, retries,
                 max_retries);
    std::this_thread::sleep_for(std::chrono::duration<double>(delay));
    try {
      reopen();
    } catch (const SourceError& e) {
      std::fprintf(stderr, "WARNING %s\n", e.what());
    }
  }
}

// kind: camera | video | rtsp | gstreamer | images. reader: for video and rtsp, "ffmpeg" (FFmpeg's libraries
// directly, the default) or "opencv" (cv::VideoCapture, through the OpenCV I/O module); other kinds always
// go through the OpenCV I/O module.
std::unique_ptr<Source> open_source(const std::string& kind, const std::string& target, const std::string& reader = "ffmpeg");

// cv::imwrite through the OpenCV I/O module (loaded on first use); false when it cannot write.
bool write_image(const std::string& path, const cv::Mat& image);

// ffmpeg_source.cpp: video file or RTSP through libavformat/libavcodec/libswscale.
std::unique_ptr<Source> open_ffmpeg_source(const std::string& kind, const std::string& target);

}  // namespace edgead
