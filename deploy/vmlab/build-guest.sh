#!/usr/bin/env bash
# Builds the VM lab's guest: Debian's own kernel (from the Debian archive, never from
# elsewhere) and a small busybox initramfs with the modules the lab needs. Idempotent:
# when the guest in $SPOOL_VMLAB_DIR was built by this very script, it prints one line.
#
#   ./deploy/vmlab/build-guest.sh        build (or check) the guest
#
# Output, in $SPOOL_VMLAB_DIR (default $SPOOL_TOOLS_DIR/vmlab, /opt/spool-tools/vmlab):
#   vmlinux          the uncompressed kernel, booted directly (PVH entry, qboot), which
#                    saves seconds per boot under software emulation
#   initramfs.gz     busybox-static, the modules, and deploy/vmlab/init as /init
#   kver             the guest kernel's release, e.g. 6.1.0-56-amd64
#   stamp            a hash of this script and init: a change rebuilds the guest
#
# Needs (deploy/install-deps.sh installs them): busybox-static, kmod, cpio, xz-utils,
# python3, and apt-get to download the kernel package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${SPOOL_VMLAB_DIR:-${SPOOL_TOOLS_DIR:-/opt/spool-tools}/vmlab}"

# The guest's modules, loaded by /init in this order (each with its dependencies):
# 9p over virtio to reach the host's files, overlay for a writable /tmp over the host's, VFIO for the userspace NVMe driver, FUSE for
# Spool's mount (the kernel's nvme driver is there to compare against, loaded by a job
# when it wants it),
# soft-RoCE for the RDMA transport, veth and netem for network tests.
modules=(virtio_pci 9pnet_virtio 9p overlay vfio-pci vfio_iommu_type1 fuse nvme crc32_generic
    rdma_rxe ib_uverbs rdma_ucm veth sch_netem)
# Loaded at boot; the rest only when a job asks (modprobe works in the job's chroot).
boot_modules=(virtio_pci 9pnet_virtio 9p overlay vfio-pci vfio_iommu_type1 fuse)

say() { printf 'vmlab: %s\n' "$*" >&2; }
die() {
    printf 'vmlab: ERROR: %s\n' "$*" >&2
    exit 1
}

stamp="$(cat "${BASH_SOURCE[0]}" "$here/init" | sha256sum | cut -c1-16)"
if [[ -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp" && -f "$out/vmlinux" &&
    -f "$out/initramfs.gz" ]]; then
    say "guest ok: $out (kernel $(cat "$out/kver"))"
    exit 0
fi

for tool in busybox depmod modprobe cpio xz python3 apt-get dpkg; do
    command -v "$tool" >/dev/null || die "$tool not found: run ./deploy/install-deps.sh"
done
ldd "$(command -v busybox)" >/dev/null 2>&1 &&
    die "busybox is dynamically linked: install busybox-static"

# The kernel that Debian's linux-image-amd64 points at.
pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[[ -n "$pkg" ]] || die "cannot resolve linux-image-amd64 to a kernel package (apt-get update?)"
kver="${pkg#linux-image-}"

work="$(mktemp -d /tmp/spool-vmlab-build.XXXXXX)"
trap 'rm -rf "$work"' EXIT
say "downloading $pkg from the Debian archive"
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) ||
    die "apt-get download $pkg failed (is the Debian archive reachable?)"
dpkg -x "$work"/"$pkg"_*.deb "$work/kernel"
depmod -b "$work/kernel" "$kver"

# The uncompressed ELF kernel: the xz payload of the bzImage.
python3 - "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinux" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
at = data.find(b"\xfd7zXZ\x00")
if at < 0:
    sys.exit("vmlab: no xz payload in " + sys.argv[1])
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
if elf[:4] != b"\x7fELF":
    sys.exit("vmlab: the xz payload is not an ELF kernel")
open(sys.argv[2], "wb").write(elf)
EOF

root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,host,lib/modules}
cp "$(command -v busybox)" "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod 755 "$root/init"
: >"$root/modules.boot"
declare -A copied=()
for m in "${modules[@]}"; do
    deps="$(modprobe -S "$kver" -d "$work/kernel" --show-depends "$m")" ||
        die "module $m not found in $pkg"
    while read -r verb path _; do
        [[ "$verb" == insmod && -z "${copied[$path]:-}" ]] || continue
        copied[$path]=1
        rel="${path#"$work/kernel"}"
        mkdir -p "$root/$(dirname "$rel")"
        cp "$path" "$root/$rel"
    done <<<"$deps"
done
for m in "${boot_modules[@]}"; do
    modprobe -S "$kver" -d "$work/kernel" --show-depends "$m" |
        awk -v k="$work/kernel" '$1 == "insmod" { sub(k, "", $2); print $2 }'
done | awk '!seen[$0]++' >"$root/modules.boot"
cp "$work/kernel/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

mkdir -p "$out"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -6) >"$out/initramfs.gz.new"
mv "$work/vmlinux" "$out/vmlinux"
mv "$out/initramfs.gz.new" "$out/initramfs.gz"
printf '%s\n' "$kver" >"$out/kver"
printf '%s\n' "$stamp" >"$out/stamp"
say "guest built: $out (kernel $kver, initramfs $(du -h "$out/initramfs.gz" | cut -f1))"
