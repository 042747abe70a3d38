#pragma once
// VmInstance: one gate VM, from `gate up` to `gate down`. The broker runs in the
// guest (isolated from the host); the host reaches it through an SSH tunnel and
// shows the repository either with a host FUSE mount ("host-direct", default) or
// with sshfs onto a gate mount inside the guest ("sshfs").
//
// Every step says what it does; a failing step names itself, its log file and the
// log's last lines, and stops what this run started (unless keep_on_error).
#include <cstdint>
#include <functional>
#include <iosfwd>
#include <optional>
#include <string>

#include "vm/stack_commands.h"
#include "vm/stack_state.h"
#include "vm/vm_commands.h"

namespace gate::vm {

struct VmOptions {
  std::string repo_path;
  std::string name = "gate-vm";
  std::string vm_dir;         // default: <state root>/vms/<name>
  std::string ssh_key;        // a .pub; default: gate's own key pair
  std::string base = "debian-12";
  std::string image;          // a disk built by gate image build (kernel beside it)
  std::string image_mirror;   // cloud bases: a mirror of the publisher's site
  std::string host_mount;     // default: <state root>/mounts/<name>
  std::string method = "host-direct";  // or sshfs
  std::uint16_t ssh_port = 0;  // 0: a free one
  int memory_mib = 1024;
  int cpus = 2;
  std::string disk_size = "20G";
  LockSettings locks;  // passed to the guest's broker and to the mounts
  std::string accel = "auto";
  bool redownload = false;
  bool skip_build = false;
  bool skip_host_mount = false;
  bool verbose = false;
  bool dry_run = false;
  bool keep_vm_on_error = false;
  int ssh_wait_s = 300;
  std::string gate_binary;  // the gate executable to install in the guest
};

// Brings the VM up (or reports it is already up). Returns the exit code.
int vm_up(const VmOptions& o, std::ostream& out, std::ostream& err);

struct DownOptions {
  bool skip_unmount = false;  // leave the host view mounted
  int shutdown_timeout_s = 30;
};
// Stops a VM stack; true when everything stopped.
bool vm_down(const StackState& s, const DownOptions& o, std::ostream& out, std::ostream& err);

// running: qemu runs; stale: state left behind by something that died.
std::string vm_liveness(const StackState& s);
bool qemu_running(const StackState& s);

// Repairs what a crash left: dead mounts, dead pids, orphaned tunnels. Never
// deletes a user's files. Returns lines describing what it did.
std::vector<std::string> clean_stack(const StackState& s);

SshTarget ssh_target_of(const StackState& s);

}  // namespace gate::vm
