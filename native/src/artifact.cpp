// Sidecar reading and model hashing: the same checks and one-line fixes as runtime/artifact.py.
#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "edgead/edgead.hpp"
#include "sha256.hpp"

namespace edgead {
namespace {

bool is_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return f.good();
}

const char* const kResizes[] = {"area", "linear", "nearest"};
const char* const kFits[] = {"stretch", "letterbox", "center_crop"};

template <size_t N>
bool one_of(const std::string& v, const char* const (&choices)[N]) {
  for (const char* c : choices)
    if (v == c) return true;
  return false;
}

// Refuse what the native runtime cannot feed, naming the key and the fix.
void check_input(const InputSpec& in, const std::string& src) {
  auto bad = [&](const std::string& what) {
    throw Error(src + ": input " + what + " is not supported by the native runtime; re-export the model with the default input spec");
  };
  if (in.height <= 0 || in.width <= 0) bad("size " + std::to_string(in.height) + "x" + std::to_string(in.width));
  if (in.layout != "NHWC") bad("layout " + in.layout + " (needs NHWC)");
  if (in.dtype != "uint8") bad("dtype " + in.dtype + " (needs uint8)");
  if (in.color_order != "BGR" && in.color_order != "RGB") bad("color_order " + in.color_order + " (needs BGR or RGB)");
  if (!one_of(in.resize, kResizes)) bad("resize " + in.resize + " (needs area, linear or nearest)");
  if (!one_of(in.fit, kFits)) bad("fit " + in.fit + " (needs stretch, letterbox or center_crop)");
  if (in.batch == 0 || in.batch < -1) bad("batch " + std::to_string(in.batch));
}

}  // namespace

std::string file_sha256(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot be read; check the path and permissions");
  detail::Sha256 sha;
  std::vector<char> buf(1 << 16);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    if (f.gcount() > 0) sha.update(buf.data(), static_cast<size_t>(f.gcount()));
  }
  if (f.bad()) throw Error(path + ": read error while hashing; check the disk");
  return sha.hex_digest();
}

Sidecar read_sidecar(const std::string& model_path, bool verify_hash) {
  if (!is_file(model_path))
    throw Error(model_path + ": model file not found; pass the .onnx/.engine written by `python -m export`");
  const std::string sc_path = model_path + ".json";
  if (!is_file(sc_path))
    throw Error(sc_path + ": sidecar missing; it is written by `python -m export` next to the model, copy it along");
  nlohmann::json j;
  try {
    std::ifstream f(sc_path);
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    std::string msg = e.what();
    throw Error(sc_path + ": not valid JSON (" + msg.substr(0, 120) + "); restore it from the export folder");
  }
  if (!j.is_object()) throw Error(sc_path + ": expected a JSON object; re-export the model to get a valid sidecar");
  Sidecar sc;
  const auto fmt = j.find("format");
  if (fmt == j.end() || !fmt->is_number_integer() || fmt->get<int>() < kMinSidecarFormat ||
      fmt->get<int>() > kMaxSidecarFormat) {
    throw Error(sc_path + ": sidecar format " + (fmt == j.end() ? std::string("None") : fmt->dump()) +
                ", this edgead reads " + std::to_string(kMinSidecarFormat) + ".." + std::to_string(kMaxSidecarFormat) +
                "; re-export the model");
  }
  sc.format = fmt->get<int>();
  try {
    sc.model_file = j.at("model_file").get<std::string>();
    sc.model_sha256 = j.at("model_sha256").get<std::string>();
    const auto& in = j.at("input");
    sc.input.height = in.at("height").get<int>();
    sc.input.width = in.at("width").get<int>();
    sc.input.layout = in.value("layout", "NHWC");
    sc.input.dtype = in.value("dtype", "uint8");
    sc.input.color_order = in.value("color_order", "BGR");
    sc.input.resize = in.value("resize", "area");
    sc.input.fit = in.value("fit", "stretch");
    const auto b = in.find("batch");
    if (b == in.end()) sc.input.batch = 1;
    else if (b->is_string()) sc.input.batch = (b->get<std::string>() == "dynamic") ? -1 : 0;
    else sc.input.batch = b->get<int>();
    for (const auto& kv : j.at("outputs").items()) sc.outputs.push_back(kv.key());
    const auto& th = j.at("thresholds");
    sc.threshold_image = th.at("image").get<double>();
    sc.threshold_pixel = th.value("pixel", 0.1);
    const auto pc = th.find("per_class");
    if (pc != th.end())
      for (const auto& kv : pc->items()) sc.threshold_per_class[kv.key()] = kv.value().get<double>();
  } catch (const nlohmann::json::exception& e) {
    std::string msg = e.what();
    throw Error(sc_path + ": malformed sidecar (" + msg.substr(0, 160) + "); re-export the model");
  }
  check_input(sc.input, sc_path);
  if (verify_hash) {
    const std::string actual = file_sha256(model_path);
    if (actual != sc.model_sha256) {
      throw Error(model_path + ": hash " + actual.substr(0, 12) + " does not match its sidecar (" +
                  sc.model_sha256.substr(0, 12) +
                  "); the model or the sidecar was replaced - copy both from the same export or re-run calibration");
    }
  }
  for (const char* k : {"anomaly_map", "image_score"}) {
    bool found = false;
    for (const auto& o : sc.outputs) found = found || o == k;
    if (!found) throw Error(sc_path + ": outputs ['" + std::string(k) + "'] missing; re-export the model");
  }
  return sc;
}

double threshold_for(const Sidecar& sidecar, const std::string& class_name, const std::string& model_path) {
  if (class_name.empty()) return sidecar.threshold_image;
  const auto it = sidecar.threshold_per_class.find(class_name);
  if (it != sidecar.threshold_per_class.end()) return it->second;
  std::string known;
  for (const auto& kv : sidecar.threshold_per_class) known += (known.empty() ? "" : ", ") + kv.first;
  throw Error(model_path + ": no threshold for class '" + class_name + "' (calibrated: " +
              (known.empty() ? std::string("none yet") : known) + "); run `python -m calibration fit --model " +
              model_path + " --good DIR --class " + class_name + "`");
}

}  // namespace edgead
