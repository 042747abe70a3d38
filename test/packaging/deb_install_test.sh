#!/usr/bin/env bash
# The .deb installs into a clean Debian 12 root and works there:
#   1. cpack builds build/.../gate_*.deb from the build tree (gate and the man
#      pages must be built);
#   2. mmdebstrap makes a minimal bookworm root (cached as a tarball in the build
#      tree, rebuilt when older than 30 days), unpacked into a scratch directory;
#   3. in a private mount and PID namespace, chrooted there: apt-get installs the
#      .deb with its dependencies from the Debian mirror; then gate --version,
#      man gate, the system user, the unit and its enablement, bash completion,
#      and a broker run as the "gate" user (as gate-broker.service would) that
#      grants, queues and releases locks for curl; then remove and purge.
# The namespace ends every process and mount of the test; the scratch directory is
# removed on every exit (trap). Needs root, mmdebstrap and the Debian mirror;
# exits 77 (skipped) without them.
#
# Usage: deb_install_test.sh BUILD_DIR [CACHE_DIR]
set -euo pipefail
build=$(cd "$1" && pwd)
cache=${2:-$build/packaging-cache}
mkdir -p "$cache" && cache=$(cd "$cache" && pwd)
start=$SECONDS
say() { printf '[%3ds] %s\n' $((SECONDS - start)) "$*"; }
skip() { echo "SKIP: $*"; exit 77; }

