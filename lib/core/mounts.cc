#include "core/mounts.h"

#include <sys/stat.h>

#include <cerrno>
#include <fstream>

#include "core/process.h"

namespace gate {

bool listed_in_mountinfo(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::size_t pos = 0;
    for (int i = 0; i < 4 && pos != std::string::npos; ++i) pos = line.find(' ', pos + 1);
    if (pos == std::string::npos) continue;
    const auto end = line.find(' ', pos + 1);
    const std::string mp = line.substr(pos + 1, end - pos - 1);
    std::string decoded;
    for (std::size_t i = 0; i < mp.size(); ++i) {
      if (mp[i] == '\\' && i + 3 < mp.size()) {
        decoded.push_back(static_cast<char>(std::stoi(mp.substr(i + 1, 3), nullptr, 8)));
        i += 3;
      } else {
        decoded.push_back(mp[i]);
      }
    }
    if (decoded == path) return true;
  }
  return false;
}

MountState mount_state(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 && errno == ENOTCONN) return MountState::Stale;
  return listed_in_mountinfo(path) ? MountState::Mounted : MountState::NotMounted;
}

bool unmount_fuse(const std::string& path) {
  if (mount_state(path) == MountState::NotMounted) return true;
  run_command({"fusermount3", "-u", path}, std::chrono::seconds(10));
  if (listed_in_mountinfo(path)) run_command({"fusermount3", "-uz", path}, std::chrono::seconds(10));
  return !listed_in_mountinfo(path);
}

}  // namespace gate
