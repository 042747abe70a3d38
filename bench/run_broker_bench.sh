#!/usr/bin/env bash
# Measures a fresh `gate broker` against the ceiling of HTTP on this machine.
#
#   bench/run_broker_bench.sh [GATE] [--unix] [broker_bench options...]
#
# GATE defaults to build/default/apps/gate/gate. Starts the broker on an ephemeral
# port with a throw-away state dir, starts trivial_server, runs broker_bench's
# scenarios (uncontended, baseline, contended, memory with 100,000 held keys) and
# prints every figure. --unix drives the broker (and the trivial server) over Unix
# sockets instead of TCP. Options after that go to broker_bench and override the
# defaults (for example --seconds 10 --clients 8 --hold 0). Extra broker flags go
# in BROKER_ARGS; BENCH_DIR says where broker_bench and trivial_server are
# (default: build/default/bench). Everything started here is stopped on exit.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gate="$root/build/default/apps/gate/gate"
if [[ $# -gt 0 && $1 != -* ]]; then
  gate=$1
  shift
fi
use_unix=0
if [[ ${1:-} == --unix ]]; then
  use_unix=1
  shift
fi
bench_dir=${BENCH_DIR:-$root/build/default/bench}
broker_bench="$bench_dir/broker_bench"
trivial_server="$bench_dir/trivial_server"

for exe in "$gate" "$broker_bench" "$trivial_server"; do
  if [[ ! -x $exe ]]; then
    echo "run_broker_bench: $exe is missing; build it first:" >&2
    echo "  cmake --build build/default -j2 --target gate broker_bench trivial_server" >&2
    exit 1
  fi
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gate-bench.XXXXXX")
broker_pid=""
trivial_pid=""
bench_pid=""
# shellcheck disable=SC2317  # called by the trap
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "$bench_pid" "$trivial_pid" "$broker_pid"; do
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      # A broker that does not stop within 10 s is killed outright.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until FILE holds a complete first line (the process writes it when it
# listens) and prints that line; fails if PID dies first or 30 s pass.
wait_for_line() {
  local file=$1 pid=$2 what=$3
  for _ in $(seq 300); do
    if [[ -s $file ]] && [[ $(tail -c 1 "$file" | od -An -c | tr -d ' ') == '\n' ]]; then
      head -n 1 "$file"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "run_broker_bench: $what exited before it was listening; its log:" >&2
      tail -n 20 "$tmp/$what.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  echo "run_broker_bench: $what did not say it was listening within 30 s; its log:" >&2
  tail -n 20 "$tmp/$what.log" >&2 || true
  return 1
}

mkdir "$tmp/state"
broker_flags=(--state-dir "$tmp/state" --port 0 --ready-fd 3)
((use_unix)) && broker_flags+=(--unix-socket "$tmp/broker.sock")
# shellcheck disable=SC2086  # BROKER_ARGS is a list of flags on purpose
"$gate" broker "${broker_flags[@]}" ${BROKER_ARGS:-} 3>"$tmp/ready" >"$tmp/broker.log" 2>&1 &
broker_pid=$!
broker_port=$(wait_for_line "$tmp/ready" "$broker_pid" broker)

trivial_flags=(--port 0)
((use_unix)) && trivial_flags=(--unix-socket "$tmp/trivial.sock")
"$trivial_server" "${trivial_flags[@]}" >"$tmp/trivial.out" 2>"$tmp/trivial_server.log" &
trivial_pid=$!
trivial_where=$(wait_for_line "$tmp/trivial.out" "$trivial_pid" trivial_server)
trivial_where=${trivial_where#listening on }

if ((use_unix)); then
  target=(--unix-socket "$tmp/broker.sock" --baseline-unix-socket "${trivial_where#unix:}")
  where="unix:$tmp/broker.sock"
else
  target=(--port "$broker_port" --baseline-port "${trivial_where##*:}")
  where="127.0.0.1:$broker_port"
fi
echo "gate broker pid $broker_pid on $where ($("$gate" --version 2>/dev/null || echo 'version unknown'))"
echo "trivial_server pid $trivial_pid on $trivial_where"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"

# In the background and waited for, so that a signal to this script stops it at once.
status=0
"$broker_bench" "${target[@]}" --broker-pid "$broker_pid" --baseline-pid "$trivial_pid" \
  --clients 32 --seconds 5 --hold 100000 "$@" &
bench_pid=$!
wait "$bench_pid" || status=$?
bench_pid=""

if ! kill -0 "$broker_pid" 2>/dev/null; then
  echo "run_broker_bench: the broker died during the run; the end of its log:" >&2
  tail -n 20 "$tmp/broker.log" >&2 || true
  status=1
fi
exit "$status"
