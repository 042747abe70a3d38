// merge3: what a stale replacement's merge keeps, case by case.
#include <catch2/catch.hpp>

#include "mount/merge.h"

using gate::mount::changed_lines;
using gate::mount::merge3;
using Kind = gate::mount::MergeResult::Kind;

TEST_CASE("merge3: changes on different lines are both kept", "[unit][merge]") {
  const std::string base = "a\nb\nc\nd\ne\nf\ng\n";
  const std::string theirs = "A\nb\nc\nd\ne\nf\ng\n";
  const std::string mine = "a\nb\nc\nd\ne\nf\nG\n";
  auto r = merge3(base, theirs, mine);
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == "A\nb\nc\nd\ne\nf\nG\n");
}

TEST_CASE("merge3: lines both sides added at the same place are both kept, theirs first",
          "[unit][merge]") {
  const std::string base = "one\ntwo\n";
  auto r = merge3(base, base + "theirs\n", base + "mine\n");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == "one\ntwo\ntheirs\nmine\n");
  // In the middle, several lines each, and one more change elsewhere.
  r = merge3("h\n1\n2\nt\n", "H\n1\nx1\nx2\n2\nt\n", "h\n1\ny1\n2\nt\n");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == "H\n1\nx1\nx2\ny1\n2\nt\n");
  // The same line added by both: once.
  r = merge3(base, base + "same\n", base + "same\n");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == base + "same\n");
}

TEST_CASE("merge3: the same line changed by both sides is a conflict", "[unit][merge]") {
  auto r = merge3("x = 1\ny = 2\n", "x = 10\ny = 2\n", "x = 100\ny = 2\n");
  CHECK(r.kind == Kind::Conflict);
  CHECK(r.text.empty());
  // A line removed by one side and changed by the other, too.
  r = merge3("a\nb\nc\n", "a\nc\n", "a\nB\nc\n");
  CHECK(r.kind == Kind::Conflict);
}

TEST_CASE("merge3: unchanged sides and empty files", "[unit][merge]") {
  CHECK(merge3("a\n", "a\n", "b\n").text == "b\n");
  CHECK(merge3("a\n", "b\n", "a\n").text == "b\n");
  auto r = merge3("", "theirs\n", "mine\n");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == "theirs\nmine\n");
  // No newline at the end of a side.
  r = merge3("a\nb", "a\nb\nc", "z\na\nb");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == "z\na\nb\nc");
}

TEST_CASE("merge3: binary content is never merged", "[unit][merge]") {
  const std::string bin("\x7f" "ELF\0\0\1", 7);
  CHECK(merge3(bin, bin + "x", bin + "y").kind == Kind::Binary);
  CHECK(merge3("text\n", "text\n" + bin, "text\nmine\n").kind == Kind::Binary);
}

TEST_CASE("merge3: a line that looks like a short conflict marker is content", "[unit][merge]") {
  const std::string base = "<<<<<<< x\n=======\n>>>>>>> y\n";
  auto r = merge3(base, base + "t\n", base + "m\n");
  REQUIRE(r.kind == Kind::Clean);
  CHECK(r.text == base + "t\nm\n");
}

TEST_CASE("changed_lines counts lines added and removed", "[unit][merge]") {
  CHECK(changed_lines("a\nb\n", "a\nb\n") == 0);
  CHECK(changed_lines("a\nb\n", "a\nB\n") == 2);
  CHECK(changed_lines("a\n", "a\nb\nc\n") == 2);
  CHECK(changed_lines("a\nb\nc\n", "") == 3);
}
