#!/usr/bin/env bash
# The cost of `gate mount`, in one run: the native directory, the mount with locking
# (broker on its Unix socket; --no-history), the same with the history of replaced
# versions on ("hist"), and the mount with --no-locking, which separates FUSE's cost
# from the broker's.
#   (a) create+write+close of 2,000 4 KiB files, then open+read+close of them
#   (a2) rewrite of 1,000 4 KiB files, twice each (O_TRUNC saves: what history costs)
#   (a3) the same saves with and without history, interleaved: its cost in one figure
#   (d) git add of a 5,000-file tree made through the mount
#   (b) sequential write and read of a 1 GiB file (dd, 1 MiB blocks)
#   (c) git status and find . -type f | xargs stat on a 10,000-file tree
#   plus open+close per second of one file, and the mount's RSS with 10,000 open handles.
# Usage: bench/mount_bench.sh [path/to/gate [path/to/baseline/gate]]
#   (as root; BENCH_MB=256 for a quicker (b)). With a baseline binary, its locked mount
#   ("base", on the same broker) runs beside the others: before and after in one run.
# BENCH_ROUNDS=N repeats (a) and the open+close figure N times, alternating the targets.
set -euo pipefail

GATE=$(realpath "${1:-build/default/apps/gate/gate}")
BASE_GATE=${2:+$(realpath "$2")}
ROUNDS=${BENCH_ROUNDS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
MB=${BENCH_MB:-1024}
# shellcheck source=common.sh
source "$HERE/common.sh"

c++ -O2 -std=c++17 -o "$WORK/mount_bench" "$HERE/mount_bench.cc"
B="$WORK/mount_bench"

mkdir -p "$WORK/native" "$WORK/root-locked" "$WORK/mnt-locked" \
  "$WORK/root-hist" "$WORK/mnt-hist" \
  "$WORK/root-plain" "$WORK/mnt-plain" "$WORK/root-base" "$WORK/mnt-base"
start_broker

"$GATE" mount --foreground --root "$WORK/root-locked" --mount "$WORK/mnt-locked" \
  --broker-socket "$WORK/broker.sock" --log-level warn --no-history --ready-fd 3 \
  3>"$WORK/ready-locked" 2>"$WORK/mount-locked.log" &
LOCKED_PID=$!
PIDS+=($LOCKED_PID)
MOUNTS+=("$WORK/mnt-locked")
"$GATE" mount --foreground --root "$WORK/root-hist" --mount "$WORK/mnt-hist" \
  --broker-socket "$WORK/broker.sock" --log-level warn --history-dir "$WORK/history" \
  --ready-fd 3 3>"$WORK/ready-hist" 2>"$WORK/mount-hist.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt-hist")
"$GATE" mount --foreground --root "$WORK/root-plain" --mount "$WORK/mnt-plain" --no-locking \
  --log-level warn --ready-fd 3 3>"$WORK/ready-plain" 2>"$WORK/mount-plain.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt-plain")
wait_for "$WORK/ready-locked"
wait_for "$WORK/ready-plain"
wait_for "$WORK/ready-hist"

declare -A DIR=([native]="$WORK/native" [locked]="$WORK/mnt-locked" [plain]="$WORK/mnt-plain"
                [base]="$WORK/mnt-base" [hist]="$WORK/mnt-hist")
declare -A ROOT=([native]="$WORK/native" [locked]="$WORK/root-locked" [plain]="$WORK/root-plain"
                 [base]="$WORK/root-base" [hist]="$WORK/root-hist")
TARGETS=(native locked hist plain)
if [ -n "$BASE_GATE" ]; then
  "$BASE_GATE" mount --foreground --root "$WORK/root-base" --mount "$WORK/mnt-base" \
    --broker-socket "$WORK/broker.sock" --log-level warn --ready-fd 3 \
    3>"$WORK/ready-base" 2>"$WORK/mount-base.log" &
  PIDS+=($!)
  MOUNTS+=("$WORK/mnt-base")
  wait_for "$WORK/ready-base"
  TARGETS+=(base)
fi
TIMEFORMAT=%R

echo "== gate mount benchmark ($(nproc) cores; locked = broker on its Unix socket; plain = --no-locking${BASE_GATE:+; base = $BASE_GATE, locked})"

echo "-- (a) 2,000 files of 4 KiB"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    rm -rf "${DIR[$t]}/a"
    mkdir -p "${DIR[$t]}/a"
    printf '%-7s ' "$t"
    "$B" files "${DIR[$t]}/a" 2000 4096
  done
done

echo "-- (a2) rewrite: 1,000 files of 4 KiB saved twice each"
for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    rm -rf "${DIR[$t]}/r"
    mkdir -p "${DIR[$t]}/r"
    printf '%-7s ' "$t"
    "$B" rewrite "${DIR[$t]}/r" 1000 4096
  done
