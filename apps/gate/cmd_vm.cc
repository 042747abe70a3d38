// gate vm-list, clean, status, logs, image: looking after what `gate up` started.
#include <sys/xattr.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cstring>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli.h"
#include "client/broker_client.h"
#include "commands.h"
#include "core/iso_time.h"
#include "core/mounts.h"
#include "core/process.h"
#include "mount/gate_fs.h"
#include "vm/image_fetch.h"
#include "vm/stack_state.h"
#include "vm/vm_commands.h"
#include "vm/vm_image.h"
#include "vm/vm_instance.h"

namespace gate::cmd {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

std::string uptime(const StackState& s) {
  auto t = parse_iso8601(s.started_at);
  if (!t) return "?";
  const long secs = static_cast<long>((wall_clock_micros() - *t) / 1'000'000);
  if (secs < 120) return std::to_string(secs) + "s";
  if (secs < 7200) return std::to_string(secs / 60) + "m";
  return std::to_string(secs / 3600) + "h";
}

std::string endpoint(const StackState& s) {
  return s.broker_socket.empty() ? "-" : "unix:" + s.broker_socket;
}

// What the view says of its history (best effort: never a failure of the setup).
std::string history_line(const std::string& mount) {
  char buf[4096];
  ssize_t n = ::getxattr(mount.c_str(), mount::kHistoryXattr, buf, sizeof buf);
  if (n <= 0) return "  note history of replaced versions: off (the mount log says why)\n";
  std::string text = "  ok   history of replaced versions in " + std::string(buf, static_cast<std::size_t>(n)) + "\n";
  n = ::getxattr(mount.c_str(), mount::kHistoryProblemXattr, buf, sizeof buf);
  if (n > 0)
    text += "  note history is best effort; its last miss: " + std::string(buf, static_cast<std::size_t>(n)) + "\n";
  return text;
}

// What the view does with stale replacements, and how often it did (best effort).
std::string stale_line(const std::string& mount) {
  char buf[256];
  const ssize_t n = ::getxattr(mount.c_str(), mount::kStaleXattr, buf, sizeof buf);
  if (n <= 0) return "";
  // "<policy> refused=<n> merged=<n> conflicts=<n>"
  std::istringstream in(std::string(buf, static_cast<std::size_t>(n)));
  std::string policy, field, counts;
  in >> policy;
  if (policy == "off") return "  ok   stale replacements: not checked (--stale-writes off)\n";
  while (in >> field) {
    const auto eq = field.find('=');
    if (eq == std::string::npos) continue;
    counts += (counts.empty() ? "" : ", ") + field.substr(eq + 1) + " " + field.substr(0, eq);
  }
  std::string line = "  ok   stale replacements: " + policy + " (" + counts + ")\n";
  if (field.rfind("conflicts=", 0) == 0 && field != "conflicts=0")
    line += "  note some stale saves could not be merged: gate conflicts\n";
  return line;
}

// Whether read-only opens go straight to the files below (FUSE passthrough).
std::string passthrough_line(const std::string& mount) {
  char buf[512];
  const ssize_t n = ::getxattr(mount.c_str(), mount::kPassthroughXattr, buf, sizeof buf);
  if (n <= 0) return "";
  // "on opens=<n> files=<f> handles=<h> reads=<r> writes=<w>", or the same with "off"
  // and ": <why>"
  const std::string value(buf, static_cast<std::size_t>(n));
  std::istringstream in(value);
  std::string state, opens;
  in >> state >> opens;
  if (state == "on")
    return "  ok   read-only opens read straight from the repository (passthrough; " +
           opens.substr(opens.find('=') + 1) + " so far)\n";
  const auto colon = value.find(": ");
  return "  note read-only opens are read through the view: " +
         (colon == std::string::npos ? value : value.substr(colon + 2)) + "\n";
}

// Becomes `command` (ssh, tail -F: they run until Ctrl-C); returns only on failure.
int exec_command(const char* self, std::vector<std::string> command) {
  std::vector<char*> cargs;
  for (auto& a : command) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  ::execvp(cargs[0], cargs.data());
  return cli::fail(self, "cannot run " + command[0] + ": " + std::strerror(errno));
}

// The setup named by --vm-name, else every one.
std::vector<std::string> selected(const po::variables_map& args) {
  if (args.count("vm-name")) return {args["vm-name"].as<std::string>()};
  return list_stacks();
}

}  // namespace

