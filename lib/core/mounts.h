#pragma once
// Mount points as the host sees them: live, stale (the FUSE daemon died and the
// kernel answers ENOTCONN) or absent.
#include <string>
#include <vector>

namespace gate {

enum class MountState { NotMounted, Mounted, Stale };
// `path` as given (relative, or with a trailing slash, too); nothing but a statfs with
// a time limit touches it.
MountState mount_state(const std::string& path);
// Whether /proc/self/mountinfo lists path (an absolute, normalised path) as a mount point.
bool listed_in_mountinfo(const std::string& path);

// The gate mounts this host has (fsname "gate:ROOT", type fuse.gate).
struct GateView {
  std::string root;        // the directory shown
  std::string mountpoint;  // where it shows
};
std::vector<GateView> gate_views();
// Unmounts a FUSE mount point (live or stale): fusermount3 -u, then lazily (-uz)
// if it is still there. True when path is no longer a mount point.
bool unmount_fuse(const std::string& path);

}  // namespace gate
