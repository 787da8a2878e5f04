// ONNX Runtime C++ API backend, with the session settings of runtime/backends/onnxruntime_backend.py.
#include <cstdlib>
#include <string>

#include <onnxruntime_cxx_api.h>

#include "engine.hpp"

namespace edgead {
namespace detail {
namespace {

std::string first_line(const std::string& s, size_t max = 200) {
  std::string l = s.substr(0, s.find('\n'));
  return l.substr(0, max);
}

class OnnxRuntimeEngine final : public Engine {
 public:
  OnnxRuntimeEngine(const std::string& path, const Sidecar& sc, const Options& opt)
      : env_(ORT_LOGGING_LEVEL_WARNING, "edgead") {
    Ort::SessionOptions so;
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    so.SetExecutionMode(ExecutionMode::ORT_SEQUENTIAL);
    int threads = opt.threads;
    if (threads <= 0) {
      if (const char* t = std::getenv("EDGEAD_THREADS")) threads = std::atoi(t);
    }
    if (threads > 0) so.SetIntraOpNumThreads(threads);
    // ORT's workers spin after each run by default, stealing the cores capture/decode need (see the Python backend)
    const char* spin = std::getenv("EDGEAD_ORT_SPIN");
    so.AddConfigEntry("session.intra_op.allow_spinning", spin ? spin : "0");
    // Memory-pattern planning keeps one block sized for every activation of the graph alive between runs;
    // without it the arena reuses freed blocks op by op: measured on the 256 px real-time model, -14 MB peak
    // resident memory at the same CPU time per run. EDGEAD_ORT_MEM_PATTERN=1 restores ORT's default.
    const char* pattern = std::getenv("EDGEAD_ORT_MEM_PATTERN");
    if (!(pattern && std::string(pattern) == "1")) so.DisableMemPattern();
    try {
      session_ = std::make_unique<Ort::Session>(env_, path.c_str(), so);
    } catch (const Ort::Exception& e) {
      throw Error(path + ": onnxruntime cannot load it (" + first_line(e.what()) + "); re-export the model");
    }
    Ort::AllocatorWithDefaultOptions alloc;
    if (session_->GetInputCount() != 1) throw Error(path + ": graph has " + std::to_string(session_->GetInputCount()) + " inputs, expected 1 (frames); re-export the model");
    input_name_ = session_->GetInputNameAllocated(0, alloc).get();
    const Ort::TypeInfo in_type = session_->GetInputTypeInfo(0);  // owns what the shape view points into
    auto in_info = in_type.GetTensorTypeAndShapeInfo();
    const auto in_shape = in_info.GetShape();
    if (in_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 || in_shape.size() != 4 ||
        (in_shape[1] > 0 && in_shape[1] != sc.input.height) || (in_shape[2] > 0 && in_shape[2] != sc.input.width) ||
        (in_shape[3] > 0 && in_shape[3] != 3)) {
      throw Error(path + ": graph input is not uint8 [N," + std::to_string(sc.input.height) + "," +
                  std::to_string(sc.input.width) + ",3] as its sidecar says; copy model and sidecar from the same export");
    }
    std::vector<std::string> graph_outputs;
    for (size_t i = 0; i < session_->GetOutputCount(); ++i) {
      std::string name = session_->GetOutputNameAllocated(i, alloc).get();
      const Ort::TypeInfo type = session_->GetOutputTypeInfo(i);
      auto info = type.GetTensorTypeAndShapeInfo();
      if (name != "image_score" && name != "anomaly_map" && info.GetShape().size() == 1 &&
          info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        extra_.push_back(name);
      graph_outputs.push_back(name);
    }
    for (const auto& want : sc.outputs) {
      bool found = false;
      for (const auto& g : graph_outputs) found = found || g == want;
      if (!found) throw Error(path + ": graph lacks output '" + want + "' its sidecar promises; re-export the model");
    }
    output_names_ = {"image_score", "anomaly_map"};
    output_names_.insert(output_names_.end(), extra_.begin(), extra_.end());
    for (const auto& n : output_names_) output_cstr_.push_back(n.c_str());
  }

  std::string provider() const override { return "onnxruntime:CPUExecutionProvider"; }
  const std::vector<std::string>& extra_scores() const override { return extra_; }

  std::vector<Output> run(const uint8_t* nhwc, int64_t n, int height, int width) override {
    const int64_t shape[4] = {n, height, width, 3};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    Ort::Value input = Ort::Value::CreateTensor<uint8_t>(mem, const_cast<uint8_t*>(nhwc),
                                                         static_cast<size_t>(n * height * width * 3), shape, 4);
    const char* in_name = input_name_.c_str();
    std::vector<Ort::Value> outs;
    try {
      outs = session_->Run(Ort::RunOptions{nullptr}, &in_name, &input, 1, output_cstr_.data(), output_cstr_.size());
    } catch (const Ort::Exception& e) {
      throw std::runtime_error("onnxruntime run failed: " + first_line(e.what()));
    }
    std::vector<Output> res;
    for (size_t i = 0; i < outs.size(); ++i) {
      auto info = outs[i].GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw std::runtime_error("output " + output_names_[i] + " is not float32");
      const float* p = outs[i].GetTensorData<float>();
      res.push_back({output_names_[i], info.GetShape(), std::vector<float>(p, p + info.GetElementCount())});
    }
    return res;
  }

 private:
  Ort::Env env_;
  std::unique_ptr<Ort::Session> session_;
  std::string input_name_;
  std::vector<std::string> extra_, output_names_;
  std::vector<const char*> output_cstr_;
};

}  // namespace

std::unique_ptr<Engine> make_onnxruntime_engine(const std::string& path, const Sidecar& sidecar, const Options& options) {
  return std::make_unique<OnnxRuntimeEngine>(path, sidecar, options);
}

}  // namespace detail
}  // namespace edgead
