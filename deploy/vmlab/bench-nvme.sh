#!/usr/bin/env bash
# The nvme backend's benchmark in the VM lab: `spool bench device --nvme` in the guest,
# which runs the same sequential write and read through Spool's own NVMe driver (over
# VFIO) and through fio on the kernel's nvme driver, on one emulated controller, with
# CPU seconds per GiB for each. Under qemu's software emulation these are functional
# figures, not hardware speeds; the same `spool bench device --nvme ADDR` runs unchanged
# on a real machine with an IOMMU.
#
#   ./deploy/vmlab/bench-nvme.sh [SPOOL BENCH DEVICE OPTIONS]
#   e.g. ./deploy/vmlab/bench-nvme.sh --repeat 3 --queue-depth 32
#
# Environment: SPOOL_BIN (default target/release/spool, built if missing),
# SPOOL_VMLAB_DISK_MIB (default 4096: the emulated namespace, a sparse host file).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/spool-bin.sh"
disk_mib="${SPOOL_VMLAB_DISK_MIB:-4096}"
# The guest loads the kernel's nvme driver first (it takes the controller); the bench
# hands the controller to vfio-pci for Spool's rows and back to nvme for fio's.
exec ./deploy/vmlab/run.sh --nvme "$disk_mib" --hugepages 256 --mem 3072 --timeout 3600 -- \
    bash -c 'modprobe -d /tmp/vmlab-root nvme && exec "$0" bench device --nvme "$SPOOL_VMLAB_NVME" "$@"' \
    "$bin" "$@"
