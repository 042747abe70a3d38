#pragma once
// Reading a whole small file (procfs entries, a kept version, a file in a view), and
// writing all of a buffer.
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace gate {

// The content of `path`, at most `limit` bytes; nullopt when it cannot be opened or
// read (gone, not ours, a directory).
std::optional<std::string> read_file(const std::string& path, std::size_t limit = SIZE_MAX);

// Writes all of `data` to `fd` at `offset` (pwrite, retried after short writes and
// EINTR); false with errno set when it could not.
bool write_all_at(int fd, std::string_view data, off_t offset = 0);

}  // namespace gate
