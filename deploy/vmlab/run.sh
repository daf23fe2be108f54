#!/usr/bin/env bash
# Runs one command inside the VM lab's guest and exits with its exit status.
#
#   ./deploy/vmlab/run.sh [OPTIONS] -- COMMAND [ARGS...]
#
# The guest (deploy/vmlab/build-guest.sh, built on first use) boots Debian's kernel
# under qemu (TCG: KVM does not work on this project's machines) on a q35 machine with a
# virtual Intel IOMMU, sees the host's root read-only over 9p and runs COMMAND there,
# chrooted, in the current directory: host binaries (test binaries, spool) run as they
# are, with the host's libraries. The guest's /tmp shows the host's /tmp under a layer
# of the guest's own memory (a checkout there works; the guest's writes never reach the
# host). A job loads more of the guest's modules with `modprobe -d /tmp/vmlab-root MOD`.
#
# Options:
#   --nvme SIZE_MIB    attach an emulated NVMe controller with a fresh SIZE_MIB disk at
#                      PCI 0000:00:04.0, unbound (a job binds it to vfio-pci or loads
#                      nvme); the job sees SPOOL_VMLAB_NVME=0000:00:04.0
#   --cpus N           guest CPUs (default 2)
#   --mem MIB          guest memory (default 2048)
#   --hugepages N      2 MiB hugepages reserved at boot (default 64)
#   --timeout S        kill the guest after S seconds (default 600): exit status 124
#   --env NAME=VALUE   set in the job's environment (repeatable); RUST_BACKTRACE,
#                      RUST_LOG, RUST_TEST_THREADS and SPOOL_* pass through from the
#                      caller
#
# Exit status: COMMAND's (0-127; larger values read as 127), 124 on timeout, 125 when
# the guest could not boot or run the job.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
vmlab="${SPOOL_VMLAB_DIR:-${SPOOL_TOOLS_DIR:-/opt/spool-tools}/vmlab}"

nvme_mib="" cpus=2 mem_mib=2048 hugepages=64 timeout_s=600
envs=()
die() {
    printf 'vmlab: ERROR: %s\n' "$*" >&2
    exit 125
}
while (($#)); do
    case "$1" in
    --nvme) nvme_mib="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --mem) mem_mib="$2"; shift 2 ;;
    --hugepages) hugepages="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see the header of $0)" ;;
    esac
done
(($#)) || die "no command given: $0 [OPTIONS] -- COMMAND [ARGS...]"
for n in "$cpus" "$mem_mib" "$hugepages" "$timeout_s" ${nvme_mib:+"$nvme_mib"}; do
    [[ "$n" =~ ^[0-9]+$ ]] || die "'$n' is not a number"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found: run ./deploy/install-deps.sh"

"$here/build-guest.sh" >&2 || die "building the guest failed"

job="$(mktemp -d /tmp/spool-vmlab-job.XXXXXX)"
trap 'rm -rf "$job"' EXIT
# The caller's test knobs pass through: RUST_* and SPOOL_* (e.g. SPOOL_DCP_SEED).
while read -r v; do
    [[ "$v" == SPOOL_VMLAB_* ]] || envs+=("$v=${!v}")
done < <(compgen -e | grep -E '^(RUST_BACKTRACE|RUST_LOG|RUST_TEST_THREADS|SPOOL_[A-Z0-9_]+)$' || true)
envs+=(SPOOL_VMLAB_GUEST=1)
drive=()
if [[ -n "$nvme_mib" ]]; then
    truncate -s "${nvme_mib}M" "$job/nvme.img"
    drive=(-drive "file=$job/nvme.img,if=none,id=nvm,format=raw,cache=unsafe"
        -device "nvme,serial=spool-vmlab,drive=nvm,addr=04.0")
    envs+=(SPOOL_VMLAB_NVME=0000:00:04.0)
fi
{
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'export PATH=%q\n' "$PATH:/usr/local/sbin:/usr/sbin:/sbin"
    for e in "${envs[@]}"; do printf 'export %q\n' "$e"; done
    printf 'exec'
    printf ' %q' "$@"
    printf '\n'
} >"$job/job.sh"

set +e
timeout --foreground -k 5 "$timeout_s" qemu-system-x86_64 \
    -machine q35,accel=tcg -cpu max -smp "$cpus" -m "$mem_mib" \
    -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
    -bios /usr/share/qemu/qboot.rom -kernel "$vmlab/vmlinux" -initrd "$vmlab/initramfs.gz" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 intel_iommu=on vmlab.hugepages=$hugepages" \
    -device intel-iommu,intremap=on,eim=off \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$job,mount_tag=job,security_model=none" \
    "${drive[@]}" </dev/null
qemu_rc=$?
set -e
((qemu_rc == 124 || qemu_rc == 137)) && { printf 'vmlab: guest timed out after %ss\n' "$timeout_s" >&2; exit 124; }
[[ -f "$job/rc" ]] || die "the guest ended (qemu status $qemu_rc) without running the job"
rc="$(cat "$job/rc")"
# isa-debug-exit makes qemu exit with (rc << 1) | 1: a mismatch means the guest did
# not end the way /init ends it.
((qemu_rc == ((rc << 1 | 1) & 255))) || printf 'vmlab: note: qemu exit status %s for job status %s\n' "$qemu_rc" "$rc" >&2
exit "$rc"
