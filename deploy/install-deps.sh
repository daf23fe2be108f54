#!/usr/bin/env bash
# Installs what Spool's build, tests, benchmarks and quickstart need on Debian 12, and
# checks the Rust toolchain. Idempotent: when every package is already installed it
# does not touch apt at all, and it prints one line.
#
#   ./deploy/install-deps.sh          run it (as root when something must be installed)
#   . ./deploy/install-deps.sh        source it: same, and cargo is then on PATH in the
#                                     calling shell (run-tests.sh and quickstart.sh do this)
#
# Extra Debian packages for a one-off: SPOOL_EXTRA_PKGS="pkg1 pkg2" ./deploy/install-deps.sh
#
# It never downloads a toolchain: only Debian's archive and crates.io are used.
set -euo pipefail

# ---------------------------------------------------------------------------------------
# Debian packages, one list per purpose. To add a dependency, put it in the list of the
# purpose that needs it (or start a new list and add it to SPOOL_DEB_PKGS below).
# ---------------------------------------------------------------------------------------

# Compiling the workspace: C compiler for -sys crates, pkg-config + libhwloc-dev (hwloc2),
# clang + libclang-dev (bindgen), libfuse3-dev (fuser), libibverbs-dev (ffi's verbs
# bindings, rdma-core).
SPOOL_PKGS_BUILD=(build-essential pkg-config libhwloc-dev clang libclang-dev libfuse3-dev libibverbs-dev)

# Running the tests: fuse3 (fusermount3, /dev/fuse use), util-linux (losetup for loop
# devices), iproute2 (ip netns / veth for multi-node tests), jq (scripts read JSON),
# python3 (the DCP-like checkpoint writer, stdlib only; also the quickstart's demo).
SPOOL_PKGS_TEST=(fuse3 util-linux iproute2 jq python3)

# Benchmarks compare Spool to fio on the same device in the same run, and the blob tier
# to rclone's VFS cache mount (spool bench blob); rsvg-convert turns spool bench all's
# plot into a PNG.
SPOOL_PKGS_BENCH=(fio rclone librsvg2-bin)

# The quickstart scrapes the Prometheus endpoint with curl.
SPOOL_PKGS_QUICKSTART=(curl ca-certificates)

# Multi-node tests and benchmarks: a real etcd for membership, nftables and tc (iproute2)
# for the nemesis's partitions and throttles, iperf3 for the network's physical limit.
SPOOL_PKGS_CLUSTER=(etcd-server etcd-client nftables iperf3)

# Blob tier tests: Azurite (the Azure Storage emulator, from npm) runs on Node.js; moto's
# S3 server and the independent clients that check what Spool uploaded (the
# azure-storage-blob and boto3 Python packages) come from PyPI into a venv. All go to
# $SPOOL_TOOLS_DIR (see spool_deps_blob).
SPOOL_PKGS_BLOB=(python3-venv)
# npm comes with Debian's `npm` package, or bundled with a Node.js from elsewhere
# (NodeSource): install Debian's only when there is no npm at all.
command -v npm >/dev/null 2>&1 || SPOOL_PKGS_BLOB+=(nodejs npm)

# The VM lab (deploy/vmlab) tests the nvme and rdma backends in a qemu guest: qemu
# (with qboot), busybox-static and cpio for the initramfs, kmod to resolve the guest's
# modules, xz-utils; inside the guest, jobs use pciutils, rdma-core and ibverbs-utils.
# The guest kernel is Debian's linux-image package, fetched by deploy/vmlab/build-guest.sh.
SPOOL_PKGS_VMLAB=(qemu-system-x86 busybox-static kmod cpio xz-utils pciutils rdma-core ibverbs-utils)

SPOOL_DEB_PKGS=(
    "${SPOOL_PKGS_BUILD[@]}"
    "${SPOOL_PKGS_TEST[@]}"
    "${SPOOL_PKGS_BENCH[@]}"
    "${SPOOL_PKGS_QUICKSTART[@]}"
    "${SPOOL_PKGS_CLUSTER[@]}"
    "${SPOOL_PKGS_BLOB[@]}"
    "${SPOOL_PKGS_VMLAB[@]}"
)

# Where the blob tier's test tools live (outside the checkout, shared by runs).
SPOOL_TOOLS_DIR="${SPOOL_TOOLS_DIR:-/opt/spool-tools}"
# Azurite 3.35 is the newest that runs on Debian 12's Node.js 18 (3.36+ need Node 22).
SPOOL_AZURITE_VERSION="3.35.0"
# The independent clients and the S3 server of the blob tests (boto3 comes with moto).
SPOOL_BLOB_PY=("azure-storage-blob==12.31.1" "moto[server]==5.1.4")

# Oldest cargo accepted; the workspace's rust-version wins when it can be read.
SPOOL_MIN_RUST="1.85"

# ---------------------------------------------------------------------------------------

spool_deps_say() { printf 'install-deps: %s\n' "$*" >&2; }

spool_deps_die() {
    printf '\ninstall-deps: ERROR: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    printf '\n' >&2
    exit 1
}

