#!/usr/bin/env bash
# The .deb's gate-broker.service under a real systemd: a Debian 12 guest boots (QEMU,
# software emulation) with the package installed, systemd starts the unit the
# package enabled, and a check unit in the guest reports on the serial console:
#   1. cpack builds the .deb from the build tree;
#   2. mmdebstrap makes a bookworm root with systemd and the package's dependencies
#      (cached as a tarball in the build tree, rebuilt when older than 30 days or
#      when the package's dependencies change); dpkg installs the .deb in it,
#      offline, in a private mount namespace;
#   3. mkfs.ext4 turns the root into a disk; QEMU boots it with the host's kernel;
#   4. in the guest, once the broker answers: the unit's state and user, the
#      broker's health, a lock granted and refused over HTTP, `gate locks`, the
#      state file's owner, the unit stopped cleanly; then the guest powers off.
# QEMU is started in the background and killed by pid on any exit (trap); the scratch
# directory goes with it. Needs root, mmdebstrap, qemu-system-x86_64, mkfs.ext4 and
# a kernel in /boot; exits 77 (skipped) without them.
#
# Usage: deb_systemd_test.sh BUILD_DIR [CACHE_DIR]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
for tool in qemu-system-x86_64 mkfs.ext4; do
  command -v "$tool" >/dev/null || skip "$tool is not installed (tools/bootstrap installs it)"
done
kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -1 || true)
[[ -n $kernel && -r $kernel ]] || skip "no kernel in /boot (apt-get install linux-image-amd64)"
initrd=/boot/initrd.img-${kernel#/boot/vmlinuz-}
[[ -r $initrd ]] || skip "no initrd for $kernel"
qemu_pid=
on_exit 'if [[ -n $qemu_pid ]] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid"; wait "$qemu_pid"; fi'

# 1. The package.
build_deb
# Its dependencies, without versions or alternatives: the base brings them, so that
# the install needs no mirror.
deps=$(dpkg-deb --field "$deb" Depends | tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/ //g' | grep . | sort | paste -sd, -)
say "it depends on $deps"

# 2. A bookworm root that boots, with the package installed.
key=$(printf '%s' "$deps" | sha256sum | cut -c1-12)
base=$cache/bookworm-systemd-$key.tar
unpack_base "$base" "systemd-sysv,udev,curl,procps,$deps"
echo gate-systemd-test >"$root/etc/hostname"
# No login prompt and no waiting for a network the guest does not have.
rm -f "$root"/etc/systemd/system/getty.target.wants/* \
  "$root"/etc/systemd/system/multi-user.target.wants/systemd-networkd.service 2>/dev/null || true

# The check: waits for the broker the package's unit runs, reports each fact as
# a line "gate-check: NAME=VALUE" on the console, then powers the guest off.
cat >"$root/usr/local/sbin/gate-check" <<'EOF'
#!/bin/bash
out() { echo "gate-check: $*" >/dev/console; }
for _ in $(seq 120); do
  curl -fsS -o /tmp/health http://127.0.0.1:8787/v1/health 2>/dev/null && break
  sleep 0.5
done
out "health=$(tr -d '\n' </tmp/health 2>/dev/null)"
out "$(systemctl show gate-broker.service -p ActiveState --value | sed 's/^/active=/')"
pid=$(systemctl show gate-broker.service -p MainPID --value)
out "user=$(ps -o user= -p "$pid" | tr -d ' ')"
out "enabled=$(systemctl is-enabled gate-broker.service)"
api() { curl -sS -o /tmp/body -w '%{http_code}' -H 'Content-Type: application/json' "$@"; }
out "alice_write=$(api -d '{"path":"src/a.c","mode":"write","owner":"alice"}' http://127.0.0.1:8787/v1/locks/acquire)"
out "bob_read=$(api -d '{"path":"src/a.c","mode":"read","owner":"bob","timeout_ms":0}' http://127.0.0.1:8787/v1/locks/acquire)"
out "locks_shows_alice=$(gate locks 2>&1 | grep -q alice && echo yes || echo no)"
out "db_owner=$(stat -c %U /var/lib/gate/locks.db 2>&1)"
systemctl stop gate-broker.service
out "stopped=$(systemctl show gate-broker.service -p ActiveState --value) result=$(systemctl show gate-broker.service -p Result --value)"
out "done"
systemctl poweroff
EOF
chmod 755 "$root/usr/local/sbin/gate-check"
cat >"$root/etc/systemd/system/gate-check.service" <<'EOF'
[Unit]
Description=gate's package test: report on gate-broker.service, then power off
After=gate-broker.service
Wants=gate-broker.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/gate-check
TimeoutStartSec=120

[Install]
WantedBy=multi-user.target
EOF
ln -s /etc/systemd/system/gate-check.service "$root/etc/systemd/system/multi-user.target.wants/gate-check.service"

say "installing the .deb in the root (dpkg, offline)"
in_chroot "$root" env DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  dpkg -i "/tmp/${deb##*/}" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log"; fail "dpkg -i"; }
[[ -L $root/etc/systemd/system/multi-user.target.wants/gate-broker.service ]] ||
  fail "the package's postinst did not enable gate-broker.service"

