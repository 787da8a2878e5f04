// edgead::Model: sidecar -> engine -> prepared frames -> results, mirroring runtime/model.py.
#include <algorithm>
#include <cstring>

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include <opencv2/imgproc.hpp>

#include "engine.hpp"

namespace edgead {

struct Model::Impl {
  Sidecar sidecar;
  std::string path, class_name;
  double threshold = 0.0;  // the deciding one: the sidecar's global threshold, or a class's (use_class)
  std::unique_ptr<detail::Engine> engine;  // run() may be called from several threads at once
};

namespace {

std::string suffix_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  const auto dot = path.find_last_of('.');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return "";
  std::string s = path.substr(dot);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::unique_ptr<detail::Engine> open_engine(const std::string& path, const Sidecar& sc, const Options& opt) {
  const std::string suffix = suffix_of(path);
  std::string backend = opt.backend;
  if (backend == "auto") {
    if (suffix == ".onnx") backend = "onnxruntime";
    else if (suffix == ".engine" || suffix == ".plan") backend = "tensorrt";
    else throw Error(path + ": unknown model type '" + suffix + "'; expected .onnx or .engine");
  }
  if (backend == "onnxruntime") {
    if (suffix != ".onnx") throw Error(path + ": onnxruntime opens .onnx files; pass the .onnx export or --backend tensorrt");
    return detail::make_onnxruntime_engine(path, sc, opt);
  }
  if (backend == "tensorrt") {
#ifdef EDGEAD_WITH_TENSORRT
    if (suffix == ".onnx") throw Error(path + ": the TensorRT backend opens serialized engines (.engine); build one with `python -m export tensorrt`");
    return detail::make_tensorrt_engine(path, sc, opt);
#else
    throw Error(path + ": this edgead was built without TensorRT (CMake did not find it); rebuild on a machine with TensorRT 10 or use the .onnx with --backend onnxruntime");
#endif
  }
  throw Error("backend '" + backend + "': choose auto, onnxruntime or tensorrt");
}

}  // namespace

std::vector<std::string> available_backends() {
#ifdef EDGEAD_WITH_TENSORRT
  return {"onnxruntime", "tensorrt"};
#else
  return {"onnxruntime"};
#endif
}

Model::Model(const std::string& path, const Options& options) : impl_(std::make_unique<Impl>()) {
  impl_->sidecar = read_sidecar(path, options.verify_hash);
  impl_->path = path;
  impl_->threshold = impl_->sidecar.threshold_image;
  impl_->engine = open_engine(path, impl_->sidecar, options);
  const auto& in = impl_->sidecar.input;
  const int n = in.batch > 0 ? in.batch : 1;
  std::vector<cv::Mat> black(n, cv::Mat::zeros(in.height, in.width, CV_8UC3));
  for (int i = 0; i < options.warmup; ++i) infer(black);
#ifdef __GLIBC__
  // ONNX Runtime frees the parsed model and its graph-optimization scratch once the session is built (~15 MB for
  // a 10 MB model); glibc keeps such freed memory resident until asked. Give it back to the system once.
  malloc_trim(0);
#endif
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const Sidecar& Model::sidecar() const { return impl_->sidecar; }
const InputSpec& Model::input() const { return impl_->sidecar.input; }
double Model::threshold() const { return impl_->threshold; }
const std::string& Model::class_name() const { return impl_->class_name; }

void Model::use_class(const std::string& class_name) {
  impl_->threshold = threshold_for(impl_->sidecar, class_name, impl_->path);
  impl_->class_name = class_name;
}
std::string Model::provider() const { return impl_->engine->provider(); }

cv::Mat Model::prepare(const cv::Mat& frame) const {
  const auto& in = impl_->sidecar.input;
  cv::Mat out = fit_frame(frame, in.height, in.width, in.resize, in.fit);
  if (in.color_order == "RGB") {
    cv::Mat rgb;
    cv::cvtColor(out, rgb, cv::COLOR_BGR2RGB);
    return rgb;
  }
  return out;
}

std::vector<Result> Model::infer(const std::vector<cv::Mat>& prepared) {
  const auto& in = impl_->sidecar.input;
  const size_t frame_bytes = static_cast<size_t>(in.height) * in.width * 3;
  for (const auto& p : prepared) {
    if (p.type() != CV_8UC3 || p.rows != in.height || p.cols != in.width)
      throw Error("prepared frame must be uint8 " + std::to_string(in.height) + "x" + std::to_string(in.width) +
                  "x3; use Model::prepare");
  }
  const size_t total = prepared.size();
  const size_t chunk = in.batch > 0 ? static_cast<size_t>(in.batch) : std::max<size_t>(total, 1);
  // as numpy does it (NEP 50): a Python float threshold is compared in the score's float32
  const float thr = static_cast<float>(impl_->threshold);
  const auto& extra = impl_->engine->extra_scores();
  std::vector<Result> results;
  results.reserve(total);
  std::vector<uint8_t> batch;  // per call, so that several threads can infer on one Model at once
  for (size_t start = 0; start < total; start += chunk) {
    const size_t n = std::min(chunk, total - start);
    const uint8_t* input = nullptr;
    if (chunk == 1 && prepared[start].isContinuous()) {
      input = prepared[start].data;  // one frame, already one block: hand it to the engine as it is
    } else {
      batch.resize(chunk * frame_bytes);
      for (size_t i = 0; i < chunk; ++i) {  // a short last chunk is padded by repeating its last frame
        const cv::Mat& src = prepared[start + std::min(i, n - 1)];
        uint8_t* dst = batch.data() + i * frame_bytes;
        if (src.isContinuous()) std::memcpy(dst, src.data, frame_bytes);
        else
          for (int y = 0; y < src.rows; ++y) std::memcpy(dst + y * src.cols * 3, src.ptr(y), src.cols * 3);
      }
      input = batch.data();
    }
    auto outs = impl_->engine->run(input, static_cast<int64_t>(chunk), in.height, in.width);
    const auto& score = outs[0];
    const auto& map = outs[1];
    if (score.data.size() != chunk || map.shape.size() != 4 || map.shape[0] != static_cast<int64_t>(chunk) || map.shape[1] != 1)
      throw std::runtime_error("graph outputs have unexpected shapes (image_score [N], anomaly_map [N,1,H,W] expected)");
    const int mh = static_cast<int>(map.shape[2]), mw = static_cast<int>(map.shape[3]);
    for (size_t i = 0; i < n; ++i) {
      Result r;
      r.image_score = score.data[i];
      r.is_ng = r.image_score >= thr;
      r.anomaly_map = cv::Mat(mh, mw, CV_32FC1, const_cast<float*>(map.data.data()) + i * mh * mw).clone();
      for (size_t k = 0; k < extra.size(); ++k) r.scores.emplace_back(extra[k], outs[2 + k].data[i]);
      results.push_back(std::move(r));
    }
  }
  return results;
}

std::vector<Result> Model::predict(const std::vector<cv::Mat>& frames) {
  std::vector<cv::Mat> prepared;
  prepared.reserve(frames.size());
  for (const auto& f : frames) prepared.push_back(prepare(f));
  return infer(prepared);
}

Result Model::predict(const cv::Mat& frame) { return predict(std::vector<cv::Mat>{frame}).front(); }

}  // namespace edgead
