#pragma once
// Cloud images from their publishers, or from a mirror laid out like the
// publisher's site: downloaded with progress, resumed after a broken connection,
// verified against the publisher's checksum file, and cached with their checksum.
// An image that fails verification is never kept (nor booted).
//
// Cached under $XDG_CACHE_HOME/gate/images/<base>/ as the publisher's file name, with
// "<file>.sha256" (or .sha512) holding the verified checksum; "<file>.part" is a
// download in progress, resumed by the next fetch.
#include <chrono>
#include <filesystem>
#include <functional>
#include <optional>
#include <ostream>
#include <string>

#include "core/status.h"

namespace gate::vm {

struct CloudImage {
  std::string base;  // ubuntu-24.04, ubuntu-22.04, debian-12-cloud
  std::string url;   // of the directory holding the image and its checksum file, with '/'
  std::string file;  // the image's file name there
  std::string sums;  // the checksum file's name there (SHA256SUMS, SHA512SUMS)
  int sha_bits = 256;
  // The checksum file's detached OpenPGP signature there ("SHA256SUMS.gpg"); empty
  // where the publisher signs none. Checked with gpgv against `keyring` when that file
  // exists (GATE_IMAGE_KEYRING, else the publisher's keyring as Ubuntu installs it;
  // GATE_IMAGE_KEYRING=none: not checked).
  std::string signature;
  std::string keyring;  // "": not checked (GATE_IMAGE_KEYRING=none)
  bool keyring_named = false;  // by GATE_IMAGE_KEYRING: it must be there
};

bool is_cloud_base(const std::string& base);
inline constexpr const char* kKeyringEnv = "GATE_IMAGE_KEYRING";
// The image for `base` at its publisher, or at `mirror` (a URL standing for the
// publisher's site root, e.g. http://host/ubuntu for https://cloud-images.ubuntu.com);
// nullopt for a base that is not a cloud image.
std::optional<CloudImage> cloud_image(const std::string& base, const std::string& mirror = "");

struct FetchOptions {
  std::string cache_dir;             // where the image and its checksum are kept
  bool tty = false;                  // one line updated in place, else a line per 10%
  std::ostream* progress = nullptr;  // where progress goes (none: silent)
  std::function<void(const std::string&)> say;  // one-line messages for the user
  int attempts = 6;                  // connections for the image before giving up
  bool offline = false;              // only the verified cache; never the network
  std::chrono::seconds io_timeout{30};  // a connection silent this long is broken
};

// Where an image and what goes with it lie in `cache_dir`.
struct CachePaths {
  std::filesystem::path image;      // the publisher's file name
  std::filesystem::path sum;        // "<file>.sha256" (.sha512): its verified checksum
  std::filesystem::path part;       // "<file>.part": a download in progress
  std::filesystem::path part_want;  // "<file>.part.want": the checksum the part is of
};
CachePaths cache_paths(const CloudImage& image, const std::string& cache_dir);

// The verified image's path: from the cache when the publisher's checksum still
// names it (or the publisher cannot be reached), else downloaded and verified.
Result<std::string> fetch_cloud_image(const CloudImage& image, const FetchOptions& options);

// Pieces, for tests.
struct Url {
  bool tls = false;
  std::string host, port, target;
};
Result<Url> parse_url(const std::string& url);
// The checksum a SHA*SUMS text gives for `file` (lines "<hex> *<file>" or
// "<hex>  <file>"), lower case.
std::optional<std::string> checksum_for(const std::string& sums, const std::string& file);
Result<std::string> file_digest(const std::string& path, int sha_bits);
// gpgv's verdict on `signature` over `signed_text` by a key of `keyring`; files for
// gpgv are written (and removed) in `work_dir`.
Status verify_signature(const std::string& signed_text, const std::string& signature,
                        const std::string& keyring, const std::string& work_dir);

}  // namespace gate::vm
