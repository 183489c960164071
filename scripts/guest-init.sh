#!/bin/sh
# /init of the tiny QEMU test guest (built by scripts/build_guest.sh).
#
# Proves to the host, on the serial console, that a live migration kept both
# the guest's RAM and its disk:
#   BOOTED                       - modules loaded, /dev/vda present
#   CANARY <md5>                 - 16 MiB of random data now sits in guest RAM (tmpfs)
#   TICK n disk=ok canary=ok     - once per tick: "TICK n" written to 4 KiB block n of
#                                  /dev/vda with O_DIRECT, read back with O_DIRECT and
#                                  compared; the canary's md5 re-checked.
# The tick counter lives in guest RAM, so after a migration it must go on from
# where the source stopped; a gap or a restart at 1 means the RAM was lost.
# No `set -e`: if /init exits the kernel panics and QEMU (-no-reboot) quits.

/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=32m tmpfs /tmp
# The initramfs has no /dev/console node, so the kernel could not give us a
# console: take it now that devtmpfs is there.
exec </dev/console >/dev/console 2>&1

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    insmod "/lib/modules/$m.ko" || echo "INSMOD-FAILED $m"
done

i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
    echo "NO-DISK /dev/vda"
fi
echo BOOTED

dd if=/dev/urandom of=/tmp/canary bs=1048576 count=16 2>/dev/null
canary=$(md5sum /tmp/canary | cut -d' ' -f1)
echo "CANARY $canary"

# Blocks on the disk (4 KiB each); block 0 is never written, n wraps around.
sectors=$(cat /sys/block/vda/size 2>/dev/null || echo 0)
blocks=$((sectors / 8))
[ "$blocks" -gt 1 ] || blocks=2

n=0
while true; do
    n=$((n + 1))
    blk=$(( (n - 1) % (blocks - 1) + 1 ))
    # Exactly one 4 KiB block ("TICK n\n" padded with zeros): O_DIRECT needs it aligned.
    { printf 'TICK %d\n' "$n"; head -c 4096 /dev/zero; } | head -c 4096 >/tmp/want
    disk=ok
    dd if=/tmp/want of=/dev/vda bs=4096 seek="$blk" count=1 oflag=direct conv=notrunc \
        2>/dev/null || disk=WRITE-FAILED
    if [ "$disk" = ok ]; then
        if dd if=/dev/vda of=/tmp/got bs=4096 skip="$blk" count=1 iflag=direct 2>/dev/null; then
            cmp -s /tmp/want /tmp/got || disk=BAD
        else
            disk=READ-FAILED
        fi
    fi
    if [ "$(md5sum /tmp/canary | cut -d' ' -f1)" = "$canary" ]; then
        c=ok
    else
        c=BAD
    fi
    echo "TICK $n disk=$disk canary=$c"
    sleep 0.3
done