[[ $(id -u) == 0 ]] || skip "needs root (chroot, mounts)"
command -v mmdebstrap >/dev/null || skip "mmdebstrap is not installed (apt-get install mmdebstrap)"
command -v cpack >/dev/null || skip "cpack is not installed"
command -v unshare >/dev/null || skip "unshare is not installed"
[[ -f $build/CPackConfig.cmake ]] || { echo "FAIL: $build/CPackConfig.cmake missing; configure first"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/gate-deb-test.XXXXXX")
cleanup() {
  local rc=$?
  # Mounts live only in the namespace below, so none is left here; --one-file-system
  # guards the host all the same should one remain.
  if grep -q " $work/" /proc/self/mounts; then
    echo "cleanup: mounts remain under $work; not deleting it" >&2
  else
    rm -rf --one-file-system "$work"
  fi
  exit $rc
}
trap cleanup EXIT INT TERM

# 1. The package.
say "building the .deb with cpack"
(cd "$work" && cpack --config "$build/CPackConfig.cmake" -G DEB -B "$work/deb" >"$work/cpack.log" 2>&1) ||
  { cat "$work/cpack.log"; echo "FAIL: cpack"; exit 1; }
deb=$(ls "$work"/deb/gate_*.deb)
say "built ${deb##*/} ($(du -k "$deb" | cut -f1) KiB)"
dpkg-deb --field "$deb" Package Version Depends Recommends Suggests
dpkg-deb --contents "$deb" | awk '{print $6}' >"$work/contents"
for f in ./usr/bin/gate ./usr/share/man/man1/gate.1.gz ./usr/share/man/man1/gate-broker.1.gz \
  ./usr/share/bash-completion/completions/gate ./usr/lib/systemd/system/gate-broker.service; do
  grep -qx "$f" "$work/contents" || { echo "FAIL: the package has no $f"; cat "$work/contents"; exit 1; }
done

# 2. A clean Debian 12 root. Only what the test itself uses is added (man-db to
# read the pages, curl to talk to the broker); the package must bring the rest.
base=$cache/bookworm-apt-man-db-curl.tar
if [[ ! -s $base ]] || [[ -n $(find "$base" -mtime +30) ]]; then
  say "mmdebstrap: making a bookworm base (cached as $base)"
  mmdebstrap --variant=apt --format=tar --include=man-db,curl bookworm "$work/base.tar" \
    >"$work/mmdebstrap.log" 2>&1 || { tail -30 "$work/mmdebstrap.log"; echo "FAIL: mmdebstrap"; exit 1; }
  mv "$work/base.tar" "$base"
  say "base made ($(du -m "$base" | cut -f1) MiB)"
else
  say "using the cached base $base"
fi
root=$work/root
mkdir "$root"
tar -C "$root" -xf "$base"
cp "$deb" "$root/tmp/"
cp /etc/resolv.conf "$root/etc/resolv.conf"
say "root unpacked"

# 3. In the chroot.
cat >"$root/tmp/inside.sh" <<'EOF'
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
t0=$SECONDS
say() { printf '[chroot %3ds] %s\n' $((SECONDS - t0)) "$*"; }
check() { local what=$1; shift; if "$@"; then echo "ok: $what"; else echo "FAIL: $what"; exit 1; fi; }

say "apt-get update"
apt-get update -qq
say "apt-get install ./gate_*.deb"
apt-get install -y -qq --no-install-recommends /tmp/gate_*.deb >/tmp/apt.log 2>&1 || { cat /tmp/apt.log; exit 1; }
grep -E "^(Setting up|Unpacking) " /tmp/apt.log | sed 's/^/  /' | head -40
say "installed"

check "gate --version" bash -c 'v=$(gate --version); echo "  $v"; grep -Eq "^gate [0-9]+\.[0-9]+\.[0-9]+ \(build .+\)$" <<<"$v"'
check "man gate shows gate(1)" bash -c 'man gate 2>&1 | grep -q "HOW LOCKING BEHAVES"'
check "man gate-broker shows gate-broker(1)" bash -c 'man gate-broker 2>&1 | grep -q "run the gate lock broker"'
check "every gate-CMD(1) page is installed" bash -c '
  for c in $(gate help | awk "/^Commands:/{t=1;next} t&&/^  [a-z]/{print \$1} t&&/^\$/{exit}"); do
    man -w gate-$c >/dev/null || { echo "no page for $c"; exit 1; }; done'
check "system user gate" bash -c 'u=$(getent passwd gate); echo "  $u"; grep -q ":/var/lib/gate:/usr/sbin/nologin$" <<<"$u"'
check "gate-broker.service installed" test -f /usr/lib/systemd/system/gate-broker.service
check "gate-broker.service enabled by postinst" test -L /etc/systemd/system/multi-user.target.wants/gate-broker.service
check "bash completion offers subcommands" bash -c '
  source /usr/share/bash-completion/completions/gate
  COMP_WORDS=(gate "") COMP_CWORD=1; _gate; [[ " ${COMPREPLY[*]} " == *" broker "* ]]'

# The broker as gate-broker.service runs it: user gate, state in /var/lib/gate
# (created by systemd's StateDirectory=, here by hand), on a free loopback port.
install -d -o gate -g gate -m 0750 /var/lib/gate
rm -f /tmp/port
setpriv --reuid=gate --regid=gate --init-groups --inh-caps=-all \
  gate broker --state-dir /var/lib/gate --port 0 --ready-fd 3 3>/tmp/port >/tmp/broker.log 2>&1 &
broker=$!
for _ in $(seq 100); do [[ -s /tmp/port ]] && break; sleep 0.1; done
check "broker started" test -s /tmp/port
port=$(tr -d '\n' </tmp/port)
say "broker (pid $broker) on 127.0.0.1:$port"
api() { curl -sS -o /tmp/body -w '%{http_code}' -H 'Content-Type: application/json' "$@"; }
check "health" bash -c "curl -sS http://127.0.0.1:$port/v1/health | grep -q '\"ok\"'"
code=$(api -d '{"path":"src/a.c","mode":"write","owner":"alice"}' "http://127.0.0.1:$port/v1/locks/acquire")
check "alice acquires the write lock (HTTP $code)" test "$code" = 200
lock_id=$(sed -nE 's/.*"lock_id":"([^"]+)".*/\1/p' /tmp/body)
check "the grant carries a lock id" test -n "$lock_id"
code=$(api -d '{"path":"src/a.c","mode":"read","owner":"bob","timeout_ms":0}' "http://127.0.0.1:$port/v1/locks/acquire")
check "bob cannot read while alice writes (HTTP $code)" test "$code" = 408
check "gate locks shows alice" bash -c "gate locks --broker-port $port >/tmp/locks.txt; sed 's/^/  /' /tmp/locks.txt; grep -q alice /tmp/locks.txt"
code=$(api -d "{\"lock_id\":\"$lock_id\",\"owner\":\"bob\"}" "http://127.0.0.1:$port/v1/locks/release")
check "bob cannot release alice's lock (HTTP $code)" test "$code" = 403
code=$(api -d "{\"lock_id\":\"$lock_id\",\"owner\":\"alice\"}" "http://127.0.0.1:$port/v1/locks/release")
check "alice releases (HTTP $code)" test "$code" = 200
code=$(api -d '{"path":"src/a.c","mode":"read","owner":"bob","timeout_ms":0}' "http://127.0.0.1:$port/v1/locks/acquire")
check "then bob reads (HTTP $code)" test "$code" = 200
kill -TERM "$broker"
rc=0; wait "$broker" || rc=$?
check "broker stops cleanly on SIGTERM (exit $rc)" test "$rc" = 0
sed 's/^/  broker: /' /tmp/broker.log
check "the lock database is in /var/lib/gate, owned by gate" bash -c 'test "$(stat -c %U /var/lib/gate/locks.db)" = gate'

say "remove and purge"
apt-get remove -y -qq gate >/dev/null 2>&1
check "remove keeps /var/lib/gate" test -d /var/lib/gate
apt-get purge -y -qq gate >/dev/null 2>&1
check "purge deletes /var/lib/gate" test ! -e /var/lib/gate
check "purge drops the enablement" test ! -e /etc/systemd/system/multi-user.target.wants/gate-broker.service
say "done"
EOF

say "entering the chroot"
# A private mount namespace (mounts vanish with it) and PID namespace (so does
# every process the test started).
unshare --mount --pid --fork --propagation private bash -c '
  set -e
  root=$1
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs tmpfs "$root/run"
  chroot "$root" bash /tmp/inside.sh
' _ "$root"
say "PASS: the .deb installs and works in a clean Debian 12 root"
