// edgead_stream: score a camera / video / RTSP / GStreamer / image-folder stream frame by frame,
// one JSON line per frame with the fields of `python -m runtime.stream --jsonl`, a summary at the end
// or on Ctrl-C / SIGTERM. Exit codes as the Python CLI: 0 ok, 1 the stream stopped on an error,
// 2 bad arguments / model / source (one line on stderr saying what to do).
#include <atomic>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <nlohmann/json.hpp>
#include <opencv2/imgproc.hpp>

#include "common.hpp"
#include "edgead/edgead.hpp"
#include "sources.hpp"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
using namespace edgead;
using namespace edgead::tools;

namespace {

volatile std::sig_atomic_t g_signal = 0;  // the only process-wide state: which signal asked us to stop
extern "C" void on_signal(int sig) { g_signal = sig; }

const char* kUsage =
    "usage: edgead_stream (--camera N | --video FILE | --rtsp URL | --gstreamer PIPELINE | --images DIR) --model MODEL\n"
    "                     [--backend auto|onnxruntime|tensorrt] [--threads N] [--batch N] [--workers N]\n"
    "                     [--policy latest|block]\n"
    "                     [--max-frames N] [--jsonl PATH|-] [--save-ng DIR] [--save-maps DIR] [--summary PATH] [-q]\n"
    "                     [--reader ffmpeg|opencv]\n"
    "\n"
    "Score a live stream frame by frame: image score, anomaly map, OK/NG (the native twin of python -m runtime.stream).\n"
    "  --camera N        camera index (0 = first camera)\n"
    "  --video FILE      video file (every frame is scored)\n"
    "  --rtsp URL        RTSP URL (reconnects with back-off)\n"
    "  --gstreamer P     GStreamer pipeline ending in appsink (Jetson CSI cameras)\n"
    "  --images DIR      folder of images (sorted by name)\n"
    "  --model MODEL     model.onnx / model.engine (sidecar MODEL.json next to it)\n"
    "  --backend B       auto (from the suffix), onnxruntime or tensorrt\n"
    "  --class NAME      multi-class model: decide by this product class's threshold (default: the global one)\n"
    "  --threads N       ONNX Runtime intra-op threads (default: EDGEAD_THREADS or all cores)\n"
    "  --batch N         micro-batch size (default 1)\n"
    "  --workers N       batches scored at once, each by its own model call (default 1); results stay in\n"
    "                    capture order. With N > 1 and no --threads, each call gets cores/N ONNX Runtime threads\n"
    "  --policy P        latest: drop stale frames (live default); block: score all (file default)\n"
    "  --max-frames N    stop after this many captured frames\n"
    "  --jsonl PATH      write per-frame JSON lines here instead of stdout ('-' = stdout)\n"
    "  --save-ng DIR     save NG frames with their heat-map overlay\n"
    "  --save-maps DIR   save every anomaly map as float32 .npy (map_<frame_id>.npy)\n"
    "  --summary PATH    write the end-of-run summary JSON here\n"
    "  -q, --quiet       no per-frame JSON on stdout\n"
    "  --reader R        --video/--rtsp decoding: ffmpeg (FFmpeg's libraries directly, default, leaner) or\n"
    "                    opencv (cv::VideoCapture); cameras, GStreamer and folders always use OpenCV\n";

struct Args {
  std::string kind, target, model, backend = "auto", policy, jsonl, save_ng, save_maps, summary, reader = "ffmpeg";
  std::string class_name;  // multi-class model: decide by this product class's threshold
  int threads = 0, batch = 1, workers = 1;
  long max_frames = -1;
  bool quiet = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  auto need = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw std::invalid_argument(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  auto as_int = [](const std::string& flag, const std::string& v) {
    try {
      size_t n = 0;
      const long x = std::stol(v, &n);
      if (n != v.size()) throw std::invalid_argument(v);
      return x;
    } catch (const std::exception&) {
      throw std::invalid_argument(flag + " " + v + ": give a whole number");
    }
  };
  int sources = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string f = argv[i];
    if (f == "-h" || f == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (f == "--camera" || f == "--video" || f == "--rtsp" || f == "--gstreamer" || f == "--images") {
      a.kind = f.substr(2);
      a.target = need(i);
      ++sources;
    } else if (f == "--model") a.model = need(i);
    else if (f == "--backend") a.backend = need(i);
    else if (f == "--class") a.class_name = need(i);
    else if (f == "--threads") a.threads = static_cast<int>(as_int(f, need(i)));
    else if (f == "--batch") a.batch = static_cast<int>(as_int(f, need(i)));
    else if (f == "--workers") a.workers = static_cast<int>(as_int(f, need(i)));
    else if (f == "--policy") a.policy = need(i);
    else if (f == "--max-frames") a.max_frames = as_int(f, need(i));
    else if (f == "--jsonl") a.jsonl = need(i);
    else if (f == "--save-ng") a.save_ng = need(i);
    else if (f == "--save-maps") a.save_maps = need(i);
    else if (f == "--summary") a.summary = need(i);
    else if (f == "-q" || f == "--quiet") a.quiet = true;
    else if (f == "--reader") a.reader = need(i);
    else throw std::invalid_argument("unknown argument " + f + " (see --help)");
  }
  if (sources != 1)
    throw std::invalid_argument("choose exactly one source: --camera N, --video FILE, --rtsp URL, --gstreamer PIPELINE or --images DIR");
  if (a.model.empty()) throw std::invalid_argument("--model is required (model.onnx with its sidecar model.onnx.json)");
  if (!a.policy.empty() && a.policy != "latest" && a.policy != "block")
    throw std::invalid_argument("--policy " + a.policy + ": choose latest or block");
  if (a.batch < 1) throw std::invalid_argument("--batch must be >= 1");
  if (a.workers < 1 || a.workers > 64) throw std::invalid_argument("--workers must be between 1 and 64");
  return a;
}

struct Item {
  long fid;
  double ts;               // wall clock, seconds since the epoch
  Clock::time_point tcap;  // when the frame was captured (decoded), before it was prepared
  cv::Mat prepared;        // the model's input (Model::prepare), made on the capture thread
  cv::Mat frame;           // the camera frame itself, kept only when an overlay will need it (--save-ng)
};

// Bounded frame buffer: "latest" drops the oldest when full, "block" makes the producer wait.
class Buffer {
 public:
  Buffer(size_t capacity, bool latest) : capacity_(capacity), latest_(latest) {}

