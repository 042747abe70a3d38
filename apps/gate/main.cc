// gate: one executable, subcommands from one table.
#include <cstring>
#include <iostream>
#include <string>

#include "commands.h"
#include "gate/version.h"

namespace {

struct Command {
  const char* name;
  const char* help;
  int (*run)(int argc, char** argv);
};

constexpr Command kCommands[] = {
    {"broker", "run the lock broker (HTTP API, state in SQLite)", gate::cmd::broker},
    {"locks", "show the locks held and the requests waiting at a broker", gate::cmd::locks},
    {"mount", "show a directory through a locked FUSE view", gate::cmd::mount},
    {"up", "start a broker (in a VM, or --local) and a locked view of a directory", gate::cmd::up},
    {"down", "stop what 'gate up' started", gate::cmd::down},
    {"vm-list", "list the VMs and local setups 'gate up' started", gate::cmd::vm_list},
    {"status", "check a setup's VM, tunnel, broker and mount", gate::cmd::status},
    {"logs", "print a setup's logs", gate::cmd::logs},
    {"clean", "repair what a crash left: dead mounts, orphaned tunnels, stale state", gate::cmd::clean},
    {"image", "build the guest image 'gate up' boots", gate::cmd::image},
};

void usage(std::ostream& out) {
  out << "Usage: gate <command> [options]\n\n"
         "gate makes concurrent edits of one repository safe: every open of a file through\n"
         "a gate mount holds a FIFO read/write lock from the broker until it is closed.\n\n"
         "Commands:\n";
  for (const auto& c : kCommands) {
    std::string name = c.name;
    name.resize(10, ' ');
    out << "  " << name << c.help << "\n";
  }
  out << "\n'gate <command> --help' describes a command; 'gate --version' prints the version.\n";
}

const Command* find(const char* name) {
  for (const auto& c : kCommands)
    if (std::strcmp(c.name, name) == 0) return &c;
  return nullptr;
}

int run(const Command& c, int argc, char** argv) {
  std::string name = std::string("gate ") + c.name;
  argv[0] = name.data();
  return c.run(argc, argv);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(std::cerr);
    return 2;
  }
  const std::string first = argv[1];
  if (first == "--version" || first == "version") {
    std::cout << "gate " << gate::kVersion << " (build " << gate::kBuild << ")\n";
    return 0;
  }
  if (first == "-h" || first == "--help") {
    usage(std::cout);
    return 0;
  }
  if (first == "help") {
    if (argc < 3) {
      usage(std::cout);
      return 0;
    }
    const Command* c = find(argv[2]);
    if (!c) {
      std::cerr << "gate: no command '" << argv[2] << "'\n";
      return 2;
    }
    char help_flag[] = "--help";
    char* args[] = {argv[2], help_flag, nullptr};
    return run(*c, 2, args);
  }
  const Command* c = find(argv[1]);
  if (!c) {
    std::cerr << "gate: no command '" << first << "'\n\n";
    usage(std::cerr);
    return 2;
  }
  return run(*c, argc - 1, argv + 1);
}
