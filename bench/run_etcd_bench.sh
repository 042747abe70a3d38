#!/usr/bin/env bash
# The etcd store against the SQLite store, in one run (issue 11's speed targets).
#
#   bench/run_etcd_bench.sh [GATE] [broker_bench options...]
#
# Starts a 3-member etcd cluster on free loopback ports (own data directories,
# never 2379), two `gate broker --store etcd://... --etcd-lend off` on it, two with
# lending on (the default), and one `gate broker` on SQLite; then runs broker_bench's
# uncontended and contended scenarios with 16 clients spread over both brokers of a
# kind (odd clients on the second), its hand-off scenario (two clients, one on each
# broker, each releasing once the other waits), and the same on the SQLite broker; and first,
# what a put, a guarded transaction and a range cost through etcd's JSON gateway
# (bench/etcd_floor). Options after GATE go to broker_bench (for example
# --seconds 10). Everything started here is stopped on exit, by pid.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATE="$root/build/default/apps/gate/gate"
if [[ $# -gt 0 && $1 != -* ]]; then
  GATE=$1
  shift
fi
bench="${BENCH_DIR:-$root/build/default/bench}/broker_bench"
floor="${BENCH_DIR:-$root/build/default/bench}/etcd_floor"
ETCD=${ETCD:-/usr/bin/etcd}
for exe in "$GATE" "$bench" "$floor" "$ETCD"; do
  if [[ ! -x $exe ]]; then
    echo "run_etcd_bench: $exe is missing (build gate and broker_bench; apt-get install etcd-server)" >&2
    exit 1
  fi
done
# shellcheck source=bench/common.sh
source "$root/bench/common.sh"

# Free loopback ports: bound and let go by the kernel's choice.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks: s.close()
PY
}
read -r -a ports <<<"$(free_ports 6)"
cluster=""
for i in 0 1 2; do cluster+="${cluster:+,}m$i=http://127.0.0.1:${ports[$((3 + i))]}"; done
endpoints=""
for i in 0 1 2; do
  c="http://127.0.0.1:${ports[$i]}"
  p="http://127.0.0.1:${ports[$((3 + i))]}"
  "$ETCD" --name "m$i" --data-dir "$WORK/etcd-m$i" --listen-client-urls "$c" --advertise-client-urls "$c" \
    --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" --initial-cluster "$cluster" \
    --initial-cluster-token "gate-bench-$$" --initial-cluster-state new --logger zap \
    >"$WORK/etcd-m$i.log" 2>&1 &
  PIDS+=($!)
  endpoints+="${endpoints:+,}127.0.0.1:${ports[$i]}"
done
healthy=0
for _ in $(seq 1 300); do
  if curl -fsS "http://127.0.0.1:${ports[0]}/health" 2>/dev/null | grep -q '"health":"true"'; then
    healthy=1
    break
  fi
  sleep 0.1
done
((healthy)) || { echo "run_etcd_bench: etcd did not get a leader; see $WORK/etcd-m0.log" >&2; exit 1; }

start_gate_broker() {  # NAME [flags...]: sets PORT (and its pid is the last of PIDS)
  local name=$1
  shift
  mkdir -p "$WORK/$name"
  "$GATE" broker --state-dir "$WORK/$name" --port 0 --log-level warn --ready-fd 3 "$@" \
    3>"$WORK/$name.port" 2>"$WORK/$name.log" &
  PIDS+=($!)
  wait_for "$WORK/$name.port"
  for _ in $(seq 1 100); do grep -q . "$WORK/$name.port" && break; sleep 0.05; done
  PORT=$(head -n 1 "$WORK/$name.port")
}
start_gate_broker etcd1 --store "etcd://$endpoints" --etcd-lend off
e1=$PORT e1_pid=${PIDS[-1]}
start_gate_broker etcd2 --store "etcd://$endpoints" --etcd-lend off
e2=$PORT
# The same with quiet keys lent to their broker (the default; docs/etcd-store.md).
start_gate_broker etcd3 --store "etcd://$endpoints" --etcd-lend on
e3=$PORT e3_pid=${PIDS[-1]}
start_gate_broker etcd4 --store "etcd://$endpoints" --etcd-lend on
e4=$PORT
start_gate_broker sqlite
s1=$PORT s1_pid=${PIDS[-1]}

echo "gate $("$GATE" --version | head -n 1); etcd $("$ETCD" --version | head -n 1)"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "######## etcd itself through its JSON gateway (the floor): 1 client, then 16"
"$floor" "etcd://$endpoints" 1000 1
"$floor" "etcd://$endpoints" 2000 16
echo
echo "######## etcd store: 3 members, brokers on :$e1 and :$e2 (16 clients over both)"
"$bench" --port "$e1" --port2 "$e2" --broker-pid "$e1_pid" --clients 16 --seconds 5 \
  --only uncontended,contended,handoff "$@"
# What the brokers sent etcd (their TxnBatcher's counters; all runs so far).
sent_to_etcd() {
  for p in "$@"; do
    curl -fsS "http://127.0.0.1:$p/metrics" | awk -v p="$p" '
      /^gate_etcd_txn_batches_total / { b = $2 } /^gate_etcd_txns_total / { t = $2 }
      /^gate_etcd_txn_batch_seconds_total / { s = $2 } /^gate_etcd_adoptions_total / { a = $2 }
      END { if (b > 0) printf "  broker :%s  %d decisions in %d calls to etcd (%.2f per call), %.2f ms per call; %d lends handed back\n", p, t, b, t / b, 1000 * s / b, a }'
  done
}
sent_to_etcd "$e1" "$e2"
echo
echo "######## etcd store, one client (uncontended latency)"
"$bench" --port "$e1" --broker-pid "$e1_pid" --clients 1 --seconds 5 --only uncontended "$@"
echo
echo "######## etcd store lending quiet keys: brokers on :$e3 and :$e4 (16 clients over both)"
"$bench" --port "$e3" --port2 "$e4" --broker-pid "$e3_pid" --clients 16 --seconds 5 \
  --only uncontended,contended,handoff "$@"
sent_to_etcd "$e3" "$e4"
echo
echo "######## etcd store lending quiet keys, one client (uncontended latency)"
"$bench" --port "$e3" --broker-pid "$e3_pid" --clients 1 --seconds 5 --only uncontended "$@"
echo
echo "######## SQLite store: one broker on :$s1 (16 clients)"
"$bench" --port "$s1" --broker-pid "$s1_pid" --clients 16 --seconds 5 --only uncontended,contended,handoff "$@"
echo
echo "######## SQLite store, one client"
"$bench" --port "$s1" --broker-pid "$s1_pid" --clients 1 --seconds 5 --only uncontended "$@"
