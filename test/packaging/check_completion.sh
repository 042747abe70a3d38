#!/usr/bin/env bash
# packaging/gate.bash-completion completes subcommands, flags and setup names.
# Runs the completion function the way bash does (COMP_WORDS/COMP_CWORD), once
# without bash-completion's helpers and, where that package is installed, once
# with them.
#
# Usage: check_completion.sh GATE_BINARY COMPLETION_FILE
set -u
gate=$1 completion=$2

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/bin" "$tmp/state/gate/state/alpha" "$tmp/state/gate/state/beta"
ln -s "$(readlink -f "$gate")" "$tmp/bin/gate"

run_checks() {  # $1: "plain" or "bash-completion"
  PATH="$tmp/bin:$PATH" XDG_STATE_HOME="$tmp/state" bash --norc --noprofile -s "$1" "$completion" <<'EOF'
mode=$1
if [[ $mode == bash-completion ]]; then
  source /usr/share/bash-completion/bash_completion || exit 3
fi
source "$2" || exit 3
failures=0 checks=0
# expect "WORDS..." -- words that must all be offered
expect() {
  local line=$1; shift
  read -ra COMP_WORDS <<<"$line"
  [[ $line == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMP_LINE=$line COMP_POINT=${#line}
  COMPREPLY=()
  _gate gate "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
  local want got=" ${COMPREPLY[*]} "
  for want in "$@"; do
    if [[ $want == !* ]]; then
      [[ $got != *" ${want#!} "* ]] && { checks=$((checks+1)); continue; }
    elif [[ $got == *" $want "* ]]; then
      checks=$((checks+1)); continue
    fi
    echo "FAIL ($mode): completing '$line' should offer $want; got:$got"
    failures=$((failures+1))
  done
}
expect "gate " broker mount locks up down help
expect "gate br" broker '!mount'
expect "gate -" --help --version
expect "gate help " broker mount up
expect "gate broker --st" --state-dir
expect "gate broker --" --port --unix-socket --allow-remote --ready-fd --help '!--broker-port'
expect "gate mount -" --root --mount --foreground --broker-socket --no-locking
expect "gate locks --" --json --broker-host --vm-name
expect "gate locks --vm-name a" alpha '!beta'
expect "gate run --" --agent --help
expect "gate " run history show restore log
expect "gate log --" --since --agent --json
expect "gate mount --hist" --history-dir --history-max-file --history-max-bytes --history-keep-ignored
expect "gate broker --log-level " debug info warn error
expect "gate broker --sync f" full '!normal'
expect "gate down --vm-name " alpha beta
expect "gate down a" alpha '!beta'
expect "gate up --vm-name b" beta
expect "gate mount --lease-ms " '!--root'
echo "$mode: $checks passed, $failures failed"
((failures == 0))
EOF
}

status=0
run_checks plain || status=1
if [[ -f /usr/share/bash-completion/bash_completion ]]; then
  run_checks bash-completion || status=1
else
  echo "note: bash-completion is not installed; checked without its helpers only"
fi
exit $status