# 3. The disk, and the boot.
say "making the disk"
mkfs.ext4 -q -F -L gate-root -d "$root" "$work/disk.img" 2G >"$work/mkfs.log" 2>&1 ||
  { cat "$work/mkfs.log"; fail "mkfs.ext4"; }
rm -rf --one-file-system "$root"
say "booting the guest (TCG) with ${kernel##*/}"
qemu-system-x86_64 -accel tcg,thread=multi -cpu max -m 1024 -smp 2 \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 root=/dev/vda rw net.ifnames=0 systemd.show_status=1" \
  -drive "file=$work/disk.img,if=virtio,format=raw" -nic none \
  -display none -monitor none -serial "file:$work/serial.log" -no-reboot &
qemu_pid=$!
# The guest powers itself off when the check is done; 600 s is the way out if not.
deadline=$((SECONDS + 600))
while kill -0 "$qemu_pid" 2>/dev/null && ((SECONDS < deadline)); do
  grep -q "gate-check: done" "$work/serial.log" 2>/dev/null && break
  sleep 1
done
grep -q "gate-check: done" "$work/serial.log" 2>/dev/null || {
  tail -60 "$work/serial.log"
  fail "the guest did not report (qemu $(kill -0 "$qemu_pid" 2>/dev/null && echo running || echo ended))"
}
say "the guest reported"
for _ in $(seq 60); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 1; done
kill -0 "$qemu_pid" 2>/dev/null && say "the guest did not power off in 60 s; killing it"

# 4. What it said.
grep -a "gate-check: " "$work/serial.log" | tr -d '\r' | sed 's/.*gate-check: /  /'
fact() { grep -a "gate-check: $1=" "$work/serial.log" | tr -d '\r' | sed "s/.*gate-check: $1=//" | head -1; }
check() { if [[ $2 == "$3" ]]; then echo "ok: $1"; else echo "FAIL: $1: got '$2', want '$3'"; exit 1; fi; }
check "the unit is enabled by the package" "$(fact enabled)" enabled
check "systemd runs the unit" "$(fact active)" active
check "the broker runs as the user gate" "$(fact user)" gate
[[ $(fact health) == *'"ok"'* ]] && echo "ok: the broker answers /v1/health" || fail "health: $(fact health)"
check "alice gets the write lock" "$(fact alice_write)" 200
check "bob's read is refused while alice writes" "$(fact bob_read)" 408
check "gate locks shows alice's lock" "$(fact locks_shows_alice)" yes
check "the state is in /var/lib/gate, owned by gate" "$(fact db_owner)" gate
check "the unit stops cleanly" "$(fact stopped)" "inactive result=success"
say "PASS: gate-broker.service runs the broker under systemd"
