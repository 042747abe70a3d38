#!/usr/bin/env bash
# The .deb installs into a clean Debian 12 root and works there:
#   1. cpack builds build/.../gate_*.deb from the build tree (gate and the man
#      pages must be built); it holds the copyright and changelog, and lintian
#      finds nothing in it but what the override file keeps;
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
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

# 1. The package.
build_deb
dpkg-deb --field "$deb" Package Version Depends Recommends Suggests
dpkg-deb --contents "$deb" | awk '{print $6}' >"$work/contents"
for f in ./usr/bin/gate ./usr/share/man/man1/gate.1.gz ./usr/share/man/man1/gate-broker.1.gz \
  ./usr/share/bash-completion/completions/gate ./usr/lib/systemd/system/gate-broker.service \
  ./usr/share/doc/gate/copyright ./usr/share/doc/gate/changelog.Debian.gz \
  ./usr/share/lintian/overrides/gate; do
  grep -qx "$f" "$work/contents" || { echo "FAIL: the package has no $f"; cat "$work/contents"; exit 1; }
done
# lintian: no error, warning or information tag but those the package's override
# file keeps (each with its reason there); pedantic tags are shown, not counted.
if command -v lintian >/dev/null; then
  say "lintian"
  # Its scratch files (mldbm-elf-*) go with the scratch directory.
  TMPDIR="$work" lintian --display-info --pedantic --show-overrides "$deb" | sed 's/^/  /' || true
  TMPDIR="$work" lintian --fail-on error,warning,info "$deb" >/dev/null ||
    { echo "FAIL: lintian has tags at error, warning or info level (above)"; exit 1; }
  echo "ok: lintian: no error, warning or info tag left but the overridden ones"
else
  echo "FAIL: lintian is not installed (apt-get install lintian; tools/bootstrap does)"
  exit 1
fi

# 2. A clean Debian 12 root. Only what the test itself uses is added (man-db to
# read the pages, curl to talk to the broker); the package must bring the rest.
base=$cache/bookworm-apt-man-db-curl.tar
unpack_base "$base" man-db,curl
cp /etc/resolv.conf "$root/etc/resolv.conf"

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
in_chroot "$root" bash /tmp/inside.sh
say "PASS: the .deb installs and works in a clean Debian 12 root"