  bool put(Item item) {
    std::unique_lock<std::mutex> lk(m_);
    while (!latest_ && items_.size() >= capacity_ && !closed_) cv_.wait_for(lk, std::chrono::milliseconds(100));
    if (closed_) return false;
    if (items_.size() >= capacity_) {
      items_.pop_front();
      ++dropped;
    }
    items_.push_back(std::move(item));
    ++captured;
    cv_.notify_all();
    return true;
  }

  // Up to n items; empty on timeout; false once closed and empty.
  bool take(size_t n, std::vector<Item>& out, std::chrono::milliseconds timeout) {
    out.clear();
    std::unique_lock<std::mutex> lk(m_);
    if (items_.empty()) {
      if (closed_) return false;
      cv_.wait_for(lk, timeout);
      if (items_.empty()) return !closed_;
    }
    const size_t k = std::min(n, items_.size());
    for (size_t i = 0; i < k; ++i) {
      out.push_back(std::move(items_.front()));
      items_.pop_front();
    }
    cv_.notify_all();
    return true;
  }

  void close() {
    std::lock_guard<std::mutex> lk(m_);
    closed_ = true;
    cv_.notify_all();
  }

  std::atomic<long> dropped{0}, captured{0};

 private:
  std::mutex m_;
  std::condition_variable cv_;
  std::deque<Item> items_;
  size_t capacity_;
  bool latest_;
  bool closed_ = false;
};

// Everything the capture thread touches, shared so a thread stuck in a dead camera's read() can be left behind.
struct Capture {
  std::unique_ptr<Source> source;
  std::unique_ptr<Buffer> buffer;
  std::atomic<bool> stop{false}, done{false};
  std::mutex m;
  std::condition_variable cv;
  std::string error;
  long max_frames = -1;
  // prepare() is const and thread-safe: fitting overlaps the previous inference. Shared, so that a capture
  // thread left behind in a blocked read() never outlives the model it prepares for.
  std::shared_ptr<const Model> model;
  bool keep_frame = false;       // --save-ng draws on the full frame
};

// Takes frames from the source in stripes and fits them as they come (StripeFitter), when the frame size allows
// it: the whole 1080p BGR frame (6.2 MB) then never exists. Notes when the frame was decoded (its capture time).
class FittingSink final : public StripeSink {
 public:
  explicit FittingSink(const InputSpec& in) : in_(in) {}
  bool begin(int height, int width) override {
    ts = wall_seconds();
    tcap = Clock::now();
    if (!fitter_ || fitter_->frame_height() != height || fitter_->frame_width() != width) {
      fitter_.reset();
      if (!StripeFitter::supports(in_, height, width)) return false;
      fitter_ = std::make_unique<StripeFitter>(in_, height, width);
    }
    return true;
  }
  void rows(const cv::Mat& stripe) override { fitter_->push(stripe); }
  cv::Mat finish() { return fitter_->finish(); }
  double ts = 0;
  Clock::time_point tcap;

