// gate: one executable, subcommands from one table.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
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
    {"history", "list the versions a mount kept of a file (who made each, lines changed)",
     gate::cmd::history},
    {"show", "print a version of a file that a mount kept (PATH@VERSION)", gate::cmd::show},
    {"restore", "write a kept version back through the view, as a new version", gate::cmd::restore},
    {"log", "list the changes made through a view, newest first (--since, --agent)",
     gate::cmd::log_changes},
    {"conflicts", "list the stale saves a view could not merge, with both sides", gate::cmd::conflicts},
    {"mount", "show a directory through a locked FUSE view", gate::cmd::mount},
    {"run", "run a command as a named agent (GATE_AGENT), whose opens gate attributes to it",
     gate::cmd::run},
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
  out << "\n'gate help <command>' shows a command's manual page, 'gate <command> --help' its\n"
         "options; 'gate --version' prints the version.\n";
}

const Command* find(const char* name) {
  for (const auto& c : kCommands)
    if (std::strcmp(c.name, name) == 0) return &c;
  return nullptr;
}

// `gate help CMD` on a terminal shows the man page gate-CMD(1): the one beside
// this executable (BIN/../share/man/man1 when installed, build/man/man1 in the
// build tree), else the one `man` finds in MANPATH. It does not return when man
// runs; it returns when stdout is not a terminal, or man or the page is missing,
// and the caller prints --help instead.
void exec_man_page(const std::string& command) {
  if (!::isatty(STDOUT_FILENO)) return;
  namespace fs = std::filesystem;
  const std::string page = "gate-" + command + ".1";
  std::error_code ec;
  const fs::path bin = fs::read_symlink("/proc/self/exe", ec).parent_path();
  if (!ec)
    for (const fs::path& dir : {bin / "../share/man/man1", bin / "../../man/man1"})
      for (const char* suffix : {"", ".gz"})
        if (const fs::path file = (dir / (page + suffix)).lexically_normal(); fs::is_regular_file(file, ec)) {
          ::execlp("man", "man", "-l", file.c_str(), static_cast<char*>(nullptr));
          return;  // no man(1)
        }
  // Ask man quietly whether MANPATH has the page, so a miss prints nothing.
  const std::string name = "gate-" + command;
  pid_t pid = ::fork();
  if (pid < 0) return;
  if (pid == 0) {
    int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, STDOUT_FILENO);
    ::dup2(null, STDERR_FILENO);
    ::execlp("man", "man", "-w", name.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  if (::waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0)
    ::execlp("man", "man", name.c_str(), static_cast<char*>(nullptr));
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
    exec_man_page(c->name);
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
