#!/usr/bin/env bash
# Lost updates between agents, and what preventing them costs, in one run: N agent
# processes (each its own GATE_AGENT) edit a shared set of files through a gate view,
# each round reading a file, thinking 25-75 ms and writing it back with one line
# added (by turns in place with O_TRUNC and through a temp file renamed over it,
# falling back to O_TRUNC when the rename is refused, as Claude Code does). In
# refuse mode an agent whose save is refused reads the file again and retries.
#   For N in $AGENTS and each --stale-writes policy (off, merge, refuse): completed
#   edits per second, lines lost, merges, conflicts, refusals.
#   Then the cost of the check on saves that are not stale: the rewrite workload of
#   mount_bench (1,000 files of 4 KiB saved four times) interleaved between a view
#   with --stale-writes off and one with merge (both with history).
# Usage: bench/agents_bench.sh [path/to/gate]   (as root)
#   AGENTS="2 4 8" ROUNDS=10 FILES=4 BENCH_ROUNDS=3
set -euo pipefail

GATE=$(realpath "${1:-build/default/apps/gate/gate}")
HERE=$(cd "$(dirname "$0")" && pwd)
AGENTS=${AGENTS:-"2 4 8"}
ROUNDS=${ROUNDS:-10}
FILES=${FILES:-4}
AB_ROUNDS=${BENCH_ROUNDS:-3}
# shellcheck source=common.sh
source "$HERE/common.sh"

c++ -O2 -std=c++17 -o "$WORK/mount_bench" "$HERE/mount_bench.cc"

start_broker

POLICIES=(off merge refuse)
for p in "${POLICIES[@]}"; do
  mkdir -p "$WORK/root-$p" "$WORK/mnt-$p"
  "$GATE" mount --foreground --root "$WORK/root-$p" --mount "$WORK/mnt-$p" \
    --broker-socket "$WORK/broker.sock" --log-level warn --history-dir "$WORK/history-$p" \
    --stale-writes "$p" --ready-fd 3 3>"$WORK/ready-$p" 2>"$WORK/mount-$p.log" &
  PIDS+=($!)
  MOUNTS+=("$WORK/mnt-$p")
done
for p in "${POLICIES[@]}"; do wait_for "$WORK/ready-$p"; done

# $1 dir, $2 agent number, $3 rounds, $4 files, $5 retry on refusal (1/0).
# Prints "retries N" at the end.
AGENT='
dir=$1 a=$2 rounds=$3 files=$4 retry=$5 retries=0
save() {  # file text: in place, or temp + rename with the O_TRUNC fallback
  if [ $(( (r + a) % 2 )) = 0 ]; then printf "%s\n" "$2" > "$1"
  else
    printf "%s\n" "$2" > "$1.tmp.$$" || return 1
    mv "$1.tmp.$$" "$1" 2>/dev/null || { rm -f "$1.tmp.$$"; printf "%s\n" "$2" > "$1"; }
  fi
}
r=0
while [ $r -lt $rounds ]; do
  r=$((r+1)); f="$dir/f$(( (r + a) % files ))"
  c=$(cat "$f") || exit 1
  sleep 0.0$(( (r * 7 + a * 3) % 5 + 2 ))5
  until save "$f" "$c
a$a r$r" 2>/dev/null; do
    [ "$retry" = 1 ] || exit 1
    retries=$((retries+1)); [ $retries -lt 1000 ] || exit 1
    c=$(cat "$f") || exit 1
  done
done
echo "retries $retries"'

stale_counts() {  # view -> "merged=N conflicts=N refused=N" as words
  python3 -c 'import os,sys
v=os.getxattr(sys.argv[1], "user.gate.stale").decode().split()[1:]
print(" ".join(v))' "$1"
}

echo "== agents editing $FILES shared files, $ROUNDS rounds each (read, think 25-75 ms, write back + 1 line)"
printf '%-7s %-7s %9s %10s %6s %7s %9s %8s %8s\n' agents policy "time s" "edits/s" lost merged conflicts refused retries
for n in $AGENTS; do
  for p in "${POLICIES[@]}"; do
    dir="$WORK/mnt-$p/run-$n"
    mkdir -p "$dir"
    for k in $(seq 0 $((FILES - 1))); do echo start >"$dir/f$k"; done
    before=$(stale_counts "$WORK/mnt-$p")
    retry=0
    [ "$p" = refuse ] && retry=1
    t0=$(date +%s.%N)
    apids=()
    for a in $(seq 1 "$n"); do
      GATE_AGENT="a$a" sh -c "$AGENT" sh "$dir" "$a" "$ROUNDS" "$FILES" "$retry" \
        >"$WORK/agent-$p-$n-$a.out" 2>&1 &
      apids+=($!)
    done
    failed=0
    for ap in "${apids[@]}"; do wait "$ap" || failed=$((failed + 1)); done
    t1=$(date +%s.%N)
    after=$(stale_counts "$WORK/mnt-$p")
    present=$(cat "$dir"/f* | grep -c '^a[0-9]* r[0-9]*$' || true)
    distinct=$(cat "$dir"/f* | grep '^a[0-9]* r[0-9]*$' | sort -u | wc -l)
    total=$((n * ROUNDS))
    retries=$(cat "$WORK"/agent-"$p"-"$n"-*.out | awk '/^retries/ {s += $2} END {print s + 0}')
    python3 - "$n" "$p" "$t0" "$t1" "$total" "$distinct" "$before" "$after" "$retries" "$failed" <<'EOF'
import sys
n, p, t0, t1, total, distinct = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
count = lambda s: dict(kv.split("=") for kv in s.split())
b, a = count(sys.argv[7]), count(sys.argv[8])
d = {k: int(a[k]) - int(b[k]) for k in a}
retries, failed = sys.argv[9], int(sys.argv[10])
t = t1 - t0
print(f"{n:<7} {p:<7} {t:9.2f} {total / t:10.1f} {total - distinct:6d} {d['merged']:7d} {d['conflicts']:9d} {d['refused']:8d} {retries:>8}"
      + (f"   ({failed} agents failed)" if failed else ""))
EOF
    [ "$present" = "$distinct" ] || echo "        ($((present - distinct)) lines twice)"
  done
done

echo "== the check on saves that are not stale: rewrite (O_TRUNC) of 1,000 files of 4 KiB, A: off, B: merge"
for round in $(seq 1 "$AB_ROUNDS"); do
  rm -rf "$WORK/mnt-off/ab" "$WORK/mnt-merge/ab"
  mkdir -p "$WORK/mnt-off/ab" "$WORK/mnt-merge/ab"
  "$WORK/mount_bench" rewrite-ab "$WORK/mnt-off/ab" "$WORK/mnt-merge/ab" 1000 4096 |
    sed "s#$WORK/##g"
done
