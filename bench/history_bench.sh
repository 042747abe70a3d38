#!/usr/bin/env bash
# What the history of replaced versions costs, in one run: the locked mount without it
# (--no-history), the same with it ("hist"), and optionally an older gate ("base").
#   (a2) rewrite of 1,000 4 KiB files, twice each (O_TRUNC saves: what history keeps)
#   (a3) the same saves with and without history, interleaved: its cost in one figure
# The mount's own speed (native, libfuse's passthrough_hp, --no-locking, locked) is
# bench/mount_bench.sh.
# Usage: bench/history_bench.sh [path/to/gate [path/to/baseline/gate]]   (as root)
# BENCH_ROUNDS=N repeats both, alternating the targets.
set -euo pipefail

GATE=$(realpath "${1:-build/default/apps/gate/gate}")
BASE_GATE=${2:+$(realpath "$2")}
ROUNDS=${BENCH_ROUNDS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
source "$HERE/common.sh"

c++ -O2 -std=c++17 -o "$WORK/mount_bench" "$HERE/mount_bench.cc"
B="$WORK/mount_bench"

mkdir -p "$WORK/root-locked" "$WORK/mnt-locked" "$WORK/root-hist" "$WORK/mnt-hist" \
  "$WORK/root-base" "$WORK/mnt-base"
start_broker

"$GATE" mount --foreground --root "$WORK/root-locked" --mount "$WORK/mnt-locked" \
  --broker-socket "$WORK/broker.sock" --log-level warn --no-history --ready-fd 3 \
  3>"$WORK/ready-locked" 2>"$WORK/mount-locked.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt-locked")
"$GATE" mount --foreground --root "$WORK/root-hist" --mount "$WORK/mnt-hist" \
  --broker-socket "$WORK/broker.sock" --log-level warn --history-dir "$WORK/history" \
  --ready-fd 3 3>"$WORK/ready-hist" 2>"$WORK/mount-hist.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt-hist")
wait_for "$WORK/ready-locked"
wait_for "$WORK/ready-hist"

declare -A DIR=([locked]="$WORK/mnt-locked" [base]="$WORK/mnt-base" [hist]="$WORK/mnt-hist")
TARGETS=(locked hist)
if [ -n "$BASE_GATE" ]; then
  "$BASE_GATE" mount --foreground --root "$WORK/root-base" --mount "$WORK/mnt-base" \
    --broker-socket "$WORK/broker.sock" --log-level warn --ready-fd 3 \
    3>"$WORK/ready-base" 2>"$WORK/mount-base.log" &
  PIDS+=($!)
  MOUNTS+=("$WORK/mnt-base")
  wait_for "$WORK/ready-base"
  TARGETS+=(base)
fi

echo "== gate history benchmark ($(nproc) cores; locked = broker on its Unix socket, --no-history; hist = history on${BASE_GATE:+; base = $BASE_GATE, locked})"

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
echo "-- (a3) what history costs: the same saves with and without it, interleaved"
echo "   (A: locked --no-history, B: hist; every save a content of its own)"
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "${DIR[locked]}/ab" "${DIR[hist]}/ab"
  mkdir -p "${DIR[locked]}/ab" "${DIR[hist]}/ab"
  "$B" rewrite-ab "${DIR[locked]}/ab" "${DIR[hist]}/ab" 1000 4096 | sed "s#$WORK/##g"
done
rm -rf "${DIR[locked]}/ab" "${DIR[hist]}/ab"
for t in "${TARGETS[@]}"; do rm -rf "${DIR[$t]}/r"; done

