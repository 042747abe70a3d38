// gate history, gate show: the versions a mount kept of a file, and their content.
#include <fcntl.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <boost/json.hpp>

#include <cstring>
#include <functional>
#include <filesystem>
#include <iostream>

#include "cli.h"
#include "commands.h"
#include "core/files.h"
#include "core/iso_time.h"
#include "core/mounts.h"
#include "mount/gate_fs.h"
#include "mount/history_store.h"
#include "mount/merge.h"

namespace gate::cmd {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

// Which history a path belongs to, and its key there.
struct Target {
  std::string dir;   // the history store
  std::string key;   // relative to the view's root
  std::string file;  // the file as it is now (through the view), empty when unknown
};

// Whether `path` is `dir` or inside it; *rel is the rest ("" for dir itself).
bool under(const std::string& path, const std::string& dir, std::string* rel) {
  if (path == dir) {
    rel->clear();
    return true;
  }
  if (path.size() <= dir.size() || path.compare(0, dir.size(), dir) != 0) return false;
  if (dir != "/" && path[dir.size()] != '/') return false;
  *rel = path.substr(dir == "/" ? 1 : dir.size() + 1);
  return true;
}

// A path inside a gate view (or inside the directory a view shows) names its key;
// with --history-dir, a path outside every view is taken as the key itself.
Result<Target> locate(const std::string& path, const po::variables_map& args) {
  std::error_code ec;
  fs::path abs = fs::absolute(path, ec).lexically_normal();
  // The directory part resolved (symlinks, ..), the name as given (it may be gone).
  if (fs::path parent = fs::weakly_canonical(abs.parent_path(), ec); !ec)
    abs = parent / abs.filename();
  const std::string text = abs.string();
  for (const GateView& v : gate_views()) {
    Target t;
    if (under(text, v.mountpoint, &t.key)) {
      t.file = text;
    } else if (under(text, v.root, &t.key)) {
      t.file = t.key.empty() ? v.mountpoint : v.mountpoint + "/" + t.key;
    } else {
      continue;
    }
    // The view itself says where its history is, after writing it out (a mount
    // writes its index in batches).
    char buf[4096];
    const ssize_t n = ::getxattr(v.mountpoint.c_str(), mount::kHistoryXattr, buf, sizeof buf);
    if (args.count("history-dir")) t.dir = args["history-dir"].as<std::string>();
    else if (n > 0) t.dir.assign(buf, static_cast<std::size_t>(n));
    else t.dir = default_history_dir(v.root);
    return t;
  }
  if (args.count("history-dir")) {
    Target t;
    t.dir = args["history-dir"].as<std::string>();
    t.key = fs::path(path).lexically_normal().string();
    if (t.key.rfind("./", 0) == 0) t.key.erase(0, 2);
    return t;
  }
  return Status::failure(path + " is not inside a gate view (no mount of 'gate mount' or "
                                "'gate up' shows it); for a view that is down, give "
                                "--history-dir DIR and the path relative to the repository");
}

Result<std::unique_ptr<mount::HistoryStore>> open_history(const Target& t) {
  if (!fs::exists(t.dir + "/history.db"))
    return Status::failure("no history at " + t.dir +
                           " (a mount keeps one from the first version it replaces)");
  return mount::HistoryStore::open({.dir = t.dir});
}

// The content of entry i: its kept copy, or for the newest version the file now.
std::optional<std::string> content_of(const std::vector<mount::HistoryEntry>& v, std::size_t i,
                                      mount::HistoryStore& store, const Target& t) {
  if (!v[i].blob.empty()) return store.content(v[i].blob);
  if (i + 1 == v.size() && !t.file.empty() && v[i].event != "unlink") return read_file(t.file);
  return std::nullopt;
}

std::string when(Micros t) { return t ? format_iso8601(t).substr(0, 19) + "Z" : "-"; }

void add_history_dir_option(po::options_description& desc) {
  desc.add_options()("history-dir", po::value<std::string>(),
                     "the history to read; default: that of the view the path is in");
}

}  // namespace

