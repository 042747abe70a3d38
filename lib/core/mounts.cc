#include "core/mounts.h"

#include <sys/stat.h>
#include <sys/statfs.h>

#include <cerrno>
#include <fstream>
#include <sstream>

#include "core/process.h"

namespace gate {

namespace {

// mountinfo writes space, tab, newline and backslash as \NNN (octal).
std::string unescape_mountinfo(const std::string& field) {
  std::string decoded;
  for (std::size_t i = 0; i < field.size(); ++i) {
    if (field[i] == '\\' && i + 3 < field.size()) {
      decoded.push_back(static_cast<char>(std::stoi(field.substr(i + 1, 3), nullptr, 8)));
      i += 3;
    } else {
      decoded.push_back(field[i]);
    }
  }
  return decoded;
}

struct MountEntry {
  std::string mountpoint, fstype, source;
};

// Each line: id parent dev root MOUNTPOINT options [optional...] - FSTYPE SOURCE superopts
std::vector<MountEntry> read_mountinfo() {
  std::vector<MountEntry> out;
  std::ifstream in("/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::vector<std::string> fields;
    for (std::string w; f >> w;) fields.push_back(w);
    if (fields.size() < 5) continue;
    MountEntry e;
    e.mountpoint = unescape_mountinfo(fields[4]);
    for (std::size_t i = 5; i + 2 < fields.size(); ++i)
      if (fields[i] == "-") {
        e.fstype = fields[i + 1];
        e.source = unescape_mountinfo(fields[i + 2]);
        break;
      }
    out.push_back(std::move(e));
  }
  return out;
}

}  // namespace

bool listed_in_mountinfo(const std::string& path) {
  for (const auto& e : read_mountinfo())
    if (e.mountpoint == path) return true;
  return false;
}

std::vector<GateView> gate_views() {
  std::vector<GateView> out;
  for (const auto& e : read_mountinfo())
    if (e.fstype == "fuse.gate" && e.source.rfind("gate:", 0) == 0)
      out.push_back({e.source.substr(5), e.mountpoint});
  return out;
}

MountState mount_state(const std::string& path) {
  // statfs, not stat: the kernel answers a stat of a FUSE view's root from its cache
  // of the root's attributes (a day, on a watched view) even after the daemon died,
  // while a statfs always goes to the connection, which then answers ENOTCONN.
  struct statfs st {};
  if (::statfs(path.c_str(), &st) != 0 && errno == ENOTCONN) return MountState::Stale;
  return listed_in_mountinfo(path) ? MountState::Mounted : MountState::NotMounted;
}

bool unmount_fuse(const std::string& path) {
  if (mount_state(path) == MountState::NotMounted) return true;
  run_command({"fusermount3", "-u", path}, std::chrono::seconds(10));
  if (listed_in_mountinfo(path)) run_command({"fusermount3", "-uz", path}, std::chrono::seconds(10));
  return !listed_in_mountinfo(path);
}

}  // namespace gate