int vm_list(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("json", po::bool_switch(), "print JSON");
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate vm-list [--json]",
                       "Lists every setup 'gate up' started: its state (running or stale), pids, "
                       "ssh port, broker endpoint, mount and method, and uptime.",
                       &code);
  if (!args) return code;
  json::array rows;
  std::vector<std::vector<std::string>> table{
      {"NAME", "STATE", "PID", "SSH", "BROKER", "MOUNT", "METHOD", "UPTIME"}};
  for (const auto& name : list_stacks()) {
    auto s = load_stack(name);
    if (!s) continue;
    const std::string state = vm::vm_liveness(*s);
    const std::string pid = s->mode == "vm" ? s->get("qemu_pid") : std::to_string(s->broker_pid);
    const std::string method = s->mode == "vm" ? s->get("method") : "local";
    json::object o;
    o["name"] = name;
    o["state"] = state;
    o["pid"] = pid;
    o["ssh_port"] = s->get("ssh_port");
    o["broker"] = endpoint(*s);
    o["mount"] = s->mount;
    o["method"] = method;
    o["started_at"] = s->started_at;
    o["uptime"] = uptime(*s);
    rows.push_back(o);
    table.push_back({name, state, pid, s->get("ssh_port").empty() ? "-" : s->get("ssh_port"),
                     endpoint(*s), s->mount, method, uptime(*s)});
  }
  if ((*args)["json"].as<bool>()) {
    std::cout << json::serialize(rows) << "\n";
    return 0;
  }
  if (rows.empty()) {
    std::cout << "no VMs or local setups (start one with 'gate up')\n";
    return 0;
  }
  cli::print_table(table, std::cout);
  return 0;
}

int clean(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("vm-name", po::value<std::string>(), "which setup (default: every one that is not running)")
      ("logs", po::bool_switch(), "also delete its logs")
      ("state", po::bool_switch(), "also delete its state directory (known_hosts, sockets)")
      ("all", po::bool_switch(), "every setup");
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate clean [--vm-name NAME] [--logs] [--state] [--all]",
                       "Repairs what a crash left behind: lazily unmounts dead mounts, stops "
                       "orphaned tunnels and mount processes, removes dead pid files and runtime "
                       "state. It never deletes your files.",
                       &code);
  if (!args) return code;
  auto names = selected(*args);
  if (names.empty()) std::cout << "gate: nothing to clean\n";
  for (const auto& name : names) {
    if (auto s = load_stack(name)) {
      for (const auto& line : vm::clean_stack(*s)) std::cout << "gate: " << line << "\n";
    } else {
      std::cout << "gate: '" << name << "' has no runtime state\n";
    }
    std::error_code ec;
    if ((*args)["logs"].as<bool>() && fs::remove_all(stack_log_dir(name), ec) > 0)
      std::cout << "gate: deleted the logs of '" << name << "'\n";
    if ((*args)["state"].as<bool>() && !load_stack(name) && fs::remove_all(stack_state_dir(name), ec) > 0)
      std::cout << "gate: deleted the state of '" << name << "'\n";
  }
  return 0;
}