# Prints the packages of SPOOL_DEB_PKGS and SPOOL_EXTRA_PKGS that are not installed.
spool_deps_missing() {
    local pkg
    local -a all=("${SPOOL_DEB_PKGS[@]}")
    # shellcheck disable=SC2206 # word splitting of the extra list is intended
    all+=(${SPOOL_EXTRA_PKGS:-})
    for pkg in "${all[@]}"; do
        if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]]; then
            printf '%s\n' "$pkg"
        fi
    done | sort -u
}

spool_deps_apt() {
    local -a missing
    mapfile -t missing < <(spool_deps_missing)
    ((${#missing[@]} == 0)) && return 0

    if ((EUID != 0)); then
        spool_deps_die "these Debian packages are missing and installing them needs root: ${missing[*]}" \
            "run: sudo ./deploy/install-deps.sh" \
            "or:  sudo apt-get install ${missing[*]}"
    fi
    command -v apt-get >/dev/null ||
        spool_deps_die "apt-get not found: Spool's scripts support Debian 12 (bookworm) only" \
            "install by hand: ${missing[*]}"

    spool_deps_say "installing ${#missing[@]} Debian package(s): ${missing[*]}"
    local log
    log="$(mktemp /tmp/spool-install-deps.XXXXXX.log)"
    local -a apt=(apt-get -q -y -o DPkg::Lock::Timeout=300)
    export DEBIAN_FRONTEND=noninteractive

    # Always refresh the lists first: on a fresh machine they may be stale or absent. A
    # failed update is not fatal by itself (old lists may still do); a failed install is.
    local try ok=0
    for try in 1 2 3; do
        if "${apt[@]}" update >>"$log" 2>&1 </dev/null; then ok=1; break; fi
        sleep $((try * 5))
    done
    ((ok)) || spool_deps_say "warning: apt-get update failed 3 times; trying the install with the lists we have"

    # Some machine images carry a newer qemu-utils (from backports) that conflicts with
    # Debian 12's qemu-system-x86: install the qemu-utils of the same version with it.
    local -a pins=()
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        local qver
        qver="$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')"
        [[ -n "$qver" && "$qver" != "(none)" ]] && pins=(--allow-downgrades "qemu-utils=$qver")
    fi

    ok=0
    for try in 1 2; do
        if "${apt[@]}" install --no-install-recommends "${missing[@]}" "${pins[@]}" >>"$log" 2>&1 </dev/null; then ok=1; break; fi
        sleep 5
    done
    if ((!ok)); then
        printf '\n---- last 40 lines of %s ----\n' "$log" >&2
        tail -n 40 "$log" >&2
        spool_deps_die "apt-get install failed for: ${missing[*]}" \
            "full log: $log" \
            "check the Debian archive is reachable (apt-get update) and the package names exist (apt-cache policy NAME)"
    fi

    mapfile -t missing < <(spool_deps_missing)
    ((${#missing[@]} == 0)) ||
        spool_deps_die "apt-get reported success but these are still not installed: ${missing[*]}" "log: $log"
    rm -f "$log"
}

# Puts cargo on PATH if it is installed but not there: `sudo` resets PATH to its
# secure_path, which does not hold ~/.cargo/bin. Looks in $CARGO_HOME, $HOME, /root, and
# the home of the user who ran sudo (then that user's CARGO_HOME/RUSTUP_HOME are used).
spool_deps_find_cargo() {
    command -v cargo >/dev/null && return 0
    local dir home
    for dir in "${CARGO_HOME:+$CARGO_HOME/bin}" "${HOME:+$HOME/.cargo/bin}" /root/.cargo/bin; do
        if [[ -n "$dir" && -x "$dir/cargo" ]]; then
            export PATH="$dir:$PATH"
            return 0
        fi
    done
    if [[ -n "${SUDO_USER:-}" ]]; then
        home="$(getent passwd "$SUDO_USER" | cut -d: -f6 || true)"
        if [[ -n "$home" && -x "$home/.cargo/bin/cargo" ]]; then
            export PATH="$home/.cargo/bin:$PATH"
            export CARGO_HOME="${CARGO_HOME:-$home/.cargo}"
            [[ -d "$home/.rustup" ]] && export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
            return 0
        fi
    fi
    return 1
}

spool_deps_rust() {
    local fix_toolchain="Install Rust >= $SPOOL_MIN_RUST with rustup (https://rustup.rs) as root, or put an existing
  toolchain's bin directory on PATH. This script does not download toolchains."

    spool_deps_find_cargo ||
        spool_deps_die "cargo not found on PATH, in \$CARGO_HOME/bin, ~/.cargo/bin or /root/.cargo/bin" \
            "$fix_toolchain"

    local here root min
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    root="$(dirname "$here")"
    min="$(sed -n 's/^rust-version *= *"\([0-9][0-9.]*\)".*/\1/p' "$root/Cargo.toml" 2>/dev/null | head -n1 || true)"
    [[ -n "$min" ]] && SPOOL_MIN_RUST="$min"

    local out
    out="$(cargo --version 2>&1)" ||
        spool_deps_die "'cargo --version' failed: $out" \
            "if this is rustup without a default toolchain: rustup default stable (needs an installed toolchain)" \
            "$fix_toolchain"
    if [[ ! "$out" =~ ^cargo\ ([0-9]+)\.([0-9]+) ]]; then
        spool_deps_die "cannot read the version from 'cargo --version': $out" "$fix_toolchain"
    fi
    local have_major="${BASH_REMATCH[1]}" have_minor="${BASH_REMATCH[2]}"
    local need_major="${SPOOL_MIN_RUST%%.*}" need_minor="${SPOOL_MIN_RUST#*.}"
    need_minor="${need_minor%%.*}"
    if ((have_major < need_major || (have_major == need_major && have_minor < need_minor))); then
        spool_deps_die "$(command -v cargo) is $have_major.$have_minor; Spool needs >= $SPOOL_MIN_RUST (workspace rust-version)" \
            "with rustup and network access to its server: rustup update stable" \
            "$fix_toolchain"
    fi
    SPOOL_CARGO_VERSION="$have_major.$have_minor"

    if ! cargo nextest --version >/dev/null 2>&1; then
        spool_deps_say "cargo-nextest not found; building it from crates.io (cargo install --locked cargo-nextest, several minutes)"
        local log
        log="$(mktemp /tmp/spool-install-nextest.XXXXXX.log)"
        if ! cargo install --locked cargo-nextest </dev/null >"$log" 2>&1; then
            printf '\n---- last 40 lines of %s ----\n' "$log" >&2
            tail -n 40 "$log" >&2
            spool_deps_die "cargo install --locked cargo-nextest failed" \
                "full log: $log" \
                "crates.io must be reachable; the build needs a C compiler (build-essential)"
        fi
        rm -f "$log"
        cargo nextest --version >/dev/null 2>&1 ||
            spool_deps_die "cargo-nextest was installed but 'cargo nextest' still does not run" \
                "is $(dirname "$(command -v cargo)") (or \$CARGO_HOME/bin) on PATH?"
    fi
    SPOOL_NEXTEST_VERSION="$(cargo nextest --version 2>/dev/null | head -n1 | awk '{print $2}')"
}

# Azurite from npm, and the Azure SDK for Python, moto and boto3 from PyPI, installed once into
# $SPOOL_TOOLS_DIR (the registries are the only downloads).
spool_deps_blob() {
    local dir="$SPOOL_TOOLS_DIR" log
    if [[ ! -x "$dir/azurite/node_modules/.bin/azurite-blob" ]]; then
        spool_deps_say "installing Azurite $SPOOL_AZURITE_VERSION from npm into $dir/azurite"
        mkdir -p "$dir/azurite"
        log="$(mktemp /tmp/spool-install-azurite.XXXXXX.log)"
        if ! (cd "$dir/azurite" && npm install --no-audit --no-fund --loglevel=error \
            "azurite@$SPOOL_AZURITE_VERSION") </dev/null >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            spool_deps_die "npm install azurite@$SPOOL_AZURITE_VERSION failed" "full log: $log" \
                "the npm registry must be reachable"
        fi
        rm -f "$log"
    fi
    if ! "$dir/venv/bin/python" -c 'import azure.storage.blob, boto3, moto' >/dev/null 2>&1 ||
        [[ ! -x "$dir/venv/bin/moto_server" ]]; then
        spool_deps_say "installing ${SPOOL_BLOB_PY[*]} from PyPI into $dir/venv"
        log="$(mktemp /tmp/spool-install-venv.XXXXXX.log)"
        if ! { /usr/bin/python3 -m venv "$dir/venv" &&
            "$dir/venv/bin/pip" install -q "${SPOOL_BLOB_PY[@]}"; } </dev/null >"$log" 2>&1; then
            tail -n 40 "$log" >&2
            spool_deps_die "creating $dir/venv with ${SPOOL_BLOB_PY[*]} failed" "full log: $log" \
                "PyPI must be reachable; Debian's python3-venv must be installed"
        fi
        rm -f "$log"
    fi
    export SPOOL_TOOLS_DIR
}

# The VM lab's guest (Debian's kernel and a busybox initramfs), built once into
# $SPOOL_TOOLS_DIR/vmlab; the script prints one line when it is already there.
spool_deps_vmlab() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    SPOOL_TOOLS_DIR="$SPOOL_TOOLS_DIR" "$here/vmlab/build-guest.sh" ||
        spool_deps_die "building the VM lab guest failed (see above)" \
            "it needs the Debian archive (apt-get download of the kernel package)"
}

spool_install_deps() {
    spool_deps_apt
    spool_deps_blob
    spool_deps_vmlab
    spool_deps_rust
    spool_deps_say "ok: ${#SPOOL_DEB_PKGS[@]} Debian packages present, cargo $SPOOL_CARGO_VERSION, cargo-nextest $SPOOL_NEXTEST_VERSION"
}

spool_install_deps
