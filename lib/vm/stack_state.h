#pragma once
// What `gate up` started (a local broker and mount, or a VM with its tunnel and
// mount), so that `gate down`, `clean`, `vm-list` and `status` can find it. Its state lives in
// $XDG_STATE_HOME/gate/state/<name>/up.env, its logs in
// $XDG_STATE_HOME/gate/logs/<name>/ (broker.log, mount.log).
#include <sys/types.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"

namespace gate {

struct StackState {
  std::string name;
  std::string mode = "local";
  std::string repo;
  std::string mount;
  std::string broker_socket;
  std::string broker_state_dir;
  pid_t broker_pid = -1;
  pid_t mount_pid = -1;
  std::string started_at;
  std::map<std::string, std::string> extra;  // VM settings: ssh_port, qemu_pid, method...

  std::string get(const std::string& key) const;
  int get_int(const std::string& key) const;  // -1 when absent

  std::string state_dir() const;  // .../state/<name>
  std::string log_dir() const;    // .../logs/<name>
};

std::string stack_state_dir(const std::string& name);
std::string stack_log_dir(const std::string& name);
// A name from a directory: its base name, with characters outside [A-Za-z0-9._-]
// replaced by '-'.
std::string stack_name_for(const std::string& repo_path);

Status save_stack(const StackState& s);
std::optional<StackState> load_stack(const std::string& name);
std::vector<std::string> list_stacks();
void remove_stack_state(const std::string& name);

}  // namespace gate
