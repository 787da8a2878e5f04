// Internal: one small interface per inference engine (ONNX Runtime always, TensorRT when found).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "edgead/edgead.hpp"

namespace edgead {
namespace detail {

struct Output {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

class Engine {
 public:
  virtual ~Engine() = default;
  virtual std::string provider() const = 0;
  // Extra [N]-shaped outputs besides image_score, in graph order; run() returns them after the two required ones.
  virtual const std::vector<std::string>& extra_scores() const = 0;
  // uint8 NHWC batch of n frames -> {image_score, anomaly_map, extra_scores...}, float32.
  virtual std::vector<Output> run(const uint8_t* nhwc, int64_t n, int height, int width) = 0;
};

std::unique_ptr<Engine> make_onnxruntime_engine(const std::string& path, const Sidecar& sidecar, const Options& options);
#ifdef EDGEAD_WITH_TENSORRT
std::unique_ptr<Engine> make_tensorrt_engine(const std::string& path, const Sidecar& sidecar, const Options& options);
#endif

}  // namespace detail
}  // namespace edgead
