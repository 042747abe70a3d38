#pragma once
// Agents' reads and saves through a real mount, as real processes with their own
// GATE_AGENT do them (see agents-io.md): for the stale replacement tests.
#include <sys/xattr.h>

#include <string>

#include "support/mount_fixture.h"

namespace gate::test {

struct AgentRun {
  int status = -1;
  std::string out;  // stdout and stderr
};

// Runs `script` with `sh -c` as agent `agent`; $1 is `file`, $2 `text`.
inline AgentRun as(const std::string& agent, const std::string& script, const std::string& file,
                   const std::string& text = "") {
  TempDir tmp("gate-agent");
  AgentRun r;
  Child c = Child::spawn({"env", "GATE_AGENT=" + agent, "sh", "-c", script, "sh", file, text},
                         tmp.path() + "/out");
  r.status = c.wait(60s);
  r.out = read_file(tmp.path() + "/out");
  return r;
}

// The same, for its exit status only.
inline int as_status(const std::string& agent, const std::string& script, const std::string& file,
                     const std::string& text = "") {
  return as(agent, script, file, text).status;
}

inline const char* kRead = "cat \"$1\" >/dev/null";
inline const char* kSave = "printf %s \"$2\" > \"$1\"";  // O_TRUNC in place
inline const char* kRenameSave = "printf %s \"$2\" > \"$1.tmp.$$\" && mv \"$1.tmp.$$\" \"$1\"";

// `gate history --json` of `path`, from the history in `dir`.
inline boost::json::array history_of(const std::string& dir, const std::string& path) {
  std::string out;
  INFO(out);
  REQUIRE(sh(gate_binary() + " history --json --history-dir '" + dir + "' '" + path + "'", &out,
             20s) == 0);
  return boost::json::parse(out).as_array();
}

// `gate show` of `path`@`version`, from the history in `dir`.
inline std::string show(const std::string& dir, const std::string& path, std::uint64_t version) {
  std::string out;
  const int rc = sh(gate_binary() + " show --history-dir '" + dir + "' '" + path + "@" +
                        std::to_string(version) + "'",
                    &out, 20s);
  INFO(out);
  CHECK(rc == 0);
  return out;
}

// What the view says of its stale replacements (user.gate.stale on its root).
inline std::string stale_xattr(const Mount& m) {
  char buf[256];
  const ssize_t n = ::getxattr(m.mnt().c_str(), "user.gate.stale", buf, sizeof buf);
  return n < 0 ? "" : std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace gate::test
