#include "vm/stack_state.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <map>

#include "core/config.h"
#include "core/files.h"

namespace gate {

namespace fs = std::filesystem;

std::string stack_state_dir(const std::string& name) { return user_state_root() + "/state/" + name; }
std::string stack_log_dir(const std::string& name) { return user_state_root() + "/logs/" + name; }
std::string StackState::state_dir() const { return stack_state_dir(name); }
std::string StackState::log_dir() const { return stack_log_dir(name); }

std::string StackState::get(const std::string& key) const {
  auto it = extra.find(key);
  return it == extra.end() ? "" : it->second;
}

int StackState::get_int(const std::string& key) const {
  try {
    return std::stoi(get(key));
  } catch (const std::exception&) {
    return -1;
  }
}

std::string stack_name_for(const std::string& repo_path) {
  std::string base = fs::path(repo_path).lexically_normal().filename().string();
  if (base.empty()) base = fs::path(repo_path).lexically_normal().parent_path().filename().string();
  if (base.empty()) base = "root";
  for (auto& c : base)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '-';
  return base;
}

Status save_stack(const StackState& s) {
  std::error_code ec;
  fs::create_directories(s.state_dir(), ec);
  const std::string path = s.state_dir() + "/up.env";
  std::ostringstream out;
  out << "name=" << s.name << "\nmode=" << s.mode << "\nrepo=" << s.repo << "\nmount=" << s.mount
      << "\nbroker_socket=" << s.broker_socket << "\nbroker_state_dir=" << s.broker_state_dir
      << "\nbroker_pid=" << s.broker_pid << "\nmount_pid=" << s.mount_pid << "\nstarted_at=" << s.started_at << "\n";
  for (const auto& [k, v] : s.extra) out << k << "=" << v << "\n";
  return replace_file(path, out.str());
}

std::optional<StackState> load_stack(const std::string& name) {
  std::ifstream in(stack_state_dir(name) + "/up.env");
  if (!in) return std::nullopt;
  std::map<std::string, std::string> kv;
  std::string line;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq != std::string::npos) kv[line.substr(0, eq)] = line.substr(eq + 1);
  }
  StackState s;
  s.name = kv["name"].empty() ? name : kv["name"];
  s.mode = kv["mode"];
  s.repo = kv["repo"];
  s.mount = kv["mount"];
  s.broker_socket = kv["broker_socket"];
  s.broker_state_dir = kv["broker_state_dir"];
  s.started_at = kv["started_at"];
  for (const auto& [k, v] : kv)
    if (k != "name" && k != "mode" && k != "repo" && k != "mount" && k != "broker_socket" &&
        k != "broker_state_dir" && k != "broker_pid" && k != "mount_pid" && k != "started_at")
      s.extra[k] = v;
  try {
    s.broker_pid = std::stoi(kv["broker_pid"]);
    s.mount_pid = std::stoi(kv["mount_pid"]);
  } catch (const std::exception&) {
    return std::nullopt;
  }
  return s;
}

std::vector<std::string> list_stacks() {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(user_state_root() + "/state", ec))
    if (fs::exists(e.path() / "up.env")) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

void remove_stack_state(const std::string& name) {
  std::error_code ec;
  fs::remove(stack_state_dir(name) + "/up.env", ec);
}

}  // namespace gate
