#!/usr/bin/env bash
# How fast a view is, in one run, side by side:
#   native  the directory itself
#   pthp    libfuse's reference passthrough_hp in its cached mode, when PASSTHROUGH_HP
#           names its binary (built from example/passthrough_hp.cc at the tag of the
#           system libfuse)
#   pthpx   the same passthrough_hp built with -DHAVE_SETXATTR, when PASSTHROUGH_HP_XATTR
#           names it: it passes extended attributes through, as gate does (the anchor
#           answers ENOSYS once and the kernel stops asking, so ls -l's two xattr
#           questions per entry cost it nothing)
#   plain   gate mount --no-locking (FUSE's cost without the broker's)
#   locked  gate mount, the only mount on its broker (Unix socket, --no-history)
#   two     gate mount, one of two mounts of one directory on one broker
#   lockw   gate mount --passthrough-writes, the only mount on its broker: files its
#           opens create or truncate are written straight to the directory too
# Rows: 2,000 files of 4 KiB created and read back (files/s); a 5,000-file tree made
# (files/s), then find and ls -lR of it (warm, s), git add -A and git status of it (s);
# sequential write (fsync included) and read through a new open (MiB/s); open+close of
# one file (per s). The last columns give locked's speed as a share of pthp's (pthpx's)
# and of plain's (for times: their time over locked's).
# Usage: bench/mount_bench.sh [path/to/gate]   (as root)
#   BENCH_MB=512 sequential size; BENCH_ROUNDS=1 rounds (the median is shown; the
#   targets' order rotates each round so that none always goes first).
set -euo pipefail

GATE=$(realpath "${1:-build/default/apps/gate/gate}")
ROUNDS=${BENCH_ROUNDS:-1}
MB=${BENCH_MB:-512}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

c++ -O2 -std=c++17 -o "$WORK/mount_bench" "$HERE/mount_bench.cc"
B="$WORK/mount_bench"
ulimit -n "$(ulimit -Hn)"

mount_gate() {  # NAME ROOT MOUNTPOINT [ARGS...]: a gate mount, ready when this returns
  local name=$1 root=$2 mnt=$3
  shift 3
  mkdir -p "$root" "$mnt"
  "$GATE" mount --foreground --root "$root" --mount "$mnt" --log-level warn --no-history \
    --ready-fd 3 "$@" 3>"$WORK/ready-$name" 2>"$WORK/mount-$name.log" &
  PIDS+=($!)
  MOUNT_PID[$name]=$!
  MOUNTS+=("$mnt")
  wait_for "$WORK/ready-$name"
}

declare -A DIR=([native]="$WORK/native")
declare -A MOUNT_PID
mkdir -p "$WORK/native"
TARGETS=(native)
mount_pthp() {  # NAME BINARY: passthrough_hp in its cached mode, a target
  local name=$1 bin=$2
  mkdir -p "$WORK/root-$name" "$WORK/mnt-$name"
  "$bin" --foreground "$WORK/root-$name" "$WORK/mnt-$name" 2>"$WORK/mount-$name.log" &
  PIDS+=($!)
  MOUNTS+=("$WORK/mnt-$name")
  for _ in $(seq 1 200); do
    mountpoint -q "$WORK/mnt-$name" && break
    sleep 0.1
  done
  mountpoint -q "$WORK/mnt-$name" || { echo "$bin did not mount" >&2; exit 1; }
  DIR[$name]="$WORK/mnt-$name"
  TARGETS+=("$name")
  SHARES+=("$name")
}
SHARES=()  # the targets locked is compared with, in the last columns
if [ -n "${PASSTHROUGH_HP:-}" ]; then mount_pthp pthp "$PASSTHROUGH_HP"; fi
if [ -n "${PASSTHROUGH_HP_XATTR:-}" ]; then mount_pthp pthpx "$PASSTHROUGH_HP_XATTR"; fi
SHARES+=(plain)
mount_gate plain "$WORK/root-plain" "$WORK/mnt-plain" --no-locking
DIR[plain]="$WORK/mnt-plain"
start_broker
mount_gate locked "$WORK/root-locked" "$WORK/mnt-locked" --broker-socket "$WORK/broker.sock"
DIR[locked]="$WORK/mnt-locked"
# The two-mount case has a broker of its own, so the locked one stays the only client
# of its broker.
mkdir -p "$WORK/state2"
"$GATE" broker --state-dir "$WORK/state2" --port 0 --unix-socket "$WORK/broker2.sock" \
  --log-level warn --ready-fd 3 3>"$WORK/broker2.port" 2>"$WORK/broker2.log" &
PIDS+=($!)
wait_for "$WORK/broker2.port"
mount_gate two "$WORK/root-two" "$WORK/mnt-two" --broker-socket "$WORK/broker2.sock"
mount_gate two-b "$WORK/root-two" "$WORK/mnt-two-b" --broker-socket "$WORK/broker2.sock"
DIR[two]="$WORK/mnt-two"
mkdir -p "$WORK/state3"
"$GATE" broker --state-dir "$WORK/state3" --port 0 --unix-socket "$WORK/broker3.sock" \
  --log-level warn --ready-fd 3 3>"$WORK/broker3.port" 2>"$WORK/broker3.log" &
PIDS+=($!)
wait_for "$WORK/broker3.port"
mount_gate lockw "$WORK/root-lockw" "$WORK/mnt-lockw" --broker-socket "$WORK/broker3.sock" \
  --passthrough-writes
