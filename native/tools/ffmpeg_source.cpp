// Video files and RTSP through FFmpeg's libraries directly (libavformat, libavcodec, libswscale): the same
// calls OpenCV's FFmpeg capture backend makes (demux, decode, sws_scale to BGR24 with SWS_BICUBIC at the
// frame's own size), so the frames are the same bytes, without linking OpenCV's videoio/imgcodecs and the
// ~240 shared libraries they pull in (GDAL, GStreamer, ...): ~35 MB less resident memory in edgead_stream.
#include <algorithm>
#include <chrono>
#include <string>

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/imgutils.h>
#include <libavutil/pixdesc.h>
#include <libswscale/swscale.h>
}

#include "sources.hpp"

namespace edgead {
namespace {

using Clock = std::chrono::steady_clock;

std::string av_error(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof buf);
  return buf;
}

class FfmpegSource final : public Source {
 public:
  FfmpegSource(std::string target, std::string kind, bool reconnect, int max_retries = 5)
      : target_(std::move(target)), kind_(std::move(kind)), reconnect_(reconnect), max_retries_(max_retries) {
    live = kind_ == "rtsp";
    name = kind_ + ":" + target_;
    open();
  }
  ~FfmpegSource() override { release(); }

  bool read(cv::Mat& frame) override {
    bool striped = false;
    return read_any(frame, nullptr, striped);
  }

  bool read_striped(cv::Mat& frame, StripeSink& sink, bool& striped) override { return read_any(frame, &sink, striped); }

  void close() override { release(); }

 private:
  bool read_any(cv::Mat& frame, StripeSink* sink, bool& striped) {
    striped = false;
    return read_reconnecting(
        name, reconnect_ && live, max_retries_, [&] { return fmt_ && next(frame, sink, striped); },
        [&] {
          release();
          open();
        });
  }

  // FFmpeg calls this while it blocks in network I/O: give up after the deadline (OpenCV: 30 s open, 30 s read)
  static int interrupt(void* self) {
    auto* s = static_cast<FfmpegSource*>(self);
    return Clock::now() > s->deadline_ ? 1 : 0;
  }

  void fail_open(const std::string& why) {
    release();
    const std::string hint = kind_ == "rtsp" ? "check the URL, credentials and network"
                                             : "check the path and that FFmpeg can decode the codec";
    const std::string shown = "'" + target_ + "'";
    throw SourceError("cannot open " + kind_ + " " + shown + ": " + hint + " (" + why + ")");
  }

