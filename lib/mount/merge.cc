#include "mount/merge.h"

#include <git2.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace gate::mount {

namespace {

// Conflict markers this long are as good as never in a file.
constexpr unsigned short kMarker = 31;

// libgit2 set up once for this file's functions (its init is counted).
void use_libgit2() {
  struct Libgit2 {
    Libgit2() { git_libgit2_init(); }
    ~Libgit2() { git_libgit2_shutdown(); }
  };
  static Libgit2 lib;
}

git_merge_file_input input(const std::string& s) {
  git_merge_file_input in;
  git_merge_file_input_init(&in, GIT_MERGE_FILE_INPUT_VERSION);
  in.ptr = s.data();
  in.size = s.size();
  return in;
}

struct Merged {
  bool ok = false;
  bool clean = false;
  std::string text;
};

Merged run(const std::string& base, const std::string& theirs, const std::string& mine,
           git_merge_file_favor_t favor, unsigned flags) {
  git_merge_file_input b = input(base), o = input(theirs), t = input(mine);
  git_merge_file_options opts;
  git_merge_file_options_init(&opts, GIT_MERGE_FILE_OPTIONS_VERSION);
  opts.favor = favor;
  opts.flags = flags;
  opts.marker_size = kMarker;
  git_merge_file_result out{};
  Merged m;
  if (git_merge_file(&out, &b, &o, &t, &opts) != 0) return m;
  m.ok = true;
  m.clean = out.automergeable != 0;
  if (out.ptr) m.text.assign(out.ptr, out.len);
  git_merge_file_result_free(&out);
  return m;
}

bool is_marker(const std::string& line, char c) {
  if (line.size() < kMarker) return false;
  for (unsigned i = 0; i < kMarker; ++i)
    if (line[i] != c) return false;
  return line.size() == kMarker || line[kMarker] == ' ' || line[kMarker] == '\n';
}

// Whether every conflict in a diff3-style output has an empty base part (both
// sides only added lines there).
bool only_additions_conflict(const std::string& diff3) {
  enum { Outside, Ours, Base, Theirs } at = Outside;
  std::size_t pos = 0;
  while (pos < diff3.size()) {
    std::size_t nl = diff3.find('\n', pos);
    const std::string line = diff3.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos + 1);
    pos = nl == std::string::npos ? diff3.size() : nl + 1;
    if (at == Outside && is_marker(line, '<')) at = Ours;
    else if (at == Ours && is_marker(line, '|')) at = Base;
    else if ((at == Ours || at == Base) && is_marker(line, '=')) at = Theirs;
    else if (at == Theirs && is_marker(line, '>')) at = Outside;
    else if (at == Base) return false;  // a line of the base both sides changed
  }
  return at == Outside;
}

}  // namespace

bool looks_binary(const std::string& content) {
  return std::memchr(content.data(), '\0', std::min<std::size_t>(content.size(), 8000)) != nullptr;
}

MergeResult merge3(const std::string& base, const std::string& theirs, const std::string& mine) {
  use_libgit2();
  using Kind = MergeResult::Kind;
  auto not_merged = [](Kind kind, const char* why) { return MergeResult{kind, "", why}; };
  if (looks_binary(base) || looks_binary(theirs) || looks_binary(mine))
    return not_merged(Kind::Binary, "binary content is not merged");
  // "ours" to libgit2 is theirs here: in a union, its lines come first.
  Merged m = run(base, theirs, mine, GIT_MERGE_FILE_FAVOR_NORMAL, GIT_MERGE_FILE_STYLE_DIFF3);
  if (!m.ok) return not_merged(Kind::Failed, "libgit2 could not merge");
  if (m.clean) return {Kind::Clean, std::move(m.text), ""};
  if (!only_additions_conflict(m.text)) return not_merged(Kind::Conflict, "both sides changed the same lines");
  Merged u = run(base, theirs, mine, GIT_MERGE_FILE_FAVOR_UNION, GIT_MERGE_FILE_STYLE_MERGE);
  if (!u.ok) return not_merged(Kind::Failed, "libgit2 could not merge");
  return {Kind::Clean, std::move(u.text), ""};
}

std::optional<std::pair<std::size_t, std::size_t>> line_stats(const std::string& before,
                                                              const std::string& after) {
  if (looks_binary(before) || looks_binary(after)) return std::nullopt;
  use_libgit2();
  git_diff_options opts;
  git_diff_options_init(&opts, GIT_DIFF_OPTIONS_VERSION);
  opts.context_lines = 0;  // counted lines are the same; less to build
  git_patch* patch = nullptr;
  if (git_patch_from_buffers(&patch, before.data(), before.size(), nullptr, after.data(),
                             after.size(), nullptr, &opts) != 0)
    return std::nullopt;
  std::size_t added = 0, removed = 0;
  git_patch_line_stats(nullptr, &added, &removed, patch);
  git_patch_free(patch);
  return std::make_pair(added, removed);
}

std::size_t changed_lines(const std::string& a, const std::string& b) {
  const auto stats = line_stats(a, b);
  return stats ? stats->first + stats->second : SIZE_MAX;
}

}  // namespace gate::mount
