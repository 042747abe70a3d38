# Sourced by the bench scripts: a scratch directory, cleanup of what they start
# (mounts, processes) on exit, waiting for a ready file, and the broker.
# Needs GATE set; sets WORK, PIDS, MOUNTS.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gate-bench-XXXXXX")
PIDS=()
MOUNTS=()

cleanup() {
  for m in "${MOUNTS[@]}"; do
    fusermount3 -u "$m" 2>/dev/null || fusermount3 -uz "$m" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() {  # FILE: until it has a line, at most 20 s
  for _ in $(seq 1 200); do
    [ -s "$1" ] && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1" >&2
  exit 1
}

start_broker() {  # a broker on $WORK/broker.sock
  mkdir -p "$WORK/state"
  "$GATE" broker --state-dir "$WORK/state" --port 0 --unix-socket "$WORK/broker.sock" \
    --log-level warn --ready-fd 3 3>"$WORK/broker.port" 2>"$WORK/broker.log" &
  PIDS+=($!)
  wait_for "$WORK/broker.port"
}
