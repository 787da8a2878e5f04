// edgead_stream's FFmpeg reader gives the same frames, byte for byte, as cv::VideoCapture (OpenCV's FFmpeg
// backend): the stream's scores cannot depend on which of the two decoded the video.
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <opencv2/imgproc.hpp>
#include <opencv2/videoio.hpp>

#include "sources.hpp"

namespace fs = std::filesystem;

namespace {

// n frames of moving shapes and noise (so the codec has real work), written with the given codec.
fs::path write_video(const std::string& name, const std::string& fourcc, cv::Size size, int n) {
  const fs::path path = fs::temp_directory_path() / ("edgead_src_" + std::to_string(::getpid()) + "_" + name);
  cv::VideoWriter w(path.string(), cv::VideoWriter::fourcc(fourcc[0], fourcc[1], fourcc[2], fourcc[3]), 25, size);
  if (!w.isOpened()) return {};
  cv::RNG rng(7);
  for (int i = 0; i < n; ++i) {
    cv::Mat f(size, CV_8UC3);
    rng.fill(f, cv::RNG::UNIFORM, 0, 40);
    cv::circle(f, {(i * 37) % size.width, size.height / 2}, size.height / 5, {30.0 + i, 200, 255 - 3.0 * i}, -1);
    cv::rectangle(f, {5, 5 + i}, {size.width / 3, size.height / 3 + i}, {250, 90, 20}, 3);
    w.write(f);
  }
  return path;
}

// Puts the stripes back together, checking they arrive top to bottom and cover the frame exactly once.
class Assembler final : public edgead::StripeSink {
 public:
  bool begin(int height, int width) override {
    frame.create(height, width, CV_8UC3);
    frame.setTo(cv::Scalar::all(7));
    filled = 0;
    ++stripes;
    return true;
  }
  void rows(const cv::Mat& stripe) override {
    ASSERT_EQ(stripe.cols, frame.cols);
    ASSERT_LE(filled + stripe.rows, frame.rows);
    stripe.copyTo(frame.rowRange(filled, filled + stripe.rows));
    filled += stripe.rows;
  }
  cv::Mat frame;
  int filled = 0, stripes = 0;
};

void expect_same_frames(const fs::path& video, int n) {
  cv::VideoCapture cap(video.string());
  ASSERT_TRUE(cap.isOpened());
  auto src = edgead::open_ffmpeg_source("video", video.string());
  auto striped_src = edgead::open_ffmpeg_source("video", video.string());  // converts in stripes
  Assembler sink;
  cv::Mat a, b, unused;
  int count = 0;
  while (cap.read(a)) {
    ASSERT_TRUE(src->read(b)) << "FFmpeg reader ended early at frame " << count;
    ASSERT_EQ(a.size(), b.size());
    ASSERT_EQ(a.type(), b.type());
    EXPECT_EQ(cv::norm(a, b, cv::NORM_INF), 0.0) << "frame " << count << " differs";
    bool striped = false;
    ASSERT_TRUE(striped_src->read_striped(unused, sink, striped)) << "striped reader ended early at frame " << count;
    ASSERT_TRUE(striped) << "the FFmpeg reader did not convert in stripes";
    ASSERT_EQ(sink.filled, a.rows) << "stripes of frame " << count << " do not cover it";
    EXPECT_EQ(cv::norm(a, sink.frame, cv::NORM_INF), 0.0) << "frame " << count << " differs when converted in stripes";
    ++count;
  }
  EXPECT_FALSE(src->read(b)) << "FFmpeg reader has more frames than cv::VideoCapture";
  EXPECT_EQ(count, n);
  EXPECT_TRUE(unused.empty());
  fs::remove(video);
}

}  // namespace

TEST(FfmpegReader, SameFramesAsVideoCaptureMjpg1080p) {
  const fs::path v = write_video("a.avi", "MJPG", {1920, 1080}, 6);
  ASSERT_FALSE(v.empty()) << "OpenCV cannot write MJPG";
  expect_same_frames(v, 6);
}

TEST(FfmpegReader, SameFramesAsVideoCaptureMjpgOddSize) {
  const fs::path v = write_video("d.avi", "MJPG", {333, 211}, 4);
  ASSERT_FALSE(v.empty()) << "OpenCV cannot write MJPG";
  expect_same_frames(v, 4);
}

TEST(FfmpegReader, SameFramesAsVideoCaptureMpeg4OddSize) {
  const fs::path v = write_video("b.avi", "FMP4", {322, 242}, 12);  // inter frames: the decoder holds references
  if (v.empty()) GTEST_SKIP() << "this OpenCV cannot write MPEG-4 Part 2 (FMP4)";
  expect_same_frames(v, 12);
}

TEST(FfmpegReader, RefusesMissingAndNonVideoFiles) {
  EXPECT_THROW(edgead::open_ffmpeg_source("video", "/nonexistent/x.avi"), edgead::SourceError);
  const fs::path junk = fs::temp_directory_path() / ("edgead_src_junk_" + std::to_string(::getpid()) + ".avi");
  { std::FILE* f = std::fopen(junk.c_str(), "w"); std::fputs("not a video at all", f); std::fclose(f); }
  try {
    edgead::open_ffmpeg_source("video", junk.string());
    ADD_FAILURE() << "a text file opened as a video";
  } catch (const edgead::SourceError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot open video"), std::string::npos) << e.what();
  }
  fs::remove(junk);
}

TEST(FfmpegReader, ReusesItsFrameBufferUnlessShared) {
  const fs::path v = write_video("c.avi", "MJPG", {64, 48}, 3);
  ASSERT_FALSE(v.empty());
  auto src = edgead::open_ffmpeg_source("video", v.string());
  cv::Mat f;
  ASSERT_TRUE(src->read(f));
  const uchar* first = f.data;
  ASSERT_TRUE(src->read(f));
  EXPECT_EQ(f.data, first);  // decoded into the same memory
  cv::Mat held = f;          // someone keeps this frame (the stream's --save-ng buffer)
  const cv::Mat copy = held.clone();
  ASSERT_TRUE(src->read(f));
  EXPECT_NE(f.data, held.data);
  EXPECT_EQ(cv::norm(held, copy, cv::NORM_INF), 0.0);  // the held frame was not overwritten
  fs::remove(v);
}