int history(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("path", po::value<std::string>(), "the file (in a gate view)")
      ("json", po::bool_switch(), "print JSON");
  add_history_dir_option(desc);
  po::positional_options_description pos;
  pos.add("path", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate history [--json] PATH",
                         "Lists the versions a gate mount kept of a file: number, time, agent, "
                         "how it was made, size and lines added/removed. 'gate show PATH@N' "
                         "prints one.",
                         &code, &pos);
  if (!args) return code;
  if (!args->count("path")) return cli::fail(argv[0], "which file? gate history PATH"), 2;
  auto target = locate((*args)["path"].as<std::string>(), *args);
  if (!target.ok()) return cli::fail(argv[0], target.message());
  if (target->key.empty())
    return cli::fail(argv[0], "that is the view's root; name a file (or see gate log)");
  auto store = open_history(*target);
  if (!store.ok()) return cli::fail(argv[0], store.message());
  auto versions = (*store)->versions(target->key);
  if (!versions.ok()) return cli::fail(argv[0], versions.message());
  if (versions->empty())
    return cli::fail(argv[0], "no versions of " + target->key + " in " + target->dir +
                                  " (nothing replaced it through the mount yet)");
  json::array rows;
  std::vector<std::vector<std::string>> table{
      {"VERSION", "TIME", "AGENT", "PID", "COMMAND", "HOW", "SIZE", "LINES", "KEPT"}};
  std::optional<std::string> previous;
  for (std::size_t i = 0; i < versions->size(); ++i) {
    const auto& e = (*versions)[i];
    auto content = content_of(*versions, i, **store, *target);
    std::optional<std::pair<std::size_t, std::size_t>> stats;
    if (content && previous) stats = mount::line_stats(*previous, *content);
    const std::int64_t size = content ? static_cast<std::int64_t>(content->size()) : e.size;
    json::object o;
    o["version"] = e.version;
    o["made_at"] = e.made_at ? json::value(format_iso8601(e.made_at)) : json::value(nullptr);
    o["agent"] = e.by.agent.empty() ? json::value(nullptr) : json::value(e.by.agent);
    o["pid"] = e.by.pid ? json::value(e.by.pid) : json::value(nullptr);
    o["command"] = e.by.command.empty() ? json::value(nullptr) : json::value(e.by.command);
    o["how"] = e.event.empty() ? json::value(nullptr) : json::value(e.event);
    o["size"] = size >= 0 ? json::value(size) : json::value(nullptr);
    o["lines_added"] = stats ? json::value(stats->first) : json::value(nullptr);
    o["lines_removed"] = stats ? json::value(stats->second) : json::value(nullptr);
    o["kept"] = content.has_value();
    rows.push_back(std::move(o));
    std::string lines = "-";
    if (stats) lines = "+" + std::to_string(stats->first) + " -" + std::to_string(stats->second);
    else if (content && previous) lines = "binary";
    table.push_back({std::to_string(e.version), when(e.made_at ? e.made_at : e.kept_at),
                     e.by.agent.empty() ? "-" : e.by.agent,
                     e.by.pid ? std::to_string(e.by.pid) : "-",
                     e.by.command.empty() ? "-" : e.by.command, e.event.empty() ? "-" : e.event,
                     size >= 0 ? std::to_string(size) : "-", lines,
                     content ? (e.blob.empty() ? "now" : "yes") : "no"});
    if (content) previous = std::move(content);
  }
  if ((*args)["json"].as<bool>()) {
    std::cout << json::serialize(rows) << "\n";
    return 0;
  }
  std::cout << target->key << " (history in " << target->dir << "):\n";
  cli::print_table(table, std::cout);
  return 0;
}

