#include "mount/ignore_rules.h"

#include <git2.h>

namespace gate::mount {

IgnoreRules::IgnoreRules(const std::string& root, bool use_git) {
  git_libgit2_init();  // counted, like every libgit2 user's
  // Only the root itself: a directory inside another repository is not that
  // repository's business here.
  if (use_git && git_repository_open_ext(&repo_, root.c_str(), GIT_REPOSITORY_OPEN_NO_SEARCH,
                                         nullptr) != 0)
    repo_ = nullptr;
}

IgnoreRules::~IgnoreRules() {
  if (repo_) git_repository_free(repo_);
  git_libgit2_shutdown();
}

bool IgnoreRules::ignored(const std::string& key) {
  // Any repository's own directory, the root's or a nested one's (submodules,
  // repositories made inside the tree).
  if (key == ".git" || key.rfind(".git/", 0) == 0 || key.find("/.git/") != std::string::npos ||
      (key.size() > 5 && key.compare(key.size() - 5, 5, "/.git") == 0))
    return true;
  if (!repo_) return false;
  std::lock_guard guard(m_);
  const auto now = std::chrono::steady_clock::now();
  if (now - recent_since_ > std::chrono::seconds(1) || recent_.size() > 10'000) {
    recent_.clear();
    recent_since_ = now;
  }
  if (auto it = recent_.find(key); it != recent_.end()) return it->second;
  int ignored = 0;
  if (git_ignore_path_is_ignored(&ignored, repo_, key.c_str()) != 0) return false;
  return recent_[key] = ignored != 0;
}

}  // namespace gate::mount
