// Native unit tests (GoogleTest). Cross-language checks (golden preprocessing vectors written by Python,
// score parity, refusals of the programs) are driven from tests/test_native.py.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <opencv2/imgproc.hpp>

#include "edgead/edgead.hpp"

namespace fs = std::filesystem;
using namespace edgead;

namespace {

std::string read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

fs::path golden_dir() {
  const char* env = std::getenv("EDGEAD_GOLDEN_DIR");
  return env ? fs::path(env) : fs::path(EDGEAD_GOLDEN_DIR);
}

}  // namespace

TEST(Sha256, KnownVectors) {
  const fs::path dir = fs::temp_directory_path() / ("edgead_sha_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::ofstream(dir / "empty", std::ios::binary).close();
  std::ofstream(dir / "abc", std::ios::binary) << "abc";
  EXPECT_EQ(file_sha256((dir / "empty").string()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(file_sha256((dir / "abc").string()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  // 56 bytes: the length no longer fits the first block; 1,000,000 bytes: many blocks, partial reads
  std::ofstream(dir / "two", std::ios::binary) << "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(file_sha256((dir / "two").string()), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::ofstream(dir / "million", std::ios::binary) << std::string(1000000, 'a');
  EXPECT_EQ(file_sha256((dir / "million").string()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_THROW(file_sha256((dir / "missing").string()), Error);
  fs::remove_all(dir);
}

TEST(FitGeometry, PoliciesOnWideAndTallFrames) {
  // 1920x1080 into 256x256
  auto s = fit_geometry(1080, 1920, 256, 256, "stretch");
  EXPECT_EQ(s.crop, cv::Rect(0, 0, 1920, 1080));
  EXPECT_EQ(s.paste, cv::Rect(0, 0, 256, 256));
  auto c = fit_geometry(1080, 1920, 256, 256, "center_crop");
  EXPECT_EQ(c.crop, cv::Rect(420, 0, 1080, 1080));
  auto l = fit_geometry(1080, 1920, 256, 256, "letterbox");
  EXPECT_EQ(l.crop, cv::Rect(0, 0, 1920, 1080));
  EXPECT_EQ(l.paste, cv::Rect(0, 56, 256, 144));  // 1080*256/1920 = 144, centred
  auto t = fit_geometry(101, 37, 64, 64, "letterbox");  // tall: 37*64/101 = 23.4 -> 23
  EXPECT_EQ(t.paste, cv::Rect(20, 0, 23, 64));
  EXPECT_THROW(fit_geometry(10, 10, 4, 4, "zoom"), Error);
}

// fit_frame's own whole-factor INTER_AREA shrink (k >= 3) against OpenCV doing both steps itself.
TEST(Preprocess, WholeFactorAreaShrinkMatchesOpenCv) {
  struct Case { int rows, cols, h, w; };
  const Case cases[] = {{1080, 1920, 256, 256}, {300, 450, 100, 100}, {770, 1155, 150, 200}, {999, 1332, 111, 148},
                        {1080, 1920, 224, 320}, {64, 48, 4, 3}};
  cv::RNG rng(11);
  for (const auto& c : cases) {
    cv::Mat frame(c.rows, c.cols, CV_8UC3);
    rng.fill(frame, cv::RNG::UNIFORM, 0, 256);
    const int k = std::min(c.rows / c.h, c.cols / c.w);
    cv::Mat shrunk, want;
    cv::resize(frame, shrunk, cv::Size(c.cols / k, c.rows / k), 0, 0, cv::INTER_AREA);
    cv::resize(shrunk, want, cv::Size(c.w, c.h), 0, 0, cv::INTER_AREA);
    const cv::Mat got = fit_frame(frame, c.h, c.w, "area", "stretch");
    ASSERT_EQ(got.size(), want.size());
    EXPECT_EQ(cv::norm(got, want, cv::NORM_INF), 0.0) << c.rows << "x" << c.cols << " -> " << c.h << "x" << c.w << " k=" << k;
  }
}

// StripeFitter: the frame fed as stripes of any height gives the same bytes as fit_frame on the whole frame
// (plus the RGB swap of Model::prepare), for every fit policy; frames without a whole factor >= 3 are refused.
TEST(Preprocess, StripeFitterMatchesFitFrame) {
  cv::RNG rng(11);
  struct Case { int fh, fw, h, w; const char* fit; const char* order; };
  const Case cases[] = {{1080, 1920, 256, 256, "stretch", "BGR"}, {1080, 1920, 256, 256, "center_crop", "RGB"},
                        {1080, 1920, 224, 320, "letterbox", "BGR"}, {720, 1280, 128, 128, "stretch", "BGR"},
                        {483, 644, 96, 128, "stretch", "RGB"}, {600, 800, 64, 64, "center_crop", "BGR"}};
  int checked = 0;
  for (const auto& c : cases) {
    InputSpec in;
    in.height = c.h;
    in.width = c.w;
    in.fit = c.fit;
    in.color_order = c.order;
    if (!StripeFitter::supports(in, c.fh, c.fw)) continue;
    cv::Mat frame(c.fh, c.fw, CV_8UC3);
    rng.fill(frame, cv::RNG::UNIFORM, 0, 256);
    cv::Mat want = fit_frame(frame, c.h, c.w, "area", c.fit);
    if (in.color_order == "RGB") cv::cvtColor(want, want, cv::COLOR_BGR2RGB);
    StripeFitter fitter(in, c.fh, c.fw);
    for (int stripe : {1, 7, 16, 64}) {  // the fitter is reused frame after frame
      for (int y = 0; y < c.fh; y += stripe) fitter.push(frame.rowRange(y, std::min(c.fh, y + stripe)));
      const cv::Mat got = fitter.finish();
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(cv::norm(got, want, cv::NORM_INF), 0.0) << c.fw << "x" << c.fh << " -> " << c.w << "x" << c.h << " "
                                                        << c.fit << " in stripes of " << stripe;
    }
    ++checked;
  }
  EXPECT_GE(checked, 4);
  InputSpec in;
  in.height = in.width = 256;
  EXPECT_FALSE(StripeFitter::supports(in, 600, 600));  // k = 2: left to OpenCV, needs the whole frame
  EXPECT_FALSE(StripeFitter::supports(in, 1000, 1000)); // k = 3 does not divide 1000
  EXPECT_THROW(StripeFitter(in, 600, 600), Error);
  in.resize = "linear";
  EXPECT_FALSE(StripeFitter::supports(in, 1024, 1024));
}

TEST(Preprocess, GrayBgraAndSixteenBit) {
  cv::Mat gray(33, 47, CV_8UC1);
  cv::randu(gray, 0, 256);
  cv::Mat bgr = as_bgr(gray);
  ASSERT_EQ(bgr.type(), CV_8UC3);
  std::vector<cv::Mat> ch;
  cv::split(bgr, ch);
  EXPECT_EQ(cv::countNonZero(ch[0] != gray), 0);
  cv::Mat w16(5, 7, CV_16UC1, cv::Scalar(0x12ff));  // >> 8, no rounding: 0x12
  cv::Mat w8 = as_bgr(w16);
  EXPECT_EQ(w8.at<cv::Vec3b>(0, 0), cv::Vec3b(0x12, 0x12, 0x12));
  cv::Mat f32(4, 4, CV_32FC1, cv::Scalar(0));
  EXPECT_THROW(as_bgr(f32), Error);
  EXPECT_THROW(fit_frame(bgr, 16, 16, "cubic"), Error);
  cv::Mat out = fit_frame(gray, 16, 24, "area", "letterbox");
  EXPECT_EQ(out.size(), cv::Size(24, 16));
}

// Golden vectors written by Python (runtime.preprocess.fit_frame): frame bytes -> prepared bytes, byte-identical.
TEST(Preprocess, GoldenVectorsFromPython) {
  const fs::path dir = golden_dir();
  const fs::path index = dir / "cases.json";
  if (!fs::exists(index)) GTEST_SKIP() << "no golden vectors at " << dir << " (tests/test_native.py writes them)";
  const auto cases = nlohmann::json::parse(read_bytes(index));
  ASSERT_FALSE(cases.empty());
  int checked = 0;
  for (const auto& c : cases) {
    const auto shape = c.at("frame_shape").get<std::vector<int>>();
    const int chans = shape.size() == 3 ? shape[2] : 1;
    const std::string bytes = read_bytes(dir / c.at("frame").get<std::string>());
    ASSERT_EQ(bytes.size(), static_cast<size_t>(shape[0]) * shape[1] * chans) << c.dump();
    cv::Mat frame(shape[0], shape[1], CV_MAKETYPE(CV_8U, chans), const_cast<char*>(bytes.data()));
    const int h = c.at("height"), w = c.at("width");
    const cv::Mat got = fit_frame(frame, h, w, c.at("resize").get<std::string>(), c.at("fit").get<std::string>());
    const std::string want = read_bytes(dir / c.at("prepared").get<std::string>());
    ASSERT_EQ(got.type(), CV_8UC3);
    ASSERT_EQ(want.size(), got.total() * 3) << c.dump();
    const cv::Mat cont = got.isContinuous() ? got : got.clone();
    size_t diff = 0;
    for (size_t i = 0; i < want.size(); ++i) diff += static_cast<uint8_t>(want[i]) != cont.data[i];
    EXPECT_EQ(diff, 0u) << "bytes differ from Python for " << c.dump();
    ++checked;
  }
  std::printf("checked %d golden cases from %s\n", checked, dir.c_str());
}

TEST(Sidecar, Refusals) {
  const fs::path dir = fs::temp_directory_path() / ("edgead_sc_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string model = (dir / "model.onnx").string();
  try {
    read_sidecar(model);
    FAIL() << "missing model accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model file not found"), std::string::npos);
  }
  std::ofstream(model, std::ios::binary) << "not a model";
  try {
    read_sidecar(model);
    FAIL() << "missing sidecar accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sidecar missing"), std::string::npos);
  }
  nlohmann::json sc = {{"format", 1}, {"model_file", "model.onnx"}, {"model_sha256", file_sha256(model)},
                       {"input", {{"height", 8}, {"width", 8}, {"batch", 1}}},
                       {"outputs", {{"anomaly_map", ""}, {"image_score", ""}}},
                       {"thresholds", {{"image", 0.5}, {"pixel", 0.1}}}};
  auto write = [&](const nlohmann::json& j) { std::ofstream(model + ".json") << j.dump(); };
  write(sc);
  EXPECT_EQ(read_sidecar(model).input.height, 8);
  auto expect_refused = [&](nlohmann::json j, const std::string& needle) {
    write(j);
    try {
      read_sidecar(model);
      ADD_FAILURE() << "accepted: " << j.dump();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << "not one line: " << e.what();
    }
  };
  auto j = sc; j["format"] = 99; expect_refused(j, "sidecar format 99");
  j = sc; j["model_sha256"] = std::string(64, '0'); expect_refused(j, "does not match its sidecar");
  j = sc; j["input"]["layout"] = "NCHW"; expect_refused(j, "layout NCHW");
  j = sc; j["input"]["dtype"] = "float32"; expect_refused(j, "dtype float32");
  j = sc; j["input"]["resize"] = "cubic"; expect_refused(j, "resize cubic");
  j = sc; j["outputs"].erase("image_score"); expect_refused(j, "image_score");
  j = sc; j.erase("thresholds"); expect_refused(j, "malformed sidecar");
  // multi-class: each product class's own threshold; an unknown class is refused in one line, saying what to run
  j = sc; j["thresholds"]["per_class"] = {{"board", 2.5}, {"tray", -1.0}};
  write(j);
  const Sidecar multi = read_sidecar(model);
  EXPECT_EQ(threshold_for(multi, ""), 0.5);
  EXPECT_EQ(threshold_for(multi, "board"), 2.5);
  EXPECT_EQ(threshold_for(multi, "tray"), -1.0);
  try {
    threshold_for(multi, "bottle", model);
    ADD_FAILURE() << "unknown class accepted";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("no threshold for class 'bottle' (calibrated: board, tray)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("--class bottle"), std::string::npos) << msg;
  }
  j["thresholds"]["per_class"]["tray"] = "high"; expect_refused(j, "malformed sidecar");
  { std::ofstream(model + ".json") << "{ not json"; }
  try {
    read_sidecar(model);
    ADD_FAILURE() << "broken JSON accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not valid JSON"), std::string::npos);
  }
  // a corrupt model with a matching sidecar is refused when the engine opens it
  write(sc);
  try {
    Model m(model);
    ADD_FAILURE() << "corrupt model opened";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("onnxruntime cannot load it"), std::string::npos) << e.what();
  }
  fs::remove_all(dir);
}
