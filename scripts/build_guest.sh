#!/usr/bin/env bash
# Build (once) the tiny QEMU guest for the end-to-end tests from Debian packages
# alone: the distribution kernel (downloaded and unpacked, never installed),
# its virtio modules, busybox-static and scripts/guest-init.sh as /init.
#
# Output, in ${BLKFS_GUEST_DIR:-$HOME/.cache/blkfs-guest}: vmlinuz, initrd.gz.
# A stamp (hash of the init script and of the recipe below) makes a second run
# a no-op.  The last line on stdout is the cache directory.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
init_src=$here/guest-init.sh
out=${BLKFS_GUEST_DIR:-$HOME/.cache/blkfs-guest}
# Load order matters: there is no modules.dep in the initramfs.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
PACKAGES=(qemu-system-x86 qemu-utils busybox-static)

log() { echo "build_guest: $*" >&2; }

[[ -f $init_src ]] || { log "missing $init_src"; exit 1; }
# Bump "recipe=N" when the layout of the initramfs changes.
want=$( { echo "recipe=1 modules=${MODULES[*]}"; cat "$init_src"; } | sha256sum | cut -d' ' -f1)
if [[ -f $out/vmlinuz && -f $out/initrd.gz && -f $out/stamp && $(cat "$out/stamp") == "$want" ]]; then
  echo "$out"
  exit 0
fi

# shellcheck source=lib.sh
source "$here/lib.sh"
ensure_packages build_guest "${PACKAGES[@]}"
busybox=/bin/busybox
[[ -x $busybox ]] || { log "$busybox not found (package busybox-static)"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/blkfs-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt when run as root: let it write here.
chmod 755 "$work"

# The metapackage only depends on the real, versioned kernel package.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
       awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
[[ -n $kpkg ]] || { log "apt-cache depends linux-image-amd64 names no kernel package (apt-get update?)"; exit 1; }
log "downloading $kpkg"
if ! (cd "$work" && apt-get download -qq "$kpkg" >/dev/null 2>&1); then
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    (cd "$work" && apt-get download -qq "$kpkg" >/dev/null)
  else
    log "apt-get download $kpkg failed - stale package lists? run: sudo apt-get update"
    exit 1
  fi
fi
deb=$(ls "$work"/*.deb)
dpkg -x "$deb" "$work/kernel"

vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -n1)
[[ -f $vmlinuz ]] || { log "no boot/vmlinuz-* in $deb"; exit 1; }

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 755 "$init_src" "$root/init"
for m in "${MODULES[@]}"; do
  f=$(find "$work"/kernel/lib/modules/*/kernel -name "$m.ko" -o -name "$m.ko.*" | head -n1)
  [[ -n $f ]] || { log "module $m not found in $kpkg"; exit 1; }
  # Decompress here: busybox insmod and the kernel's init_module want a plain ELF.
  case $f in
    *.ko) cp "$f" "$root/lib/modules/$m.ko" ;;
    *.ko.xz) "$busybox" xzcat "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/$m.ko" ;;
    *) log "unknown module compression: $f"; exit 1 ;;
  esac
done

(cd "$root" && find . | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -1 >"$work/initrd.gz"

mkdir -p "$out"
rm -f "$out/stamp"
cp "$vmlinuz" "$out/vmlinuz.tmp" && mv "$out/vmlinuz.tmp" "$out/vmlinuz"
cp "$work/initrd.gz" "$out/initrd.gz.tmp" && mv "$out/initrd.gz.tmp" "$out/initrd.gz"
echo "$kpkg" >"$out/kernel-package"
echo "$want" >"$out/stamp"
log "built from $kpkg: $(du -h "$out/vmlinuz" | cut -f1) kernel, $(du -h "$out/initrd.gz" | cut -f1) initrd"
echo "$out"
