// edgead native runtime: open an exported artifact (model + JSON sidecar) and score frames,
// with the same preprocessing, decisions and refusals as the Python runtime (runtime/).
//
//   edgead::Model model("model.onnx");            // checks the sidecar and the model's SHA-256
//   edgead::Result r = model.predict(frame_bgr);  // any size, uint8 gray / BGR / BGRA (OpenCV order)
//   r.image_score, r.is_ng, r.anomaly_map (CV_32F, graph input size), r.scores (extra named [N] outputs)
//
// No global state. prepare() and infer() may be called from several threads at once on one Model (one set
// of weights in memory; ONNX Runtime runs the calls concurrently, the TensorRT engine one after another).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <opencv2/core.hpp>

namespace edgead {

// Sidecar formats this runtime reads (it reads only keys common to them: format, model_file,
// model_sha256, input, outputs, thresholds).
constexpr int kMinSidecarFormat = 1;
constexpr int kMaxSidecarFormat = 2;

// A model, sidecar or frame that cannot be used as it is; what() is one line saying what to do.
// Programs map it to exit code 2, like the Python CLIs.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What the graph's input tensor is (sidecar "input"). Frames are fitted on the host to height x width.
struct InputSpec {
  int height = 0;
  int width = 0;
  std::string layout = "NHWC";
  std::string dtype = "uint8";
  std::string color_order = "BGR";  // BGR (OpenCV's order, frames go in unconverted) or RGB
  int batch = 1;                    // fixed batch size of the graph, or -1 = dynamic
  std::string resize = "area";      // area | linear | nearest (OpenCV interpolation)
  std::string fit = "stretch";      // stretch | letterbox | center_crop
};

// The parts of the sidecar the native runtime needs.
struct Sidecar {
  int format = 0;
  std::string model_file;
  std::string model_sha256;
  InputSpec input;
  std::vector<std::string> outputs;  // declared output names, in sidecar order
  double threshold_image = 0.0;      // image_score >= this -> NG
  double threshold_pixel = 0.1;
  std::map<std::string, double> threshold_per_class;  // multi-class models: each product class's own
};

// The image threshold of a product class ("" = the global one), as runtime.model.Model.threshold_for;
// throws Error (one line, what to run) for a class without a threshold.
double threshold_for(const Sidecar& sidecar, const std::string& class_name, const std::string& model_path = "model");

// Read and validate the sidecar next to model_path (model.onnx -> model.onnx.json); throws Error.
Sidecar read_sidecar(const std::string& model_path, bool verify_hash = true);

// Lower-case hex SHA-256 of a file's bytes; throws Error if it cannot be read.
std::string file_sha256(const std::string& path);

// Integer geometry of a fit policy, identical to runtime.preprocess.fit_geometry:
// crop = region of the frame, paste = where the resized crop goes in the output.
struct FitGeometry {
  cv::Rect crop;
  cv::Rect paste;
};
FitGeometry fit_geometry(int frame_h, int frame_w, int height, int width, const std::string& fit);

// Any uint8 (or uint16) gray / gray+1 / BGR / BGRA image -> HxWx3 BGR uint8 (runtime.preprocess.as_bgr).
cv::Mat as_bgr(const cv::Mat& image);

// Frame of any size -> (height, width, 3) BGR uint8, byte-identical to runtime.preprocess.fit_frame.
cv::Mat fit_frame(const cv::Mat& frame, int height, int width, const std::string& resize = "area",
                  const std::string& fit = "stretch");

// fit_frame (+ Model::prepare's colour order) for a BGR frame that arrives as horizontal stripes of rows, top to
// bottom, so that the whole full-size frame never has to be in memory (a 1080p BGR frame is 6.2 MB; a decoder
// can convert into a stripe of a few rows instead). The result is byte-identical to Model::prepare(frame).
// Only for frames that fit_frame's area resize first shrinks by a whole factor k >= 3 (e.g. 1920x1080 ->
// 256x256, k = 4): it needs just k rows at a time. supports() says whether a frame size qualifies.
class StripeFitter {
 public:
  static bool supports(const InputSpec& in, int frame_h, int frame_w);
  StripeFitter(const InputSpec& in, int frame_h, int frame_w);  // throws Error where !supports
  void push(const cv::Mat& rows);  // the frame's next rows: CV_8UC3 (BGR), frame_w wide, any number of rows
  cv::Mat finish();                // once all frame_h rows are in: (height, width, 3) uint8; ready for the next frame
  int frame_height() const { return frame_h_; }
  int frame_width() const { return frame_w_; }

 private:
  InputSpec in_;
  int frame_h_, frame_w_, k_ = 1, next_row_ = 0;
  cv::Rect crop_, paste_;
  cv::Mat shrunk_;             // the whole-factor box average, filled k source rows at a time
  std::vector<uint16_t> acc_;  // column sums of the current k rows
};

// Scores of one frame.
struct Result {
  float image_score = 0.f;
  bool is_ng = false;
  cv::Mat anomaly_map;                                // CV_32FC1, graph input size (height x width)
  std::vector<std::pair<std::string, float>> scores;  // every other [N]-shaped output, in graph order
};

struct Options {
  std::string backend = "auto";  // auto (from the file suffix) | onnxruntime | tensorrt
  int threads = 0;               // ONNX Runtime intra-op threads; 0 = EDGEAD_THREADS or ORT's default
  bool verify_hash = true;
  int warmup = 2;                // runs on a black batch at open, so the first frame is not slow
};

class Model {
 public:
  explicit Model(const std::string& path, const Options& options = Options());
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // Frame(s) of any size -> results. prepare + infer in one call.
  Result predict(const cv::Mat& frame);
  std::vector<Result> predict(const std::vector<cv::Mat>& frames);

  // Frame -> (height, width, 3) uint8 in the graph's colour order (what the graph receives).
  cv::Mat prepare(const cv::Mat& frame) const;
  // Prepared frames -> results; splits / pads to a fixed graph batch size. Safe to call from several threads.
  std::vector<Result> infer(const std::vector<cv::Mat>& prepared);

  const Sidecar& sidecar() const;
  const InputSpec& input() const;
  double threshold() const;             // the deciding threshold: the global one, or use_class's
  // Multi-class model: decide by this product class's threshold ("" = the global one); throws Error if it has none.
  // Call before scoring starts (not concurrently with infer).
  void use_class(const std::string& class_name);
  const std::string& class_name() const;  // "" = the global threshold
  std::string provider() const;  // e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Backends compiled into this build ("onnxruntime", and "tensorrt" when CMake found TensorRT).
std::vector<std::string> available_backends();

}  // namespace edgead