 private:
  InputSpec in_;
  std::unique_ptr<StripeFitter> fitter_;
};

void capture_loop(std::shared_ptr<Capture> c) {
  long fid = 0;
  try {
    cv::Mat frame;  // decoded into the same memory frame after frame unless the buffer holds on to it
    FittingSink sink(c->model->input());
    bool striped = false;
    // --save-ng draws on the whole frame: then frames are always read whole
    auto read = [&] { return c->keep_frame ? c->source->read(frame) : c->source->read_striped(frame, sink, striped); };
    while (!c->stop && read()) {
      if (c->stop) break;
      double ts;
      Clock::time_point tcap;
      cv::Mat prepared;
      if (striped) {  // decoded, then converted and fitted stripe by stripe: timed from the end of decoding
        ts = sink.ts;
        tcap = sink.tcap;
        prepared = sink.finish();
      } else {
        ts = wall_seconds();
        tcap = Clock::now();
        prepared = c->model->prepare(frame);
      }
      const bool shares = !striped && prepared.u == frame.u;  // a frame already at the model's size is passed through
      if (!c->buffer->put({fid, ts, tcap, prepared, c->keep_frame ? frame : cv::Mat()})) break;
      if (c->keep_frame || shares) frame = cv::Mat();  // the buffer owns that one; decode the next into fresh memory
      ++fid;
      if (c->max_frames >= 0 && fid >= c->max_frames) break;
    }
  } catch (const std::exception& e) {  // reported by the scoring loop, which owns the summary
    std::lock_guard<std::mutex> lk(c->m);
    c->error = e.what();
  }
  c->buffer->close();
  {
    std::lock_guard<std::mutex> lk(c->m);
    c->done = true;
  }
  c->cv.notify_all();
}

// Heat-map overlay (red = anomalous) with score and OK/NG at the frame's own size (runtime.stream.overlay).
cv::Mat overlay(const cv::Mat& frame, const cv::Mat& map, float score, bool ng, double pixel_thr) {
  cv::Mat m, heat8, heat, out;
  cv::resize(map, m, frame.size(), 0, 0, cv::INTER_LINEAR);
  m.convertTo(heat8, CV_8U, 255.0 / (2 * pixel_thr));  // saturates like np.clip(..., 0, 255)
  cv::applyColorMap(heat8, heat, cv::COLORMAP_JET);
  cv::addWeighted(frame, 0.6, heat, 0.4, 0, out);
  const double scale = std::max(0.5, frame.cols / 800.0);
  char text[64];
  std::snprintf(text, sizeof text, "%s  %.2f", ng ? "NG" : "OK", score);
  cv::putText(out, text, cv::Point(10, static_cast<int>(30 * scale)), cv::FONT_HERSHEY_SIMPLEX, scale,
              ng ? cv::Scalar(0, 0, 255) : cv::Scalar(0, 200, 0), std::max(1, static_cast<int>(2 * scale)), cv::LINE_AA);
  return out;
}

// float32 HxW map -> .npy (format 1.0), readable with numpy.load.
bool write_npy(const std::string& path, const cv::Mat& map) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(map.rows) + ", " +
                       std::to_string(map.cols) + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  const uint16_t hlen = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.write(reinterpret_cast<const char*>(&hlen), 2);
  f << header;
  cv::Mat c = map.isContinuous() ? map : map.clone();
  f.write(reinterpret_cast<const char*>(c.data), static_cast<std::streamsize>(c.total() * sizeof(float)));
  return static_cast<bool>(f);
}

std::string frame_name(const std::string& prefix, long fid, const char* ext) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s_%06ld%s", prefix.c_str(), fid, ext);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
#ifdef __GLIBC__
  // One malloc arena for the whole process instead of one per thread (capture, model workers): each glibc
  // thread arena keeps its own freed memory resident. Measured on the 1080p stream with --workers 2: ~-5 MB
  // peak RSS. GLIBC_TUNABLES (glibc.malloc.arena_max=N) still decides when it is set.
  if (!std::getenv("GLIBC_TUNABLES")) mallopt(M_ARENA_MAX, 1);
#endif
  Args args;
  std::shared_ptr<Capture> cap = std::make_shared<Capture>();
  std::shared_ptr<Model> model;
  try {
    args = parse_args(argc, argv);
    cap->source = open_source(args.kind, args.target, args.reader);
    Options opt;
    opt.backend = args.backend;
    opt.threads = args.threads;
    if (opt.threads == 0 && !std::getenv("EDGEAD_THREADS") && args.workers > 1)  // share the cores between the calls
      opt.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / args.workers);
    model = std::make_shared<Model>(args.model, opt);
    if (!args.class_name.empty()) model->use_class(args.class_name);  // unknown class: one line, exit 2
    if (!args.save_ng.empty()) fs::create_directories(args.save_ng);
    if (!args.save_maps.empty()) fs::create_directories(args.save_maps);
  } catch (const std::exception& e) {  // SourceError, edgead::Error, bad arguments, unwritable folders
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  const auto& in = model->input();
  log_line("INFO", "model " + fs::path(args.model).filename().string() + " on " + model->provider() + " (input " +
                       std::to_string(in.height) + "x" + std::to_string(in.width) + " " + in.color_order + ", batch " +
                       (in.batch > 0 ? std::to_string(in.batch) : std::string("dynamic")) + ")");

  std::FILE* sink = nullptr;
  bool own_sink = false;
  if (!args.jsonl.empty() && args.jsonl != "-") {
    sink = std::fopen(args.jsonl.c_str(), "w");
    if (!sink) {
      std::fprintf(stderr, "error: cannot write --jsonl %s; check the folder exists and is writable\n", args.jsonl.c_str());
      return 2;
    }
    own_sink = true;
  } else if (!args.quiet) {
    sink = stdout;
  }

  const bool latest = args.policy.empty() ? cap->source->live : args.policy == "latest";
  const size_t batch = static_cast<size_t>(args.batch);
  cap->buffer = std::make_unique<Buffer>(latest ? batch : 4 * batch, latest);
  cap->max_frames = args.max_frames;
  cap->model = model;
  cap->keep_frame = !args.save_ng.empty();

  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  json summary;
  long scored = 0, ng_count = 0;
  std::vector<double> lat, model_t;
  std::vector<std::string> ng_saved;
  double busy = 0.0;
  std::string stopped_by = "end of stream", error;
  const double pixel_thr = model->sidecar().threshold_pixel;

  const auto t_start = Clock::now();
  auto last_report = t_start;
  std::thread(capture_loop, cap).detach();  // joined below through cap->done (bounded wait)

  // Scoring: `workers` threads take batches in capture order and run the model (one Model, one set of weights;
  // ONNX Runtime runs them concurrently); this thread writes the results strictly in that order.
  struct Scored {
    std::vector<Item> items;
    std::vector<Result> res;
    double model_s = 0, busy_s = 0;
    std::string error;  // the model call failed: nothing after this batch is reported
  };
  std::mutex take_m, done_m;
  std::condition_variable done_cv;
  std::map<long, Scored> done;  // finished batches waiting for their turn, by sequence number
  long next_seq = 0;            // guarded by take_m
  int running = args.workers;   // guarded by done_m
  std::atomic<bool> stop_workers{false};
  auto work = [&] {
    std::vector<Item> items;
    while (!stop_workers && !g_signal) {
      long seq;
      {
        std::lock_guard<std::mutex> lk(take_m);  // taking and numbering together keeps capture order
        if (!cap->buffer->take(batch, items, std::chrono::milliseconds(100))) break;
        if (items.empty()) continue;
        seq = next_seq++;
      }
      const auto t_busy = Clock::now();
      Scored sc;
      try {
        std::vector<cv::Mat> prepared;
        prepared.reserve(items.size());
        for (const auto& it : items) prepared.push_back(it.prepared);
        const auto t0 = Clock::now();
        sc.res = model->infer(prepared);
        sc.model_s = std::chrono::duration<double>(Clock::now() - t0).count();
      } catch (const std::exception& e) {
        sc.error = e.what();
        stop_workers = true;
      }
      sc.items = std::move(items);
      sc.busy_s = std::chrono::duration<double>(Clock::now() - t_busy).count();
      {
        std::lock_guard<std::mutex> lk(done_m);
        done.emplace(seq, std::move(sc));
      }
      done_cv.notify_all();
    }
    {
      std::lock_guard<std::mutex> lk(done_m);
      --running;
    }
    done_cv.notify_all();
  };
  std::vector<std::thread> workers;
  for (int w = 0; w < args.workers; ++w) workers.emplace_back(work);

  long next_out = 0;
  try {
    while (true) {
      Scored sc;
      {
        std::unique_lock<std::mutex> lk(done_m);
        done_cv.wait_for(lk, std::chrono::milliseconds(100), [&] { return done.count(next_out) > 0 || running == 0; });
        auto found = done.find(next_out);
        if (found == done.end()) {
          if (running == 0) break;
          continue;
        }
        sc = std::move(found->second);
        done.erase(found);
      }
      ++next_out;
      if (!sc.error.empty()) throw std::runtime_error(sc.error);
      const auto t_out = Clock::now();
      const auto& items = sc.items;
      const double per_frame_model = sc.model_s / items.size();
      for (size_t i = 0; i < items.size(); ++i) {
        const Item& it = items[i];
        const Result& r = sc.res[i];
        const double latency = std::chrono::duration<double, std::milli>(Clock::now() - it.tcap).count();
        lat.push_back(latency);
        model_t.push_back(per_frame_model * 1e3);
        ng_count += r.is_ng;
        json rec;
        rec["timestamp"] = round_to(it.ts, 6);
        rec["frame_id"] = it.fid;
        rec["score"] = round_to(r.image_score, 6);
        json scores = json::object();
        for (const auto& kv : r.scores) scores[kv.first] = round_to(kv.second, 6);
        rec["scores"] = scores;
        rec["decision"] = r.is_ng ? "NG" : "OK";
        rec["latency_ms"] = round_to(latency, 3);
        rec["model_ms"] = round_to(per_frame_model * 1e3, 3);
        if (!args.class_name.empty()) {  // as runtime.stream writes it for a product class's threshold
          rec["class"] = args.class_name;
          rec["threshold"] = round_to(model->threshold(), 6);
        }
        if (r.is_ng && !args.save_ng.empty()) {
          const std::string path = (fs::path(args.save_ng) / frame_name("ng", it.fid, ".jpg")).string();
          if (!write_image(path, overlay(it.frame, r.anomaly_map, r.image_score, true, pixel_thr)))
            throw std::runtime_error("cannot write " + path + "; check --save-ng is writable and has space");
          rec["saved"] = path;
          ng_saved.push_back(path);
        }
        if (!args.save_maps.empty()) {
          const std::string path = (fs::path(args.save_maps) / frame_name("map", it.fid, ".npy")).string();
          if (!write_npy(path, r.anomaly_map)) throw std::runtime_error("cannot write " + path);
        }
        if (sink) {  // one complete line per write, flushed: a reader (or a Ctrl-C) never sees half a line
          const std::string line = rec.dump() + "\n";
          std::fwrite(line.data(), 1, line.size(), sink);
          std::fflush(sink);
        }
      }
      scored += static_cast<long>(items.size());
      const auto now = Clock::now();
      // the scoring loop's busy time: the model threads' share plus writing the results
      busy += sc.busy_s / args.workers + std::chrono::duration<double>(now - t_out).count();
      if (std::chrono::duration<double>(now - last_report).count() >= 5.0) {
        last_report = now;
        std::vector<double> recent(lat.end() - std::min<size_t>(lat.size(), 200), lat.end());
        char buf[200];
        std::snprintf(buf, sizeof buf, "%.1f fps | latency p50 %.1f ms p99 %.1f ms | dropped %ld | NG %ld",
                      scored / std::chrono::duration<double>(now - t_start).count(), percentile(recent, 50),
                      percentile(recent, 99), cap->buffer->dropped.load(), ng_count);
        log_line("INFO", buf);
      }
    }
  } catch (const std::exception& e) {  // keep what was scored; report the cause in one line
    stopped_by = "error";
    error = e.what();
    log_line("ERROR", "stream stopped: " + error);
  }
  stop_workers = true;
  cap->buffer->close();  // a worker waiting for frames returns at once
  for (auto& w : workers) w.join();
  if (g_signal && stopped_by != "error") stopped_by = g_signal == SIGINT ? "Ctrl-C" : "SIGTERM";
  cap->stop = true;
  {
    std::unique_lock<std::mutex> lk(cap->m);
    if (!cap->cv.wait_for(lk, std::chrono::seconds(5), [&] { return cap->done.load(); }))
      log_line("WARNING", "capture thread did not stop within 5 s (source blocked); leaving it");
    else
      cap->source->close();
    if (!cap->error.empty() && error.empty()) {
      stopped_by = "error";
      error = cap->error;
    }
  }
  if (sink) std::fflush(sink);
  if (own_sink) std::fclose(sink);

  const double wall = std::chrono::duration<double>(Clock::now() - t_start).count();
  summary["frames_scored"] = scored;
  summary["frames_captured"] = cap->buffer->captured.load();
  summary["frames_dropped"] = cap->buffer->dropped.load();
  summary["ng_count"] = ng_count;
  summary["wall_seconds"] = round_to(wall, 3);
  summary["fps"] = 0.0;
  summary["latency_ms_p50"] = 0.0;
  summary["latency_ms_p90"] = 0.0;
  summary["latency_ms_p99"] = 0.0;
  summary["model_ms_mean"] = 0.0;
  summary["overhead_fraction"] = 0.0;
  summary["idle_fraction"] = 0.0;
  if (scored > 0) {
    double model_sum = 0;
    for (double m : model_t) model_sum += m;
    summary["fps"] = round_to(scored / wall, 2);
    summary["latency_ms_p50"] = round_to(percentile(lat, 50), 3);
    summary["latency_ms_p90"] = round_to(percentile(lat, 90), 3);
    summary["latency_ms_p99"] = round_to(percentile(lat, 99), 3);
    summary["model_ms_mean"] = round_to(model_sum / model_t.size(), 3);
    summary["overhead_fraction"] = round_to(std::max(0.0, 1 - model_sum / 1e3 / busy), 4);
    summary["idle_fraction"] = round_to(std::max(0.0, 1 - busy / wall), 4);
  }
  summary["provider"] = model->provider();
  summary["stopped_by"] = stopped_by;
  summary["error"] = error.empty() ? json(nullptr) : json(error);
  summary["ng_saved"] = ng_saved;
  const std::string text = summary.dump(2);
  log_line("INFO", "summary:\n" + text);
  if (!args.summary.empty() && !atomic_write_text(args.summary, text + "\n")) {
    std::fprintf(stderr, "error: cannot write --summary %s; check the folder exists and is writable\n", args.summary.c_str());
    return 2;
  }
  return error.empty() ? 0 : 1;
}
