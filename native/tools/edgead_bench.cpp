// edgead_bench: latency (p50/p90/p99) and throughput of a deployed model, JSON out (as python -m runtime.bench).
// Model-only: prepared uint8 batch -> outputs. End to end: JPEG bytes -> decode -> fit -> infer -> decision.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sys/utsname.h>

#include "common.hpp"
#include "edgead/edgead.hpp"

using json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
using namespace edgead;
using namespace edgead::tools;

namespace {

const char* kUsage =
    "usage: edgead_bench --model MODEL [--backend auto|onnxruntime|tensorrt] [--threads N] [--batch N ...]\n"
    "                    [--iters N] [--frame IMAGE] [--out JSON]\n"
    "Latency and throughput of a deployed model: model-only and end to end (JPEG decode -> fit -> infer -> OK/NG).\n"
    "  --frame IMAGE   camera frame to use (default: a generated 1920x1080 frame)\n";

template <class F>
std::vector<double> time_fn(F fn, int iters, int warmup = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> out;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = Clock::now();
    fn();
    out.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return out;
}

json percentiles(const std::vector<double>& ms) {
  double sum = 0;
  for (double m : ms) sum += m;
  json j;
  j["p50_ms"] = round_to(percentile(ms, 50), 3);
  j["p90_ms"] = round_to(percentile(ms, 90), 3);
  j["p99_ms"] = round_to(percentile(ms, 99), 3);
  j["mean_ms"] = round_to(sum / ms.size(), 3);
  j["n"] = ms.size();
  return j;
}

// A camera-sized frame with structure (so JPEG and resizing do real work), deterministic.
cv::Mat generated_frame(int width = 1920, int height = 1080) {
  cv::Mat small(270, 480, CV_8UC3);
  cv::RNG rng(0);
  rng.fill(small, cv::RNG::UNIFORM, 0, 255);
  cv::GaussianBlur(small, small, cv::Size(0, 0), 3);
  cv::circle(small, cv::Point(240, 135), 90, cv::Scalar(40, 160, 200), -1, cv::LINE_AA);
  cv::Mat frame;
  cv::resize(small, frame, cv::Size(width, height), 0, 0, cv::INTER_LINEAR);
  return frame;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_path, backend = "auto", frame_path, out_path;
  std::vector<int> batches;
  int iters = 50, threads = 0;
  std::ostringstream command;
  command << "edgead_bench";
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string f = argv[i];
      command << " " << f;
      auto need = [&]() -> std::string {
        if (i + 1 >= argc) throw std::invalid_argument(f + " needs a value");
        command << " " << argv[i + 1];
        return argv[++i];
      };
      if (f == "-h" || f == "--help") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (f == "--model") model_path = need();
      else if (f == "--backend") backend = need();
      else if (f == "--threads") threads = std::stoi(need());
      else if (f == "--iters") iters = std::stoi(need());
      else if (f == "--frame") frame_path = need();
      else if (f == "--out") out_path = need();
      else if (f == "--batch") {
        batches.push_back(std::stoi(need()));
        while (i + 1 < argc && argv[i + 1][0] != '-') {
          command << " " << argv[i + 1];
          batches.push_back(std::stoi(argv[++i]));
        }
      } else throw std::invalid_argument("unknown argument " + f + " (see --help)");
    }
    if (model_path.empty()) throw std::invalid_argument("--model is required");
    if (iters < 1) throw std::invalid_argument("--iters must be >= 1");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  if (batches.empty()) batches.push_back(1);

  std::unique_ptr<Model> model;
  try {
    Options opt;
    opt.backend = backend;
    opt.threads = threads;
    model = std::make_unique<Model>(model_path, opt);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  cv::Mat frame = frame_path.empty() ? generated_frame() : cv::imread(frame_path, cv::IMREAD_COLOR);
  if (frame.empty()) {
    std::fprintf(stderr, "error: cannot read --frame %s\n", frame_path.c_str());
    return 2;
  }
  std::vector<uchar> jpeg;
  cv::imencode(".jpg", frame, jpeg, {cv::IMWRITE_JPEG_QUALITY, 90});

  json res;
  res["provider"] = model->provider();
  res["frame"] = {frame.rows, frame.cols, frame.channels()};
  res["batches"] = json::object();
  for (int b : batches) {
    std::vector<cv::Mat> prepared(b, model->prepare(frame));
    const auto model_only = time_fn([&] { model->infer(prepared); }, iters);
    const auto e2e = time_fn(
        [&] {
          std::vector<cv::Mat> frames;
          for (int i = 0; i < b; ++i) frames.push_back(cv::imdecode(jpeg, cv::IMREAD_COLOR));
          return model->predict(frames);
        },
        iters);
    json r;
    r["model_only"] = percentiles(model_only);
    r["end_to_end"] = percentiles(e2e);
    r["throughput_images_per_s"] = round_to(b * 1e3 / percentile(e2e, 50), 2);
    r["model_only_images_per_s"] = round_to(b * 1e3 / percentile(model_only, 50), 2);
    res["batches"][std::to_string(b)] = r;
  }
  struct utsname u;
  uname(&u);
  res["model"] = model_path;
  res["machine"] = {{"platform", std::string(u.sysname) + "-" + u.release + "-" + u.machine},
                    {"cpu_count", std::thread::hardware_concurrency()}, {"runtime", "edgead native (C++)"}};
  res["command"] = command.str();
  res["date"] = iso_now();
  const std::string text = res.dump(2);
  std::puts(text.c_str());
  if (!out_path.empty() && !atomic_write_text(out_path, text + "\n")) {
    std::fprintf(stderr, "error: cannot write --out %s\n", out_path.c_str());
    return 2;
  }
  return 0;
}
