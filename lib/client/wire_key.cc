#include "client/wire_key.h"

#include <openssl/evp.h>

#include <stdexcept>

#include "core/config.h"
#include "core/token.h"

namespace gate {

namespace {

std::string sha256_hex(std::string_view data) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), md, &len, EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("SHA-256 is not available from OpenSSL");
  return hex_of(md, len);
}

}  // namespace

std::string wire_key(std::string_view key) {
  if (key.size() <= defaults::kMaxKeyBytes) return std::string(key);
  // Cut after a '/' (ASCII, so never inside a UTF-8 sequence), or, in a name longer
  // than the head (not on Linux, where names stop at 255 bytes), anywhere.
  std::size_t head = key.rfind('/', kWireKeyHead - 1);
  head = head == std::string_view::npos || head == 0 ? kWireKeyHead : head;
  return std::string(key.substr(0, head)) + "/\xE2\x80\xA6#sha256:" + sha256_hex(key);
}

}  // namespace gate