DIR[lockw]="$WORK/mnt-lockw"
TARGETS+=(plain locked two lockw)
# Whether the views read (and lockw writes) straight from below: FUSE passthrough
# needs Linux 6.9+ and root.
for t in plain locked lockw; do
  printf '%s: passthrough %s\n' "$t" \
    "$(python3 -c 'import os,sys; print(os.getxattr(sys.argv[1], "user.gate.passthrough").decode())' "${DIR[$t]}")"
done

ROWS=(create read tree find ls gitadd gitstatus seqwrite seqread openclose)
declare -A LABEL=(
  [create]="small-file create, files/s" [read]="small-file read, files/s"
  [tree]="tree create, files/s" [find]="find warm, s" [ls]="ls -lR warm, s"
  [gitadd]="git add -A (5,000 files), s" [gitstatus]="git status, s"
  [seqwrite]="sequential write, MiB/s" [seqread]="sequential read, MiB/s"
  [openclose]="open+close of one file, /s")
declare -A IS_TIME=([find]=1 [ls]=1 [gitadd]=1 [gitstatus]=1)
declare -A GOT  # "row target" -> the figures of every round

seconds() {  # CMD...: its wall time in seconds, output dropped
  local t0=$EPOCHREALTIME
  "$@" >/dev/null 2>&1
  awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'
}
note() { GOT["$1 $2"]+="$3 "; }

measure() {  # TARGET: every row once
  local t=$1 d=${DIR[$1]} v
  rm -rf "$d/s" "$d/t" "$d/big"
  mkdir "$d/s" "$d/t"
  read -r c r < <("$B" small "$d/s" 2000 4096)
  note create "$t" "$c"
  note read "$t" "$r"
  note tree "$t" "$("$B" tree "$d/t" 50 100)"
  find "$d/t" >/dev/null
  note find "$t" "$(seconds find "$d/t")"
  ls -lR "$d/t" >/dev/null
  note ls "$t" "$(seconds ls -lR "$d/t")"
  git -C "$d/t" init -q
  note gitadd "$t" "$(seconds git -C "$d/t" add -A)"
  git -C "$d/t" status >/dev/null
  note gitstatus "$t" "$(seconds git -C "$d/t" status)"
  read -r w r < <("$B" seq "$d/big" "$MB")
  note seqwrite "$t" "$w"
  note seqread "$t" "$r"
  note openclose "$t" "$("$B" openclose "$d/s/f0" 20000)"
  # Every file a view has seen costs it a descriptor until the kernel forgets it.
  rm -rf "$d/s" "$d/t" "$d/big"
}

echo "== gate mount benchmark ($(nproc) cores, $ROUNDS round(s), median shown; $(date -u +%F))"
for round in $(seq 1 "$ROUNDS"); do
  n=${#TARGETS[@]}
  for k in $(seq 0 $((n - 1))); do
    t=${TARGETS[$(((k + round - 1) % n))]}
    printf 'round %d: %s\n' "$round" "$t" >&2
    measure "$t"
  done
done

median() { tr ' ' '\n' | grep . | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A MED
for row in "${ROWS[@]}"; do
  for t in "${TARGETS[@]}"; do MED["$row $t"]=$(median <<<"${GOT["$row $t"]}"); done
done
share() {  # ROW OTHER: locked's speed as a share of OTHER's, in %
  local a=${MED["$1 locked"]} b=${MED["$1 $2"]:-}
  [ -n "$b" ] || { echo "-"; return; }
  if [ -n "${IS_TIME[$1]:-}" ]; then
    awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.0f%%", 100 * b / a; else printf "-" }'
  else
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.0f%%", 100 * a / b; else printf "-" }'
  fi
}
header="| metric |"
rule="|---|"
for t in "${TARGETS[@]}"; do header+=" $t |"; rule+="---|"; done
for o in "${SHARES[@]}"; do header+=" locked/$o |"; rule+="---|"; done
echo "$header"
echo "$rule"
for row in "${ROWS[@]}"; do
  line="| ${LABEL[$row]} |"
  for t in "${TARGETS[@]}"; do line+=" ${MED["$row $t"]} |"; done
  for o in "${SHARES[@]}"; do line+=" $(share "$row" "$o") |"; done
  echo "$line"
done
if [ "$ROUNDS" -gt 1 ]; then
  echo "-- every round"
  for row in "${ROWS[@]}"; do
    for t in "${TARGETS[@]}"; do printf '%-10s %-7s %s\n' "$row" "$t" "${GOT["$row $t"]}"; done
  done
fi

# The daemon needs two descriptors per open file (handle + inode), so the hard limit
# caps how many handles fit: 10,000, or as many as fit.
HANDLES=$(( ($(ulimit -Hn) - 300) / 2 ))
[ "$HANDLES" -gt 10000 ] && HANDLES=10000
# A fresh mount: every file a view has seen costs it a descriptor until the kernel
# forgets it.
fusermount3 -u "$WORK/mnt-locked"
wait "${MOUNT_PID[locked]}" 2>/dev/null || true
mount_gate locked2 "$WORK/root-locked" "$WORK/mnt-locked" --broker-socket "$WORK/broker.sock"
mkdir -p "$WORK/mnt-locked/h"
coproc HOLD { "$B" hold "$WORK/mnt-locked/h" "$HANDLES"; }
read -r _ <&"${HOLD[0]}"
rss=$(awk '/VmRSS/ {print $2, $3}' "/proc/${MOUNT_PID[locked2]}/status")
locks=$(curl -s --unix-socket "$WORK/broker.sock" http://localhost/v1/locks/status | grep -o '"lock_id"' | wc -l || true)
echo "-- the locked mount with $HANDLES files open: RSS $rss; gate locks shows $locks locks"
exec {HOLD[1]}>&-
wait "$HOLD_PID" 2>/dev/null || true