namespace {

// One version of one file, as PATH@VERSION names it.
struct Picked {
  std::string spec, path;
  std::uint64_t version = 0;
  Target target;
  std::string content;
};

// Parses the PATH@VERSION argument and finds the content; a failure is the
// message, with *usage set for a malformed argument.
Result<Picked> pick(const po::variables_map& args, bool* usage) {
  Picked p;
  p.spec = args["spec"].as<std::string>();
  const auto at = p.spec.rfind('@');
  try {
    std::size_t used = 0;
    if (at == std::string::npos || at == 0 || at + 1 >= p.spec.size() || p.spec[at + 1] == '-')
      throw std::invalid_argument("no @N");
    p.version = std::stoull(p.spec.substr(at + 1), &used);
    if (used != p.spec.size() - at - 1) throw std::invalid_argument("junk");
  } catch (const std::exception&) {
    *usage = true;
    return Status::failure("'" + p.spec + "' is not PATH@VERSION (a version number from " +
                           "'gate history PATH')");
  }
  p.path = p.spec.substr(0, at);
  auto target = locate(p.path, args);
  if (!target.ok()) return target.status();
  p.target = *target;
  auto store = open_history(p.target);
  if (!store.ok()) return store.status();
  auto versions = (*store)->versions(p.target.key);
  if (!versions.ok()) return versions.status();
  const std::string what = "version " + std::to_string(p.version) + " of " + p.target.key;
  for (std::size_t i = 0; i < versions->size(); ++i) {
    if ((*versions)[i].version != p.version) continue;
    auto content = content_of(*versions, i, **store, p.target);
    if (!content)
      return Status::failure(what + " is no longer kept (the history keeps at most "
                                    "--history-max-bytes, oldest first)");
    p.content = std::move(*content);
    return p;
  }
  return Status::failure("no " + what + " was kept; 'gate history " + p.path +
                         "' lists those there are");
}

int picked_or_fail(const char* me, const Result<Picked>& p, bool usage) {
  return cli::fail(me, p.message()), usage ? 2 : 1;
}

// "90s", "15m", "2h", "3d" -> microseconds; nullopt otherwise.
std::optional<Micros> parse_duration(const std::string& text) {
  if (text.size() < 2) return std::nullopt;
  const char unit = text.back();
  const std::string digits = text.substr(0, text.size() - 1);
  if (digits.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  const Micros n = std::stoll(digits);
  switch (unit) {
    case 's': return n * 1'000'000;
    case 'm': return n * 60'000'000;
    case 'h': return n * 3'600'000'000LL;
    case 'd': return n * 86'400'000'000LL;
  }
  return std::nullopt;
}

// Whether `key` is `scope` or under it ("" and "." are the whole view).
bool in_scope(const std::string& key, const std::string& scope) {
  if (scope.empty() || scope == ".") return true;
  return key == scope || (key.size() > scope.size() && key.compare(0, scope.size(), scope) == 0 &&
                          key[scope.size()] == '/');
}

// --since DURATION as a point in time (0 without it); false when malformed.
bool since_option(const po::variables_map& args, Micros* since) {
  *since = 0;
  if (!args.count("since")) return true;
  auto d = parse_duration(args["since"].as<std::string>());
  if (!d) return false;
  *since = wall_clock_micros() - *d;
  return true;
}

void add_spec_option(po::options_description& desc, po::positional_options_description& pos) {
  desc.add_options()("spec", po::value<std::string>(), "PATH@VERSION");
  add_history_dir_option(desc);
  pos.add("spec", 1);
}

// Writes the picked content back through the view: an O_TRUNC save, so the mount
// takes the write lock (after the holders before it), keeps what it replaces and
// records the new version.
int write_back(const char* me, const Picked& p) {
  if (p.target.file.empty())
    return cli::fail(me, "restoring writes through the view, and no view of " + p.path +
                             " is mounted; mount it (gate up) or use: gate show " + p.spec +
                             " > FILE");
  const std::string& file = p.target.file;
  int fd = ::open(file.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return cli::fail(me, "cannot open " + file + ": " + std::strerror(errno));
  if (!write_all_at(fd, p.content)) {
    const int err = errno;
    ::close(fd);
    return cli::fail(me, "writing " + file + " failed: " + std::strerror(err) +
                             " (what it replaced is in the history: gate history " + p.path + ")");
  }
  if (::close(fd) != 0) return cli::fail(me, "closing " + file + " failed: " + std::strerror(errno));
  std::cout << "restored " << p.target.key << " to the content of version " << p.version << " ("
            << p.content.size() << " bytes), as a new version\n";
  return 0;
}

// The shared front of show and restore: parse PATH@VERSION, find its content,
// then `act` on it.
int with_version(int argc, char** argv, const std::string& synopsis, const std::string& about,
                 const std::function<int(const Picked&)>& act) {
  po::options_description desc("Options");
  po::positional_options_description pos;
  add_spec_option(desc, pos);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, synopsis, about, &code, &pos);
  if (!args) return code;
  if (!args->count("spec")) return cli::fail(argv[0], "which version? " + synopsis), 2;
  bool usage = false;
  auto p = pick(*args, &usage);
  if (!p.ok()) return picked_or_fail(argv[0], p, usage);
  return act(*p);
}

}  // namespace

int show(int argc, char** argv) {
  const char* me = argv[0];
  return with_version(
      argc, argv, "gate show PATH@VERSION",
      "Prints a version of a file that a gate mount kept (see gate history) to standard output.",
      [me](const Picked& p) {
        if (::isatty(STDOUT_FILENO) && mount::looks_binary(p.content))
          return cli::fail(me, "version " + std::to_string(p.version) + " of " + p.target.key +
                                   " is binary; send it to a file: gate show " + p.spec + " > FILE");
        std::cout.write(p.content.data(), static_cast<std::streamsize>(p.content.size()));
        std::cout.flush();
        return std::cout ? 0 : 1;
      });
}

int restore(int argc, char** argv) {
  const char* me = argv[0];
  return with_version(
      argc, argv, "gate restore PATH@VERSION",
      "Writes a version that a gate mount kept back to the file, through the view: under its "
      "write lock, as a new version, with the content it replaces kept in the history "
      "(restoring loses nothing).",
      [me](const Picked& picked) { return write_back(me, picked); });
}

int log_changes(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("path", po::value<std::string>()->default_value("."),
                     "a directory in the view (default: the current one)")
      ("since", po::value<std::string>(), "only changes this recent: 90s, 15m, 2h, 3d")
      ("agent", po::value<std::string>(), "only changes by this agent")
      ("json", po::bool_switch(), "print JSON");
  add_history_dir_option(desc);
  po::positional_options_description pos;
  pos.add("path", 1);
  int code = 0;
  auto args = cli::parse(argc, argv, desc, "gate log [--since DURATION] [--agent NAME] [PATH]",
                         "Lists the changes made through a gate view, newest first: when, which "
                         "file and version, by which agent, process and command, and how.",
                         &code, &pos);
  if (!args) return code;
  Micros since = 0;
  if (!since_option(*args, &since))
    return cli::fail(argv[0], "--since takes a duration such as 90s, 15m, 2h or 3d"), 2;
  const std::string agent = args->count("agent") ? (*args)["agent"].as<std::string>() : "";
  auto target = locate((*args)["path"].as<std::string>(), *args);
  if (!target.ok()) return cli::fail(argv[0], target.message());
  auto store = open_history(*target);
  if (!store.ok()) return cli::fail(argv[0], store.message());
  auto changes = (*store)->changes(since, agent);
  if (!changes.ok()) return cli::fail(argv[0], changes.message());
  json::array rows;
  std::vector<std::vector<std::string>> table{
      {"TIME", "PATH", "VERSION", "AGENT", "PID", "COMMAND", "HOW"}};
  for (const auto& e : *changes) {
    if (!in_scope(e.key, target->key)) continue;
    json::object o;
    o["time"] = format_iso8601(e.made_at);
    o["path"] = e.key;
    o["version"] = e.version;
    o["agent"] = e.by.agent;
    o["pid"] = e.by.pid;
    o["command"] = e.by.command;
    o["how"] = e.event;
    rows.push_back(std::move(o));
    table.push_back({when(e.made_at), e.key, std::to_string(e.version), e.by.agent,
                     std::to_string(e.by.pid), e.by.command, e.event});
  }
  if ((*args)["json"].as<bool>()) {
    std::cout << json::serialize(rows) << "\n";
    return 0;
  }
  if (rows.empty()) {
    std::cout << "no changes" << (agent.empty() ? "" : " by " + agent)
              << (since ? " in that time" : "") << " (history in " << target->dir << ")\n";
    return 0;
  }
  cli::print_table(table, std::cout);
  return 0;
}

int conflicts(int argc, char** argv) {
  po::options_description desc("Options");
  desc.add_options()("path", po::value<std::string>()->default_value("."),
                     "a file or directory in the view (default: the current directory)")
      ("since", po::value<std::string>(), "only those this recent: 90s, 15m, 2h, 3d")
      ("all", po::bool_switch(), "the merged stale replacements too, not only the conflicts")
      ("json", po::bool_switch(), "print JSON");
  add_history_dir_option(desc);
  po::positional_options_description pos;
  pos.add("path", 1);
  int code = 0;
  auto args = cli::parse(
      argc, argv, desc, "gate conflicts [--since DURATION] [--all] [--json] [PATH]",
      "Lists the stale replacements a gate view could not merge, newest first: a save over a "
      "file that another agent had changed since the saving agent read it, where both changed "
      "the same lines (or the content was binary, too large, or its base was no longer kept). "
      "The saving agent's content was installed; the version it replaced is in the history. "
      "Each line says how to see both sides with gate show.",
      &code, &pos);
  if (!args) return code;
  Micros since = 0;
  if (!since_option(*args, &since))
    return cli::fail(argv[0], "--since takes a duration such as 90s, 15m, 2h or 3d"), 2;
  auto target = locate((*args)["path"].as<std::string>(), *args);
  if (!target.ok()) return cli::fail(argv[0], target.message());
  auto store = open_history(*target);
  if (!store.ok()) return cli::fail(argv[0], store.message());
  const bool all = (*args)["all"].as<bool>();
  auto saves = (*store)->stale_saves(since, "", all);
  if (!saves.ok()) return cli::fail(argv[0], saves.message());
  json::array rows;
  std::vector<std::vector<std::string>> table{
      {"TIME", "PATH", "AGENT", "PID", "VERSION", "REPLACED", "BASE", "OUTCOME"}};
  std::vector<std::string> notes;
  for (const auto& s : *saves) {
    if (!in_scope(s.key, target->key)) continue;
    json::object o;
    o["time"] = format_iso8601(s.at);
    o["path"] = s.key;
    o["agent"] = s.by.agent;
    o["pid"] = s.by.pid;
    o["command"] = s.by.command;
    o["version"] = s.version;
    o["replaced_version"] = s.theirs;
    o["base_version"] = s.base ? json::value(s.base) : json::value(nullptr);
    o["merged"] = s.merged;
    o["reason"] = s.merged ? json::value(nullptr) : json::value(s.reason);
    rows.push_back(std::move(o));
    table.push_back({when(s.at), s.key, s.by.agent, std::to_string(s.by.pid),
                     std::to_string(s.version), std::to_string(s.theirs),
                     s.base ? std::to_string(s.base) : "-", s.merged ? "merged" : "conflict"});
    if (!s.merged)
      notes.push_back(s.key + "@" + std::to_string(s.version) + ": " + s.reason +
                      "; the other side: gate show " + s.key + "@" + std::to_string(s.theirs) +
                      ", what " + s.by.agent + " wrote: gate show " + s.key + "@" +
                      std::to_string(s.version));
  }
  if ((*args)["json"].as<bool>()) {
    std::cout << json::serialize(rows) << "\n";
    return 0;
  }
  if (rows.empty()) {
    std::cout << "no " << (all ? "stale replacements" : "conflicts")
              << (since ? " in that time" : "") << " (history in " << target->dir << ")\n";
    return 0;
  }
  cli::print_table(table, std::cout);
  for (const auto& n : notes) std::cout << "  " << n << "\n";
  return 0;
}

}  // namespace gate::cmd
