#pragma once
// Guest images. gate boots a Debian 12 image it builds itself from Debian's
// packages (mmdebstrap, no cloud download), with the guest's own kernel, so that
// the guest's FUSE module matches. The image carries a provisioning service that
// reads a per-VM seed disk (label GATESEED: the SSH key, the gate binary and its
// libraries, broker settings), so one cached image serves every VM and the guest
// needs no network.
//
// Cached under $XDG_CACHE_HOME/gate/images/<name>/ as disk.raw, vmlinuz, initrd.img.
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

namespace gate::vm {

struct ImageFiles {
  std::string disk, kernel, initrd;
  // A cloud image has no kernel beside it: the firmware boots the image's own.
  bool firmware_boot() const { return kernel.empty(); }
  bool complete() const;
};

// Where a tool runs from: PATH, else /usr/sbin or /sbin, which a normal user's PATH
// lacks on Debian (mkfs.ext4, mkfs.vfat need no root for image files); "" if nowhere.
std::string tool_path(const std::string& name);

// "qcow2" or "raw", from the disk's first bytes (cloud images come as either).
std::string disk_format(const std::string& path);

std::string image_cache_root();
ImageFiles cached_image(const std::string& base);  // may not exist yet
// Where a downloaded (cloud) base's files are kept (vm/image_fetch.h: cache_paths).
std::string cloud_cache_dir(const std::string& base);

// The bases gate knows; downloadable ones (vm/image_fetch.h) need the internet.
inline constexpr const char* kBaseNames = "debian-12, ubuntu-24.04, ubuntu-22.04, debian-12-cloud";
bool known_base(const std::string& base);
bool base_is_offline(const std::string& base);  // built locally from Debian packages

using Progress = std::function<void(const std::string& line)>;

// Builds (or rebuilds with force) the offline image for `base` into the cache: as
// root, or without root in a user namespace (mmdebstrap's unshare mode; needs uidmap
// and the user's subordinate ids). Logs commands and their output to log_path.
Status build_offline_image(const std::string& base, bool force, const std::string& log_path,
                           const Progress& progress);

// The seed disk for one VM.
struct SeedContents {
  std::string authorized_key;  // the public key line
  std::string gate_binary;     // host path of the gate executable to install
  std::string broker_args;     // extra arguments for the guest's gate broker
  // Run as root by the guest's provisioning at every boot, before ssh starts (sh -eu);
  // empty: none. The sshfs method mounts the shared repository with it.
  std::string boot_script;
};
Status make_seed_image(const SeedContents& c, const std::string& work_dir,
                       const std::string& image_path, const std::string& log_path);

// Cloud images are provisioned by cloud-init from a NoCloud seed: a FAT volume
// labelled CIDATA holding user-data, meta-data and network-config, made without root
// (mkfs.vfat -C, mcopy). The user-data creates the gate user and installs the same
// provisioning service and broker unit as gate's own image, and starts them; at every
// boot after that the provisioning service reads the GATESEED disk as in gate's own
// image. The NIC is found by its MAC (kGuestMac) and named eth0.
inline constexpr const char* kGuestMac = "52:54:00:67:61:74";
struct CloudInitSeed {
  std::string instance_id;     // stable per VM: cloud-init's per-instance steps run once
  std::string hostname;
  std::string authorized_key;  // the public key line
};
std::string cloud_init_user_data(const CloudInitSeed& s);
std::string cloud_init_meta_data(const CloudInitSeed& s);
std::string cloud_init_network_config();
Status make_cloud_init_seed(const CloudInitSeed& s, const std::string& work_dir,
                            const std::string& image_path, const std::string& log_path);

// The shared libraries a binary needs beyond the C library itself (from ldd), to
// carry into a guest that may not have them.
std::vector<std::string> carried_libraries(const std::string& binary);

}  // namespace gate::vm
