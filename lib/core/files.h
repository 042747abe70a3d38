#pragma once
// Reading a whole small file (procfs entries, a kept version, a file in a view), and
// writing all of a buffer.
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "core/status.h"

namespace gate {

// The content of `path`, at most `limit` bytes; nullopt when it cannot be opened or
// read (gone, not ours, a directory).
std::optional<std::string> read_file(const std::string& path, std::size_t limit = SIZE_MAX);

// The procfs name of this process's descriptor `fd` ("/proc/self/fd/N"): opening it
// opens the file the descriptor names (an O_PATH one too), wherever it now is.
inline std::string proc_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// A descriptor closed when it goes out of scope.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Writes all of `data` to `fd` at `offset` (pwrite, retried after short writes and
// EINTR); false with errno set when it could not.
bool write_all_at(int fd, std::string_view data, off_t offset = 0);

// Replaces `path` with `data` whole: written to a temporary file beside it, flushed to
// disk, then renamed over it (a crash leaves the old content or the new, never half).
Status replace_file(const std::string& path, std::string_view data);

}  // namespace gate