done
[ -d "$WORK/history" ] && echo "hist    history after (a2): $(du -sh "$WORK/history" | cut -f1)"
if [ -n "${DIR[hist]:-}" ] && [ -n "${DIR[locked]:-}" ]; then
  echo "-- (a3) what history costs: the same saves with and without it, interleaved"
  echo "   (A: locked --no-history, B: hist; every save a content of its own)"
  for round in $(seq 1 "$ROUNDS"); do
    rm -rf "${DIR[locked]}/ab" "${DIR[hist]}/ab"
    mkdir -p "${DIR[locked]}/ab" "${DIR[hist]}/ab"
    "$B" rewrite-ab "${DIR[locked]}/ab" "${DIR[hist]}/ab" 1000 4096 | sed "s#$WORK/##g"
  done
  rm -rf "${DIR[locked]}/ab" "${DIR[hist]}/ab"
fi
# Each file a mount has seen costs it a descriptor until the kernel forgets it, and
# the hard limit may be as low as 20,000: what is measured goes once measured.
for t in "${TARGETS[@]}"; do rm -rf "${DIR[$t]}/r"; done

echo "-- (d) git add of a 5,000-file tree made through the mount"
for t in "${TARGETS[@]}"; do
  tree="${DIR[$t]}/add"
  mkdir -p "$tree"
  for d in $(seq 1 50); do
    mkdir -p "$tree/d$d"
    for f in $(seq 1 100); do echo "$d $f" >"$tree/d$d/f$f"; done
  done
  git -C "$tree" init -q
  ga=$( { time git -C "$tree" add -A; } 2>&1 )
  printf '%-7s git add: %s s\n' "$t" "$ga"
  rm -rf "$tree"
done

echo "-- (b) sequential ${MB} MiB write (with fsync) and read, 1 MiB blocks"
for t in "${TARGETS[@]}"; do
  # A failed dd says so (and what the mount logged) instead of ending the run silently.
  if ! w=$(dd if=/dev/zero of="${DIR[$t]}/big" bs=1M count="$MB" conv=fsync 2>&1); then
    printf '%-7s write FAILED: %s\n' "$t" "$w"
    tail -5 "$WORK/mount-$t.log" 2>/dev/null || true
    continue
  fi
  w=$(tail -1 <<<"$w")
  r=$(dd if="${DIR[$t]}/big" of=/dev/null bs=1M 2>&1 | tail -1) || r="FAILED: $r"
  printf '%-7s write: %s\n        read:  %s\n' "$t" "$w" "$r"
  rm -f "${DIR[$t]}/big"
done

echo "-- (c) a 10,000-file tree in git (made in the source directory, not through the mount)"
for t in "${TARGETS[@]}"; do
  tree="${ROOT[$t]}/tree"
  mkdir -p "$tree"
  for d in $(seq 1 100); do
    mkdir -p "$tree/d$d"
    for f in $(seq 1 100); do echo "$d $f" >"$tree/d$d/f$f"; done
  done
  git -C "$tree" init -q
  git -C "$tree" add -A
  git -C "$tree" -c user.name=b -c user.email=b@example.com commit -qm tree
done
for t in "${TARGETS[@]}"; do
  cd "${DIR[$t]}/tree"
  git status >/dev/null  # first run fills caches
  gs=$( { time git status >/dev/null; } 2>&1 )
  st=$( { time (find . -type f -print0 | xargs -0 stat >/dev/null); } 2>&1 )
  cd "$WORK"
  printf '%-7s git status: %s s   find|xargs stat: %s s\n' "$t" "$gs" "$st"
done

echo "-- open+close of one existing file"
for _ in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    printf '%-7s ' "$t"
    "$B" openclose "${DIR[$t]}/a/f0" 20000
  done
done

# The daemon needs two descriptors per open file (handle + inode), so the hard
# limit caps how many handles fit; ask for 10,000 or as many as fit.
HANDLES=$(( ($(ulimit -Hn) - 300) / 2 ))
[ "$HANDLES" -gt 10000 ] && HANDLES=10000
echo "-- resident memory of the locked mount with $HANDLES open handles"
# A fresh mount: every file a mount has seen costs it a descriptor until the kernel
# forgets the inode, and the runs above saw 12,000 files.
fusermount3 -u "$WORK/mnt-locked"
wait "$LOCKED_PID" 2>/dev/null || true
"$GATE" mount --foreground --root "$WORK/root-locked" --mount "$WORK/mnt-locked" \
  --broker-socket "$WORK/broker.sock" --log-level warn --no-history --ready-fd 3 \
  3>"$WORK/ready-locked2" 2>"$WORK/mount-locked2.log" &
LOCKED_PID=$!
PIDS+=($LOCKED_PID)
wait_for "$WORK/ready-locked2"
ulimit -n "$(ulimit -Hn)"
mkdir -p "$WORK/mnt-locked/h"
coproc HOLD { "$B" hold "$WORK/mnt-locked/h" "$HANDLES"; }
read -r line <&"${HOLD[0]}"
rss=$(awk '/VmRSS/ {print $2, $3}' "/proc/$LOCKED_PID/status")
locks=$(curl -s --unix-socket "$WORK/broker.sock" http://localhost/v1/locks/status | grep -o '"lock_id"' | wc -l || true)
echo "locked  $line: mount RSS $rss, broker holds $locks locks"
exec {HOLD[1]}>&-
wait "$HOLD_PID" 2>/dev/null || true
