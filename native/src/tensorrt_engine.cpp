// TensorRT 10 backend: deserialize an engine built by `python -m export tensorrt`, named I/O tensors,
// setInputShape / setTensorAddress / enqueueV3 on a CUDA stream, pinned host buffers, async copies.
//
// Compiled only when CMake finds TensorRT 10 and the CUDA toolkit (EDGEAD_WITH_TENSORRT). Written against the
// documented TensorRT 10 C++ API; it could NOT be built or run on the development / CI machines of this
// project (no TensorRT there): docs/native.md says so. Mirrors runtime/backends/tensorrt_backend.py.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include "engine.hpp"

namespace edgead {
namespace detail {
namespace {

class Logger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::fprintf(stderr, "TensorRT: %s\n", msg);
  }
};

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + " failed: " + cudaGetErrorString(e));
}

size_t element_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kHALF: return 2;
    case nvinfer1::DataType::kUINT8: return 1;
    default: return 0;  // not produced by edgead's exports
  }
}

// IEEE half -> float (outputs of an fp16 engine built without fp32 outputs)
float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) bits = sign;
    else {  // subnormal: normalise
      int e = -1;
      uint32_t m = mant;
      do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) bits = sign | 0x7f800000u | (mant << 13);
  else bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

int64_t volume(const nvinfer1::Dims& d) {
  int64_t v = 1;
  for (int i = 0; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

class TensorRTEngine final : public Engine {
 public:
  TensorRTEngine(const std::string& path, const Sidecar& sc, const Options&) {
    std::ifstream f(path, std::ios::binary);
    const std::vector<char> blob((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (blob.empty()) throw Error(path + ": empty or unreadable engine file; rebuild it with `python -m export tensorrt`");
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (!runtime_) throw Error("TensorRT runtime could not be created; check the TensorRT and CUDA installation");
    engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_)
      throw Error(path + ": TensorRT could not deserialize the engine (built by another TensorRT version or GPU?); "
                         "rebuild it with `python -m export tensorrt` on this machine");
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error(path + ": TensorRT could not create an execution context (GPU memory?)");
    for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
      const std::string name = engine_->getIOTensorName(i);
      if (engine_->getTensorIOMode(name.c_str()) == nvinfer1::TensorIOMode::kINPUT) inputs_.push_back(name);
      else outputs_.push_back(name);
    }
    if (inputs_.size() != 1) throw Error(path + ": engine has " + std::to_string(inputs_.size()) + " inputs, expected one frames input; rebuild it from the exported ONNX");
    if (engine_->getTensorDataType(inputs_[0].c_str()) != nvinfer1::DataType::kUINT8)
      throw Error(path + ": engine input is not uint8 frames; rebuild it from the exported ONNX");
    for (const auto& want : sc.outputs) {
      bool found = false;
      for (const auto& o : outputs_) found = found || o == want;
      if (!found) throw Error(path + ": engine lacks output '" + want + "'; rebuild it from the exported ONNX");
    }
    for (const auto& o : outputs_) {
      const auto t = engine_->getTensorDataType(o.c_str());
      if (element_size(t) == 0)
        throw Error(path + ": engine output '" + o + "' has a data type edgead does not read; rebuild it from the exported ONNX");
      if (o != "image_score" && o != "anomaly_map" && engine_->getTensorShape(o.c_str()).nbDims == 1 &&
          (t == nvinfer1::DataType::kFLOAT || t == nvinfer1::DataType::kHALF))
        extra_.push_back(o);
    }
    order_ = {"image_score", "anomaly_map"};
    order_.insert(order_.end(), extra_.begin(), extra_.end());
    check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
  }

  ~TensorRTEngine() override {
    free_buffers();
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::string provider() const override {
    const int v = getInferLibVersion();  // e.g. 100300 for 10.3.0
    return "tensorrt:" + std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
  }
  const std::vector<std::string>& extra_scores() const override { return extra_; }

  std::vector<Output> run(const uint8_t* nhwc, int64_t n, int height, int width) override {
    std::lock_guard<std::mutex> lock(run_mutex_);  // one execution context and one set of buffers: one run at a time
    const char* in = inputs_[0].c_str();
    nvinfer1::Dims dims;
    dims.nbDims = 4;
    dims.d[0] = n;
    dims.d[1] = height;
    dims.d[2] = width;
    dims.d[3] = 3;
    if (!context_->setInputShape(in, dims))
      throw std::runtime_error("TensorRT refused input shape [" + std::to_string(n) + "," + std::to_string(height) + "," +
                               std::to_string(width) + ",3]; the engine's optimization profile does not cover it");
    if (n != allocated_n_) allocate(n);
    const size_t in_bytes = static_cast<size_t>(n) * height * width * 3;
    std::memcpy(buffers_.at(inputs_[0]).host, nhwc, in_bytes);
    check_cuda(cudaMemcpyAsync(buffers_.at(inputs_[0]).device, buffers_.at(inputs_[0]).host, in_bytes,
                               cudaMemcpyHostToDevice, stream_), "copy to device");
    for (auto& kv : buffers_)
      if (!context_->setTensorAddress(kv.first.c_str(), kv.second.device))
        throw std::runtime_error("TensorRT setTensorAddress failed for " + kv.first);
    if (!context_->enqueueV3(stream_)) throw std::runtime_error("TensorRT enqueueV3 failed; see the TensorRT log above");
    for (const auto& o : order_) {
      auto& b = buffers_.at(o);
      check_cuda(cudaMemcpyAsync(b.host, b.device, b.bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    }
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    std::vector<Output> res;
    for (const auto& o : order_) {
      const auto& b = buffers_.at(o);
      Output out{o, b.shape, std::vector<float>(static_cast<size_t>(b.count))};
      if (b.type == nvinfer1::DataType::kHALF) {
        const auto* h = static_cast<const uint16_t*>(b.host);
        for (int64_t i = 0; i < b.count; ++i) out.data[i] = half_to_float(h[i]);
      } else {
        std::memcpy(out.data.data(), b.host, b.count * sizeof(float));
      }
      res.push_back(std::move(out));
    }
    return res;
  }

 private:
  struct Buffer {
    void* host = nullptr;
    void* device = nullptr;
    size_t bytes = 0;
    int64_t count = 0;
    std::vector<int64_t> shape;
    nvinfer1::DataType type = nvinfer1::DataType::kFLOAT;
  };

  // Pinned host + device buffers for the current input shape (shapes come from the context after setInputShape).
  void allocate(int64_t n) {
    free_buffers();
    std::vector<std::string> all = inputs_;
    all.insert(all.end(), outputs_.begin(), outputs_.end());
    for (const auto& name : all) {
      Buffer b;
      const nvinfer1::Dims d = context_->getTensorShape(name.c_str());
      if (d.nbDims < 0) throw std::runtime_error("TensorRT could not infer the shape of " + name);
      for (int i = 0; i < d.nbDims; ++i) b.shape.push_back(d.d[i]);
      b.type = engine_->getTensorDataType(name.c_str());
      b.count = volume(d);
      b.bytes = static_cast<size_t>(b.count) * element_size(b.type);
      check_cuda(cudaMallocHost(&b.host, b.bytes), "cudaMallocHost");
      check_cuda(cudaMalloc(&b.device, b.bytes), "cudaMalloc");
      buffers_[name] = b;
    }
    allocated_n_ = n;
  }

  void free_buffers() {
    for (auto& kv : buffers_) {
      if (kv.second.host) cudaFreeHost(kv.second.host);
      if (kv.second.device) cudaFree(kv.second.device);
    }
    buffers_.clear();
    allocated_n_ = -1;
  }

  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::string> inputs_, outputs_, extra_, order_;
  std::map<std::string, Buffer> buffers_;
  int64_t allocated_n_ = -1;
  std::mutex run_mutex_;
};

}  // namespace

std::unique_ptr<Engine> make_tensorrt_engine(const std::string& path, const Sidecar& sidecar, const Options& options) {
  return std::make_unique<TensorRTEngine>(path, sidecar, options);
}

}  // namespace detail
}  // namespace edgead
