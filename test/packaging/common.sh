# Shared by the package tests (sourced): arguments, messages, a scratch directory
# removed on every exit, the .deb built with cpack, and commands run chrooted in a
# private mount and PID namespace.
#   source common.sh BUILD_DIR [CACHE_DIR]   sets build, cache, work; traps EXIT
#   on_exit CMD...       runs CMD first at exit (e.g. ends a process by its pid)
#   build_deb            sets deb to the package built from the build tree
#   in_chroot ROOT CMD...  runs CMD in ROOT with /proc, /dev and /run mounted there
build=$(cd "$1" && pwd)
cache=${2:-$build/packaging-cache}
mkdir -p "$cache" && cache=$(cd "$cache" && pwd)
start=$SECONDS
say() { printf '[%3ds] %s\n' $((SECONDS - start)) "$*"; }
skip() { echo "SKIP: $*"; exit 77; }
fail() { echo "FAIL: $*"; exit 1; }

[[ $(id -u) == 0 ]] || skip "needs root (chroot, mounts)"
for tool in mmdebstrap cpack unshare; do
  command -v "$tool" >/dev/null || skip "$tool is not installed (tools/bootstrap installs it)"
done
[[ -f $build/CPackConfig.cmake ]] || fail "$build/CPackConfig.cmake missing; configure first"

work=$(mktemp -d "${TMPDIR:-/tmp}/gate-package-test.XXXXXX")
exit_hooks=()
on_exit() { exit_hooks+=("$*"); }
cleanup() {
  local rc=$? hook
  for hook in "${exit_hooks[@]}"; do eval "$hook" || true; done
  # Mounts live only in the namespaces of in_chroot, so none is left here;
  # --one-file-system guards the host all the same should one remain.
  if grep -q " $work/" /proc/self/mounts; then
    echo "cleanup: mounts remain under $work; not deleting it" >&2
  else
    rm -rf --one-file-system "$work"
  fi
  exit $rc
}
trap cleanup EXIT INT TERM

build_deb() {
  say "building the .deb with cpack"
  (cd "$work" && cpack --config "$build/CPackConfig.cmake" -G DEB -B "$work/deb" >"$work/cpack.log" 2>&1) ||
    { cat "$work/cpack.log"; fail "cpack"; }
  deb=$(ls "$work"/deb/gate_*.deb)
  say "built ${deb##*/} ($(du -k "$deb" | cut -f1) KiB)"
}

# A private mount namespace (mounts vanish with it) and PID namespace (so does every
# process started there).
in_chroot() {
  unshare --mount --pid --fork --propagation private bash -c '
    set -e
    root=$1
    shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/run"
    chroot "$root" "$@"
  ' _ "$@"
}

# unpack_base TARBALL PACKAGES: a bookworm root (mmdebstrap, variant apt, with
# PACKAGES) unpacked into $root ($work/root) with the .deb in its /tmp; the tarball
# is made when missing or older than 30 days, and kept as a cache.
unpack_base() {
  local base=$1 packages=$2
  if [[ ! -s $base ]] || [[ -n $(find "$base" -mtime +30) ]]; then
    say "mmdebstrap: making a bookworm base with $packages (cached as $base)"
    mmdebstrap --variant=apt --format=tar --include="$packages" bookworm "$work/base.tar" \
      >"$work/mmdebstrap.log" 2>&1 || { tail -30 "$work/mmdebstrap.log"; fail "mmdebstrap"; }
    mv "$work/base.tar" "$base"
    say "base made ($(du -m "$base" | cut -f1) MiB)"
  else
    say "using the cached base $base"
  fi
  root=$work/root
  mkdir "$root"
  tar -C "$root" -xf "$base"
  cp "$deb" "$root/tmp/"
  say "root unpacked"
}
