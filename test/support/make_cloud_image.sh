#!/bin/sh
# Builds the stand-in for a publisher's cloud image, for the tests that cannot reach
# cloud.debian.org: Debian 12 with cloud-init, booted by the firmware like the real
# images (an MBR, syslinux on a FAT boot partition, the root file system on the
# second partition, labelled cloudimg-rootfs). The kernel and its modules are the
# host's Debian kernel (linux-image-amd64), copied in, as gate's own debian-12 image
# does; building an initramfs inside would triple the build time.
#
#   make_cloud_image.sh OUT.qcow2 [LOG]
#
# Needs root (mmdebstrap into a directory), syslinux, mtools, dosfstools and fdisk.
set -eu
out="$1"
log="${2:-/dev/stderr}"
work="$out.building"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work" "$out.tmp"' EXIT

ver=$(find /boot -maxdepth 1 -name 'vmlinuz-*' | sed 's|.*/vmlinuz-||' | sort -V | tail -n 1)
[ -n "$ver" ] && [ -f "/boot/initrd.img-$ver" ] && [ -d "/lib/modules/$ver" ] || {
  echo "make_cloud_image: no Debian kernel in /boot (install linux-image-amd64)" >&2
  exit 1
}

root="$work/root"
mmdebstrap --variant=apt \
  --include=systemd-sysv,openssh-server,cloud-init,cloud-guest-utils,e2fsprogs,locales,udev,iproute2,ifupdown,isc-dhcp-client,kmod,dbus,sudo \
  bookworm "$root" >>"$log" 2>&1
mkdir -p "$root/lib/modules"
cp -a "/lib/modules/$ver" "$root/lib/modules/"
echo "LABEL=cloudimg-rootfs / ext4 rw,discard,errors=remount-ro 0 1" >"$root/etc/fstab"
# Like the publishers' images: no host keys baked in (cloud-init makes them) and
# only the data sources that can answer here, so that nothing waits on a network probe.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/cloud/cloud.cfg.d/90-gate-test.cfg" <<'EOF'
datasource_list: [NoCloud, None]
EOF

mkfs.ext4 -q -F -L cloudimg-rootfs -d "$root" "$work/root.img" 2G >>"$log" 2>&1
rm -rf "$root"

cat >"$work/syslinux.cfg" <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.img root=LABEL=cloudimg-rootfs rw console=ttyS0
EOF
boot_mib=96
mkfs.vfat -C -n BOOT "$work/boot.img" $((boot_mib * 1024)) >>"$log" 2>&1
mcopy -i "$work/boot.img" "/boot/vmlinuz-$ver" ::vmlinuz
mcopy -i "$work/boot.img" "/boot/initrd.img-$ver" ::initrd.img
mcopy -i "$work/boot.img" "$work/syslinux.cfg" ::syslinux.cfg
syslinux --install "$work/boot.img"

# One disk: MBR boot code, the boot partition at 1 MiB (active), then the root.
root_mib=$(( ($(stat -c %s "$work/root.img") + 1048575) / 1048576 ))
disk="$work/disk.raw"
truncate -s $((1 + boot_mib + root_mib))M "$disk"
sfdisk -q "$disk" >>"$log" 2>&1 <<EOF
label: dos
start=1MiB, size=${boot_mib}MiB, type=e, bootable
start=$((1 + boot_mib))MiB, type=83
EOF
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$work/boot.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$disk" bs=1M seek=$((1 + boot_mib)) conv=notrunc,sparse status=none
qemu-img convert -O qcow2 "$disk" "$out.tmp"
mv "$out.tmp" "$out"
