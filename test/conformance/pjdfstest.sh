#!/usr/bin/env bash
# Runs pjdfstest (the POSIX file system test suite) through a locked gate mount and,
# as the baseline, on a plain directory of the same file system; prints prove's
# summary of both and every test that fails through the mount only.
#
#   test/conformance/pjdfstest.sh [GATE] [PJDFSTEST_DIR]
#
# GATE defaults to build/default/apps/gate/gate. PJDFSTEST_DIR is a built pjdfstest
# checkout; without it, https://github.com/pjd/pjdfstest is cloned and built in the
# scratch directory (needs git, autoconf, automake, make, gcc). Run as root (the
# suite changes owners and makes device nodes); takes about 10 minutes here. Not
# part of ctest: a conformance check, like fsx, reported in the issues.
# GATE_MOUNT_ARGS adds flags to the mount (for example --passthrough-writes).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
GATE=${1:-$root/build/default/apps/gate/gate}
pjd=${2:-}
[[ $(id -u) == 0 ]] || { echo "pjdfstest.sh: run as root" >&2; exit 2; }
[[ -x $GATE ]] || { echo "pjdfstest.sh: $GATE is missing; build gate first" >&2; exit 2; }
command -v prove >/dev/null || { echo "pjdfstest.sh: prove (perl) is missing" >&2; exit 2; }
source "$root/bench/common.sh"

if [[ -z $pjd ]]; then
  pjd=$WORK/pjdfstest
  git clone -q https://github.com/pjd/pjdfstest "$pjd"
  (cd "$pjd" && autoreconf -ifs >/dev/null 2>&1 && ./configure -q && make -s pjdfstest) \
    >"$WORK/build.log" 2>&1 || { echo "pjdfstest did not build; see $WORK/build.log" >&2; exit 1; }
fi
[[ -x $pjd/pjdfstest ]] || { echo "pjdfstest.sh: no built pjdfstest in $pjd" >&2; exit 2; }

start_broker
mkdir -p "$WORK/root" "$WORK/mnt" "$WORK/native"
# shellcheck disable=SC2086  # GATE_MOUNT_ARGS are words
"$GATE" mount --foreground --allow-other --root "$WORK/root" --mount "$WORK/mnt" \
  --broker-socket "$WORK/broker.sock" --history-dir "$WORK/history" --log-level warn \
  --ready-fd 3 ${GATE_MOUNT_ARGS:-} 3>"$WORK/ready" 2>"$WORK/mount.log" &
PIDS+=($!)
MOUNTS+=("$WORK/mnt")
wait_for "$WORK/ready"

run() {  # DIR LOG: the suite with DIR as its working directory
  (cd "$1" && prove -rv "$pjd/tests" >"$2" 2>&1) || true
  echo "$(basename "$1"): $(grep -E '^Files=' "$2") $(grep -E '^Result:' "$2")"
}
run "$WORK/mnt" "$WORK/prove-mount.log"
run "$WORK/native" "$WORK/prove-native.log"
# Lines of failed tests ("not ok" without a TODO), by test file, through the mount only.
failed() { awk '/^\/.*\.t \.\./ {t=$1} /^not ok/ && !/# TODO/ {print t": "$0}' "$1" | sort; }
comm -23 <(failed "$WORK/prove-mount.log") <(failed "$WORK/prove-native.log") >"$WORK/only-mount"
echo "failing through the mount only: $(wc -l <"$WORK/only-mount")"
cat "$WORK/only-mount"
grep -E ' (WARN|ERROR) ' "$WORK/mount.log" | head -20 || true
