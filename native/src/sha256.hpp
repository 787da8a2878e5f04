// Internal: SHA-256 (FIPS 180-4), streaming. Our own ~70 lines instead of OpenSSL's libcrypto, whose loading
// alone costs every process ~3 MB of resident memory for one hash at start-up.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace edgead {
namespace detail {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::string hex_digest();  // lower-case hex; call once

 private:
  void block(const uint8_t* p);
  std::array<uint32_t, 8> h_;
  std::array<uint8_t, 64> buf_{};
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

}  // namespace detail
}  // namespace edgead
