#pragma once
// A setup with the broker on this machine (`gate up --local`): a broker on a Unix
// socket and a locked mount of one directory, both in the background, recorded as
// a StackState so that gate down, vm-list, status and clean find them.
#include <iosfwd>
#include <string>

#include "vm/stack_commands.h"
#include "vm/stack_state.h"

namespace gate::vm {

struct LocalOptions {
  std::string repo_path;
  std::string name;        // default: the directory's name
  std::string host_mount;  // default: <state root>/mounts/<name>
  LockSettings locks;
  std::string gate_binary;  // the gate executable to run the daemons with
};

// Brings the setup up, or says it is up already. Returns the exit code (0, or 1
// with the reason on err, having stopped whatever it started).
int local_up(const LocalOptions& o, std::ostream& out, std::ostream& err);

// Stops what a local setup started, whatever state it is in; true when nothing is
// left (the mount may stay when it cannot be unmounted).
bool local_down(const StackState& s, std::ostream& err);

// Where to work, how to see the locks, where the logs are, how to stop.
void print_local_summary(const StackState& s, const std::string& headline, std::ostream& out);

}  // namespace gate::vm
