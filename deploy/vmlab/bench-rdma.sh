#!/usr/bin/env bash
# The rdma transport's benchmark in the VM lab: `spool bench transport` in the guest,
# with soft-RoCE (rxe0) on the loopback interface: one link streaming through Spool's
# tcp transport and through rdma, vs iperf3 on the same address, with CPU seconds per
# GiB for each. Soft-RoCE does RDMA in the kernel, in software, under qemu's emulated
# CPUs: these are functional figures, not hardware speeds; the same
# `spool bench transport --rdma-device mlx5_0 --listen <HCA's IP>:0` runs unchanged on
# a machine with an RDMA NIC.
#
#   ./deploy/vmlab/bench-rdma.sh [SPOOL BENCH TRANSPORT OPTIONS]
#   e.g. ./deploy/vmlab/bench-rdma.sh --bytes 512MiB --rounds 3
#
# Environment: SPOOL_BIN (default target/release/spool, built if missing).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/spool-bin.sh"
exec ./deploy/vmlab/run.sh --nvme 16 --hugepages 256 --mem 3072 --timeout 3600 -- \
    bash -c 'modprobe -d /tmp/vmlab-root -a crc32_generic rdma_rxe ib_uverbs &&
             ip link set lo up &&
             rdma link add rxe0 type rxe netdev lo &&
             exec "$0" bench transport --rdma-device rxe0 "$@"' \
    "$bin" "$@"
