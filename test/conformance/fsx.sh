#!/usr/bin/env bash
# Runs fsx (the file system exerciser of xfstests) through a locked gate mount and, as
# the baseline, on a plain directory of the same file system, in four variants:
#
#   mmap      all operations, reads and writes through mmap too (fsx's default)
#   syscalls  read(2)/write(2) only (-R -W)
#   reopen    the file closed and opened again about every 100th operation (-c 100):
#             each open is a lock round trip to the broker
#   direct    O_DIRECT, page-aligned (-Z -R -W -r 4096 -w 4096 -t 4096)
#
#   test/conformance/fsx.sh [GATE] [XFSTESTS_DIR] [OPS]
#
# GATE defaults to build/default/apps/gate/gate. XFSTESTS_DIR is an xfstests checkout
# (ltp/fsx.c is built from it with a small config.h, no configure); without it,
# git://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git is cloned. OPS: operations per
# variant (default 100000). Each run uses a fixed seed, so a failure replays. Prints
# one line per variant and place; exits 1 when a variant fails through the mount only.
# Not part of ctest: a conformance check, reported in the issues.
# GATE_MOUNT_ARGS adds flags to the mount (for example --passthrough-writes).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GATE=${1:-$root/build/default/apps/gate/gate}
xfstests=${2:-}
OPS=${3:-100000}
[[ -x $GATE ]] || { echo "fsx.sh: $GATE is missing; build gate first" >&2; exit 2; }
source "$root/bench/common.sh"

if [[ -z $xfstests ]]; then
  xfstests=$WORK/xfstests
  git clone -q --depth 1 git://git.kernel.org/pub/scm/fs/xfs/xfstests-dev.git "$xfstests"
fi
[[ -f $xfstests/ltp/fsx.c && -f $xfstests/src/global.h ]] ||
  { echo "fsx.sh: $xfstests has no ltp/fsx.c and src/global.h" >&2; exit 2; }
mkdir -p "$WORK/fsx"
for h in SYS_TYPES SYS_STAT SYS_STATVFS SYS_TIME SYS_IOCTL SYS_WAIT MALLOC DIRENT STDLIB \
         UNISTD ERRNO STRING SYS_FCNTL; do
  echo "#define HAVE_${h}_H 1"
done >"$WORK/fsx/config.h"
cc -O2 -D_GNU_SOURCE -I"$WORK/fsx" -I"$xfstests/src" -I"$xfstests/include" \
  -include getopt.h -include sys/param.h -include assert.h \
  -o "$WORK/fsx/fsx" "$xfstests/ltp/fsx.c" 2>"$WORK/fsx/build.log" ||
  { echo "fsx did not build; see $WORK/fsx/build.log" >&2; cat "$WORK/fsx/build.log" >&2; exit 1; }

start_broker
mkdir -p "$WORK/root" "$WORK/mnt" "$WORK/native"
# shellcheck disable=SC2086  # GATE_MOUNT_ARGS are words
"$GATE" mount --foreground --root "$WORK/root" --mount "$WORK/mnt" \
  --broker-socket "$WORK/broker.sock" --history-dir "$WORK/history" --log-level warn \
  --ready-fd 3 ${GATE_MOUNT_ARGS:-} 3>"$WORK/ready" 2>"$WORK/mount.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt")
wait_for "$WORK/ready"

declare -A flags=(
  [mmap]=""
  [syscalls]="-R -W"
  [reopen]="-c 100"
  [direct]="-Z -R -W -r 4096 -w 4096 -t 4096"
)
status=0
for variant in mmap syscalls reopen direct; do
  for place in native mnt; do
    log=$WORK/fsx-$variant-$place.log
    mkdir -p "$WORK/logs-$place"
    start=$(date +%s%N)
    # shellcheck disable=SC2086  # the flags are words
    if (cd "$WORK/$place" && "$WORK/fsx/fsx" -q -S 1 -N "$OPS" ${flags[$variant]} \
          -P "$WORK/logs-$place" "fsx-$variant" >"$log" 2>&1); then
      result=pass
    else
      result="FAIL (see $log)"
      [[ $place == mnt ]] && status=1
    fi
    ms=$((($(date +%s%N) - start) / 1000000))
    printf '%-9s %-7s %s, %d ops in %d.%03d s\n' "$variant" "$place" "$result" "$OPS" $((ms / 1000)) $((ms % 1000))
    [[ $result == pass ]] || tail -20 "$log"
  done
done
grep -E ' (WARN|ERROR) ' "$WORK/mount.log" | head -20 || true
exit $status
