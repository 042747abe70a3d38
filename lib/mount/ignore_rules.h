#pragma once
// IgnoreRules: which keys the history leaves out. Always .git/, the root's and any
// nested repository's (git keeps its own history); and, when the mount's root is a git work tree, what its ignore rules
// (.gitignore files, .git/info/exclude, core.excludesFile) ignore, such as build
// outputs, as libgit2 reads them. Answers are remembered for a second (a save asks
// twice: before the change and when it is recorded), so a changed .gitignore counts
// from at most a second later. Thread-safe.
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

struct git_repository;

namespace gate::mount {

class IgnoreRules {
 public:
  // `root`: the mount's source directory; `use_git`: honour the repository's rules.
  IgnoreRules(const std::string& root, bool use_git);
  ~IgnoreRules();
  IgnoreRules(const IgnoreRules&) = delete;
  IgnoreRules& operator=(const IgnoreRules&) = delete;

  bool ignored(const std::string& key);
  bool has_repository() const { return repo_ != nullptr; }

 private:
  std::mutex m_;
  git_repository* repo_ = nullptr;
  std::unordered_map<std::string, bool> recent_;  // answers since recent_since_ (m_)
  std::chrono::steady_clock::time_point recent_since_{};
};

}  // namespace gate::mount
