#!/usr/bin/env bash
# The man pages match the binary:
#  - every subcommand that `gate help` lists has a page, man/gate-CMD.1.scd, rendered
#    in the build tree;
#  - every long flag that `gate CMD --help` prints is on its page, and every flag
#    the page documents (an OPTIONS line starting `*--flag*` or `*-f*, *--flag*`)
#    is in --help; so is every GATE_* variable --help names;
#  - gate(1) points at every subcommand's page and documents every GATE_* variable
#    that any --help names;
#  - man(1) renders every page without warnings;
#  - `gate help CMD` shows the page on a terminal and prints --help elsewhere.
#
# Usage: check_man_pages.sh GATE_BINARY MAN_SOURCE_DIR MAN_BUILD_DIR
set -u
gate=$1 src=$2 built=$3

failures=0 checks=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
pass() { checks=$((checks + 1)); }

# Long flags of a --help text: option lines are indented two spaces and start
# with "--name" or "-x [ --name ]"; description lines are indented further.
help_flags() {
  sed -nE 's/^  (-[A-Za-z] \[ )?(--[a-z0-9][a-z0-9-]*).*/\2/p' | sort -u
}
# Flags a page documents: lines of the form *--name* ... or *-x*, *--name* ...
page_flags() {
  sed -nE 's/^\*(-[A-Za-z]\*, \*)?(--[a-z0-9][a-z0-9-]*)\*.*/\2/p' "$1" | sort -u
}

commands=$("$gate" help | awk '/^Commands:/ { t = 1; next } t && /^  [a-z]/ { print $1 } t && /^$/ { exit }')
if [[ -z $commands ]]; then
  echo "FAIL: 'gate help' lists no commands"
  exit 1
fi
echo "subcommands from 'gate help':" $commands

all_env=""
for cmd in $commands; do
  page=$src/gate-$cmd.1.scd
  help=$("$gate" "$cmd" --help 2>&1) || fail "gate $cmd --help exited $?"
  all_env+=" $(grep -oE 'GATE_[A-Z_]+[A-Z]' <<<"$help")"
  if [[ ! -f $page ]]; then
    fail "gate $cmd has no man page: write man/gate-$cmd.1.scd"
    continue
  fi
  pass
  [[ -f $built/man1/gate-$cmd.1 ]] && pass ||
    fail "man/gate-$cmd.1.scd is not rendered in $built/man1 (is scdoc installed? re-run cmake and build gate_man)"

  in_help=$(help_flags <<<"$help")
  on_page=$(page_flags "$page")
  missing=$(comm -23 <(echo "$in_help") <(echo "$on_page"))
  extra=$(comm -13 <(echo "$in_help") <(echo "$on_page"))
  [[ -z $missing ]] && pass || fail "gate $cmd --help has flags its page gate-$cmd.1.scd does not document:" $missing
  [[ -z $extra ]] && pass || fail "gate-$cmd.1.scd documents flags that gate $cmd --help does not list:" $extra
  for var in $(grep -oE 'GATE_[A-Z_]+[A-Z]' <<<"$help" | sort -u); do
    grep -q "$var" "$page" && pass || fail "gate $cmd --help names $var, gate-$cmd.1.scd does not"
  done
  grep -q "^gate-$cmd(1)" "$page" && pass || fail "gate-$cmd.1.scd does not start with its title gate-$cmd(1)"
  grep -q "\*gate-$cmd\*(1)" "$src/gate.1.scd" && pass || fail "gate.1.scd does not refer to *gate-$cmd*(1)"
done

# gate(1) documents every variable (and the ones the mount reads without a flag).
for var in $(echo $all_env GATE_STATE_DIR GATE_RELEASE_ON_FLUSH XDG_STATE_HOME | tr ' ' '\n' | sort -u); do
  grep -q "^\*$var\*" "$src/gate.1.scd" && pass || fail "gate.1.scd has no ENVIRONMENT entry for $var"
done
for section in "HOW LOCKING BEHAVES" ENVIRONMENT FILES "EXIT STATUS" EXAMPLES; do
  grep -q "^# $section" "$src/gate.1.scd" && pass || fail "gate.1.scd has no $section section"
done

# man renders every page without a warning.
if command -v man >/dev/null; then
  for f in "$built"/man1/*.1; do
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$f" 2>&1 >/dev/null)
    [[ -z $warnings ]] && pass || fail "man warns about ${f##*/}: $warnings"
  done
else
  echo "note: man(1) is not installed; pages not rendered through it"
fi

# gate help CMD: --help when stdout is not a terminal, the page on one.
for cmd in $commands; do
  [[ "$("$gate" help "$cmd" 2>&1)" == "$("$gate" "$cmd" --help 2>&1)" ]] && pass ||
    fail "without a terminal, 'gate help $cmd' differs from 'gate $cmd --help'"
done
if command -v man >/dev/null && command -v script >/dev/null && script -qec true /dev/null >/dev/null 2>&1; then
  for cmd in $commands; do
    [[ -f $built/man1/gate-$cmd.1 ]] || continue
    # On the terminal man formats for it (bold by overstrike or SGR); strip that.
    shown=$(MANPAGER=cat PAGER=cat MANWIDTH=80 script -qec "$(printf '%q help %q' "$gate" "$cmd")" /dev/null 2>&1 |
      tr -d '\r' | sed 's/\x1b\[[0-9;]*m//g; s/.\x08//g')
    grep -q "^SYNOPSIS" <<<"$shown" && grep -q "gate-$cmd - " <<<"$shown" && pass ||
      fail "on a terminal, 'gate help $cmd' did not show the page gate-$cmd(1); it printed: $(head -c 300 <<<"$shown")"
  done
else
  echo "note: man(1), script(1) or a pty missing; 'gate help CMD' on a terminal not checked"
fi

echo "$checks passed, $failures failed"
((failures == 0))
