#pragma once
// IgnoreRules: which keys the history leaves out. Always .git/, the root's and any
// nested repository's (git keeps its own history); and, when the mount's root is a git work tree, what its ignore rules
// (.gitignore files, .git/info/exclude, core.excludesFile) ignore, such as build
// outputs, as libgit2 reads them. Thread-safe.
#include <memory>
#include <mutex>
#include <string>

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
};

}  // namespace gate::mount