int status(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("vm-name", po::value<std::string>(), "which setup (default: all)");
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate status [--vm-name NAME]",
                       "Checks each part of a setup (VM, tunnel, broker, mount) and says what is "
                       "wrong and how to fix it. Exits 1 when something is wrong.",
                       &code);
  if (!args) return code;
  auto names = selected(*args);
  if (names.empty()) {
    std::cout << "no VMs or local setups (start one with 'gate up')\n";
    return 0;
  }
  bool all_ok = true;
  for (const auto& name : names) {
    auto s = load_stack(name);
    if (!s) {
      std::cout << name << ": not up\n";
      continue;
    }
    std::cout << name << " (" << (s->mode == "vm" ? s->get("method") : "local") << "):\n";
    auto line = [&](bool ok, const std::string& what, const std::string& fix) {
      std::cout << "  " << (ok ? "ok   " : "FAIL ") << what;
      if (!ok) std::cout << " -> " << fix;
      std::cout << "\n";
      all_ok &= ok;
    };
    if (s->mode == "vm") {
      line(vm::qemu_running(*s), "VM (qemu pid " + s->get("qemu_pid") + ")",
           "the VM is gone: 'gate clean --vm-name " + name + "' then 'gate up'");
      line(process_alive(s->get_int("tunnel_pid")), "ssh tunnel (pid " + s->get("tunnel_pid") + ")",
           "'gate down --vm-name " + name + "' and 'gate up' again");
      if (s->get("method") == "sshfs")
        line(process_runs(s->get_int("virtiofsd_pid"), s->get("virtiofs_socket")),
             "virtiofsd sharing " + s->repo + " (pid " + s->get("virtiofsd_pid") + ")",
             "'gate down --vm-name " + name + "' and 'gate up' again");
    } else {
      line(process_alive(s->broker_pid), "broker (pid " + std::to_string(s->broker_pid) + ")",
           "'gate down' and 'gate up --local' again");
    }
    if (!s->broker_socket.empty()) {
      BrokerEndpoint ep;
      ep.unix_socket = s->broker_socket;
      BrokerClient client(ep, std::chrono::seconds(3));
      line(client.healthy(), "broker answers at " + endpoint(*s), "see the logs: gate logs --vm-name " + name);
    }
    const MountState m = mount_state(s->mount);
    line(m == MountState::Mounted, "view mounted at " + s->mount,
         m == MountState::Stale ? "the mount died: 'gate clean --vm-name " + name + "'"
                                : "not mounted: 'gate down' and 'gate up' again");
    if (m == MountState::Mounted && s->get("method") != "sshfs")
      std::cout << history_line(s->mount) << stale_line(s->mount) << passthrough_line(s->mount);
  }
  return all_ok ? 0 : 1;
}

int logs(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("vm-name", po::value<std::string>(), "which setup (default: the only one)")
      ("component", po::value<std::string>()->default_value(""),
       "vm, serial, ssh, tunnel, broker, mount, virtiofsd, provision, image, or cloud-init (the "
       "guest's cloud-init output, for cloud images) (default: all but cloud-init)")
      ("follow,f", po::bool_switch(), "keep printing as the log grows (Ctrl-C ends)")
      ("lines,n", po::value<int>()->default_value(40), "how many last lines of each log");
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate logs [--vm-name NAME] [--component C] [--follow]",
                       "Prints the logs of a setup, kept in $XDG_STATE_HOME/gate/logs/NAME/.", &code);
  if (!args) return code;
  std::string name;
  if (args->count("vm-name")) {
    name = (*args)["vm-name"].as<std::string>();
  } else {
    std::vector<std::string> dirs;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(user_state_root() + "/logs", ec)) dirs.push_back(e.path().filename());
    if (dirs.size() != 1) {
      std::cerr << argv[0] << ": say which with --vm-name (" << dirs.size() << " have logs)\n";
      return 2;
    }
    name = dirs.front();
  }
  const std::string dir = stack_log_dir(name);
  std::vector<std::string> files;
  const std::string component = (*args)["component"].as<std::string>();
  const std::string lines = std::to_string((*args)["lines"].as<int>());
  if (component == "cloud-init") {
    // It lives in the guest: read over ssh while the VM runs.
    auto setup = load_stack(name);
    if (!setup || setup->mode != "vm" || !vm::qemu_running(*setup))
      return cli::fail(argv[0], "cloud-init's output is in the guest, and " + name +
                                    "'s VM is not running; the console log ('gate logs --component serial') "
                                    "has what cloud-init printed");
    if (setup->get("base").empty())
      return cli::fail(argv[0], name + " boots gate's own image, which has no cloud-init");
    const std::string log = "/var/log/cloud-init-output.log";
    std::vector<std::string> ssh = vm::ssh_command(
        vm::ssh_target_of(*setup),
        (*args)["follow"].as<bool>()
            ? "exec tail -n " + lines + " -F " + log
            : "cloud-init status --long 2>&1; echo '==> guest " + log + " <=='; tail -n " + lines + " " + log);
    // A terminal for the remote tail, so that Ctrl-C ends it there too.
    if ((*args)["follow"].as<bool>() && ::isatty(STDIN_FILENO) && ::isatty(STDOUT_FILENO))
      ssh.insert(ssh.begin() + 1, "-tt");
    return exec_command(argv[0], ssh);
  }
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec))
    if (component.empty() || e.path().stem() == component) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  // The guest's broker logs to the guest's journal: fetch it while the VM runs.
  auto setup = load_stack(name);
  const bool guest = setup && setup->mode == "vm" && vm::qemu_running(*setup) &&
                     (component.empty() || component == "broker");
  if (guest && !(*args)["follow"].as<bool>()) {
    RunResult r = run_command(
        vm::ssh_command(vm::ssh_target_of(*setup),
                        "journalctl -u gate-broker -u gate-provision --no-pager -n " + lines),
        std::chrono::seconds(30));
    std::cout << "==> guest journal: gate-broker, gate-provision <==\n" << r.output;
  }
  if (files.empty() && !guest) return cli::fail(argv[0], "no logs in " + dir + (component.empty() ? "" : " for " + component));
  if ((*args)["follow"].as<bool>()) {
    std::vector<std::string> tail = {"tail", "-n", lines, "-F"};
    tail.insert(tail.end(), files.begin(), files.end());
    return exec_command(argv[0], tail);
  }
  for (const auto& f : files)
    std::cout << "==> " << f << " <==\n" << tail_file(f, (*args)["lines"].as<int>());
  return 0;
}