  void open() {
    av_log_set_level(AV_LOG_ERROR);
    fmt_ = avformat_alloc_context();
    fmt_->interrupt_callback.callback = &FfmpegSource::interrupt;
    fmt_->interrupt_callback.opaque = this;
    deadline_ = Clock::now() + std::chrono::seconds(30);
    AVDictionary* opts = nullptr;
    if (kind_ == "rtsp") av_dict_set(&opts, "rtsp_transport", "tcp", 0);  // OpenCV's default too
    int rc = avformat_open_input(&fmt_, target_.c_str(), nullptr, &opts);
    av_dict_free(&opts);
    if (rc < 0) {
      fmt_ = nullptr;  // freed by avformat_open_input on failure
      fail_open(av_error(rc));
    }
    if ((rc = avformat_find_stream_info(fmt_, nullptr)) < 0) fail_open(av_error(rc));
    const AVCodec* codec = nullptr;
    stream_ = av_find_best_stream(fmt_, AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
    if (stream_ < 0 || !codec) fail_open("no decodable video stream");
    dec_ = avcodec_alloc_context3(codec);
    if (!dec_ || avcodec_parameters_to_context(dec_, fmt_->streams[stream_]->codecpar) < 0) fail_open("decoder setup");
    // one decoding thread: the cores belong to the model; decoding overlaps inference on its own thread
    dec_->thread_count = 1;
    if ((rc = avcodec_open2(dec_, codec, nullptr)) < 0) fail_open(av_error(rc));
    pkt_ = av_packet_alloc();
    yuv_ = av_frame_alloc();
    eof_ = false;
  }

  void release() {
    if (sws_) sws_freeContext(sws_);
    sws_ = nullptr;
    av_frame_free(&yuv_);
    av_frame_free(&bgr_);
    av_frame_free(&stripe_);
    av_packet_free(&pkt_);
    avcodec_free_context(&dec_);
    if (fmt_) avformat_close_input(&fmt_);
    fmt_ = nullptr;
  }

  // Next decoded frame as BGR24 into `frame` (reusing its memory when it is this size and not shared), or in
  // stripes into `sink` when it takes them.
  bool next(cv::Mat& frame, StripeSink* sink, bool& striped) {
    while (true) {
      int rc = avcodec_receive_frame(dec_, yuv_);
      if (rc == 0) {
        striped = sink && stripeable() && sink->begin(yuv_->height, yuv_->width);
        if (striped) convert_stripes(*sink);
        else convert(frame);
        av_frame_unref(yuv_);
        return true;
      }
      if (rc == AVERROR_EOF) return false;
      if (rc != AVERROR(EAGAIN)) throw SourceError(name + ": decoding failed (" + av_error(rc) + ")");
      if (eof_) return false;
      deadline_ = Clock::now() + std::chrono::seconds(30);
      rc = av_read_frame(fmt_, pkt_);
      if (rc < 0) {  // end of file, or a lost stream: drain what the decoder still holds
        eof_ = true;
        avcodec_send_packet(dec_, nullptr);
        continue;
      }
      if (pkt_->stream_index == stream_) {
        rc = avcodec_send_packet(dec_, pkt_);
        if (rc < 0 && rc != AVERROR(EAGAIN)) {
          av_packet_unref(pkt_);
          throw SourceError(name + ": decoding failed (" + av_error(rc) + ")");
        }
      }
      av_packet_unref(pkt_);
    }
  }

  // As OpenCV's FFmpeg backend: convert the whole coded picture (coded_width x coded_height: swscale picks its
  // conversion path from the size and the destination's alignment, and a different path gives different
  // colours at chroma edges) into a 32-byte-aligned picture, then crop to the visible size.
  void convert(cv::Mat& frame) {
    const int w = yuv_->width, h = yuv_->height;
    const int cw = std::max(dec_->coded_width, w), ch = std::max(dec_->coded_height, h);
    sws_ = sws_getCachedContext(sws_, cw, ch, static_cast<AVPixelFormat>(yuv_->format), cw, ch, AV_PIX_FMT_BGR24,
                                SWS_BICUBIC, nullptr, nullptr, nullptr);
    if (!sws_) throw SourceError(name + ": cannot convert pixel format " + std::to_string(yuv_->format) + " to BGR");
    if (frame.u && frame.u->refcount > 1) frame = cv::Mat();  // someone else still holds that one
    frame.create(h, w, CV_8UC3);
    if (cw == w && ch == h && (w * 3) % 32 == 0 && frame.isContinuous()) {  // the same picture: convert in place
      uint8_t* dst[4] = {frame.data, nullptr, nullptr, nullptr};
      int stride[4] = {w * 3, 0, 0, 0};
      sws_scale(sws_, yuv_->data, yuv_->linesize, 0, ch, dst, stride);
      return;
    }
    if (!bgr_ || bgr_->width != cw || bgr_->height != ch) {
      av_frame_free(&bgr_);
      bgr_ = av_frame_alloc();
      bgr_->format = AV_PIX_FMT_BGR24;
      bgr_->width = cw;
      bgr_->height = ch;
      if (!bgr_ || av_frame_get_buffer(bgr_, 32) != 0) throw SourceError(name + ": out of memory for a " +
                                                                          std::to_string(cw) + "x" + std::to_string(ch) + " frame");
    }
    sws_scale(sws_, yuv_->data, yuv_->linesize, 0, ch, bgr_->data, bgr_->linesize);
    cv::Mat(h, w, CV_8UC3, bgr_->data[0], static_cast<size_t>(bgr_->linesize[0])).copyTo(frame);
  }

  // convert() in stripes of kStripeRows rows: swscale takes the source picture slice by slice, top to bottom
  // (its documented slice interface), and writes each output row at its row index from the destination pointer.
  // Pointing that destination kStripeRows * k rows before a small buffer puts rows [done, done + n) into the buffer,
  // in the same layout (stride, alignment) as the whole coded picture would have, so swscale takes the same
  // conversion path and gives the same bytes (ctest compares them with cv::VideoCapture's whole frames). A
  // vertically filtering path may return a few rows later than it received them: the buffer has room for that.
  // Planar or packed pictures whose planes all advance by rows (no palette, no hardware frames).
  bool stripeable() const {
    const AVPixFmtDescriptor* d = av_pix_fmt_desc_get(static_cast<AVPixelFormat>(yuv_->format));
    return d && !(d->flags & (AV_PIX_FMT_FLAG_PAL | AV_PIX_FMT_FLAG_HWACCEL | AV_PIX_FMT_FLAG_BITSTREAM)) &&
           d->log2_chroma_h <= 2;
  }

  void convert_stripes(StripeSink& sink) {
    constexpr int kStripeRows = 16;  // even: 4:2:0 slices must start on even rows
    constexpr int kSlack = 64;       // rows a vertical filter can hold back and release with a later slice
    const int w = yuv_->width, h = yuv_->height;
    const int cw = std::max(dec_->coded_width, w), ch = std::max(dec_->coded_height, h);
    sws_ = sws_getCachedContext(sws_, cw, ch, static_cast<AVPixelFormat>(yuv_->format), cw, ch, AV_PIX_FMT_BGR24,
                                SWS_BICUBIC, nullptr, nullptr, nullptr);
    if (!sws_) throw SourceError(name + ": cannot convert pixel format " + std::to_string(yuv_->format) + " to BGR");
    if (!stripe_ || stripe_->width != cw) {
      av_frame_free(&stripe_);
      stripe_ = av_frame_alloc();
      if (!stripe_) throw SourceError(name + ": out of memory for a frame stripe");
      stripe_->format = AV_PIX_FMT_BGR24;
      stripe_->width = cw;  // same line size and alignment as the whole picture convert() would use
      stripe_->height = kStripeRows + kSlack;
      if (av_frame_get_buffer(stripe_, 32) != 0) throw SourceError(name + ": out of memory for a frame stripe");
    }
    const int stride = stripe_->linesize[0];
    if (cw == w && ch == h && (w * 3) % 32 == 0 && stride != w * 3)
      throw SourceError(name + ": unexpected stripe layout");  // convert() would convert in place with stride w * 3
    const AVPixFmtDescriptor* desc = av_pix_fmt_desc_get(static_cast<AVPixelFormat>(yuv_->format));
    int done = 0;  // output rows received so far
    for (int y = 0; y < ch; y += kStripeRows) {
      const int n_in = std::min(kStripeRows, ch - y);
      const uint8_t* src[4] = {nullptr, nullptr, nullptr, nullptr};  // the slice's first row in every plane
      for (int p = 0; p < 4 && yuv_->data[p]; ++p) {
        const int rows = (p == 1 || p == 2) ? (y >> desc->log2_chroma_h) : y;
        src[p] = yuv_->data[p] + static_cast<ptrdiff_t>(rows) * yuv_->linesize[p];
      }
      uint8_t* dst[4] = {stripe_->data[0] - static_cast<ptrdiff_t>(done) * stride, nullptr, nullptr, nullptr};
      const int dst_stride[4] = {stride, 0, 0, 0};
      const int got = sws_scale(sws_, src, yuv_->linesize, y, n_in, dst, dst_stride);
      if (got < 0 || got > stripe_->height) throw SourceError(name + ": converting a stripe failed");
      const int visible = std::max(0, std::min(got, h - done));
      if (visible > 0) sink.rows(cv::Mat(visible, w, CV_8UC3, stripe_->data[0], static_cast<size_t>(stride)));
      done += got;
    }
    if (done < h) throw SourceError(name + ": converting in stripes gave " + std::to_string(done) + " of " + std::to_string(h) + " rows");
  }

  std::string target_, kind_;
  bool reconnect_;
  int max_retries_;
  AVFormatContext* fmt_ = nullptr;
  AVCodecContext* dec_ = nullptr;
  AVPacket* pkt_ = nullptr;
  AVFrame* yuv_ = nullptr;
  AVFrame* bgr_ = nullptr;  // the coded-size picture, when it cannot be converted in place
  AVFrame* stripe_ = nullptr;  // a few converted rows (convert_stripes)
  SwsContext* sws_ = nullptr;
  int stream_ = -1;
  bool eof_ = false;
  Clock::time_point deadline_;
};

}  // namespace

std::unique_ptr<Source> open_ffmpeg_source(const std::string& kind, const std::string& target) {
  return std::make_unique<FfmpegSource>(target, kind, kind == "rtsp");
}

}  // namespace edgead
