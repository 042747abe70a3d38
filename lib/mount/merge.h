#pragma once
// Three-way merge of a stale replacement (locking.md, "Stale replacement"), on
// libgit2's git_merge_file (xdiff, as git itself merges).
//
// - theirs: the file's current content (what another agent wrote); mine: what the
//   stale agent wrote; base: what that agent had read.
// - Changes on one side only are taken. Lines added by both sides at the same place
//   (a conflict whose base part is empty) are both kept, theirs first, as git's
//   union merge keeps them: that is not a conflict.
// - Anything else both sides changed is a conflict: nothing is merged (the caller
//   installs mine and keeps theirs in the history).
// - Binary content (a NUL byte in the first 8,000 bytes of any side, git's test)
//   is never merged.
#include <cstddef>
#include <optional>
#include <string>
#include <utility>

namespace gate::mount {

struct MergeResult {
  enum class Kind { Clean, Conflict, Binary, Failed };
  Kind kind = Kind::Failed;
  std::string text;  // Clean: the merged content
  std::string why;   // otherwise: a line for the log
};

MergeResult merge3(const std::string& base, const std::string& theirs, const std::string& mine);

// Lines added and removed from `before` to `after` (libgit2's diff); nullopt for
// binary content, or when libgit2 cannot diff.
std::optional<std::pair<std::size_t, std::size_t>> line_stats(const std::string& before,
                                                              const std::string& after);

// Lines added plus lines removed from `a` to `b` (how far apart two contents are);
// SIZE_MAX when line_stats() has no answer.
std::size_t changed_lines(const std::string& a, const std::string& b);

bool looks_binary(const std::string& content);

}  // namespace gate::mount