int image(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()
      ("action", po::value<std::string>()->default_value("build"), "build or path")
      ("base", po::value<std::string>()->default_value("debian-12"),
       "which image: debian-12 (built here), ubuntu-24.04, ubuntu-22.04, debian-12-cloud (downloaded)")
      ("image-mirror", po::value<std::string>()->default_value(""),
       "a mirror laid out like the cloud image publisher's site, instead of the publisher "
       "(env GATE_IMAGE_MIRROR)")
      ("force", po::bool_switch(), "rebuild even if cached (debian-12)");
  po::positional_options_description pos;
  pos.add("action", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc,
                         "gate image [build|path] [--base debian-12|ubuntu-24.04|ubuntu-22.04|debian-12-cloud] "
                         "[--image-mirror URL] [--force]",
                         "Builds the guest image gate up boots (Debian 12 from Debian's packages), or "
                         "downloads a cloud image and verifies it against its publisher's checksums; "
                         "or prints where it is cached.",
                         &code, &pos);
  if (!args) return code;
  const std::string base = (*args)["base"].as<std::string>();
  const std::string action = (*args)["action"].as<std::string>();
  if (action != "build" && action != "path")
    return cli::fail(argv[0], "unknown action '" + action + "' (build or path)"), 2;
  if (!vm::known_base(base))
    return cli::fail(argv[0], "unknown --base '" + base + "' (" + vm::kBaseNames + ")"), 2;
  if (vm::is_cloud_base(base)) {
    auto image = vm::cloud_image(base, (*args)["image-mirror"].as<std::string>());
    if (Result<vm::Url> u = vm::parse_url(image->url); !u.ok())
      return cli::fail(argv[0], "--image-mirror: " + u.message()), 2;
    vm::FetchOptions o;
    o.cache_dir = vm::cloud_cache_dir(base);
    if (action == "path") {
      const vm::CachePaths at = vm::cache_paths(*image, o.cache_dir);
      std::cout << at.image.string() << "\n";
      return fs::exists(at.image) && fs::exists(at.sum) ? 0 : 1;
    }
    o.tty = ::isatty(STDERR_FILENO) == 1;
    o.progress = &std::cerr;
    o.say = [](const std::string& l) { std::cerr << "gate: " << l << "\n" << std::flush; };
    Result<std::string> got = vm::fetch_cloud_image(*image, o);
    if (!got.ok()) return cli::fail(argv[0], got.message());
    std::cout << *got << "\n";
    return 0;
  }
  if (action == "path") {
    std::cout << vm::cached_image(base).disk << "\n";
    return vm::cached_image(base).complete() ? 0 : 1;
  }
  std::error_code ec;
  const std::string log = vm::image_cache_root() + "/build.log";
  fs::create_directories(vm::image_cache_root(), ec);
  auto progress = [](const std::string& l) { std::cout << "gate: " << l << "\n" << std::flush; };
  Status built = vm::build_offline_image(base, (*args)["force"].as<bool>(), log, progress);
  if (!built.ok()) return cli::fail(argv[0], built.message());
  std::cout << vm::cached_image(base).disk << "\n";
  return 0;
}

}  // namespace gate::cmd
