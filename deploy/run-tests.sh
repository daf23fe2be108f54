#!/usr/bin/env bash
# The whole test suite, exactly what CI runs (.ci/run execs this script):
#   1. deploy/install-deps.sh     Debian packages, cargo >= rust-version, cargo-nextest
#   2. cargo fmt --check          formatting
#   3. cargo clippy -D warnings   lints, every crate and target
#   4. build the test binaries once (nextest --no-run)
#   5. cargo nextest run          every test; its summary is the last thing printed and
#                                 its exit code is this script's exit code
#
# Options (environment):
#   SPOOL_TEST_FILTER='EXPR'   nextest filterset for step 5, e.g.
#                              SPOOL_TEST_FILTER='package(spool-hugepages)' or 'test(/uring/)'
#                              (see: cargo nextest help filterset)
# Extra arguments are passed to `cargo nextest run`, e.g. ./deploy/run-tests.sh --no-capture
#
# Run as root: tests use loop devices, FUSE mounts, hugepages and network namespaces.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

# Sourced, not run: it also puts cargo on PATH when sudo has dropped ~/.cargo/bin.
# shellcheck source=deploy/install-deps.sh
. ./deploy/install-deps.sh

if [[ "${CI:-}" == "true" || "${CI:-}" == "1" ]]; then
    export CARGO_TERM_COLOR=never
    export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}" # one-shot build: incremental only costs
    export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
fi
color=()
[[ "${CARGO_TERM_COLOR:-}" == never ]] && color=(--color never)

if ((EUID != 0)); then
    cat >&2 <<'EOF'

NOTE: not running as root. Tests that need loop devices (losetup), FUSE mounts,
hugepages or network namespaces will be skipped or fail. For the full suite run:
    sudo ./deploy/run-tests.sh
EOF
fi
[[ -e /dev/fuse ]] || printf '\nNOTE: /dev/fuse does not exist: FUSE tests will be skipped or fail.\n' >&2

for tool in fmt clippy; do
    cargo "$tool" --version >/dev/null 2>&1 || {
        printf '\nrun-tests: ERROR: cargo %s is not installed.\n' "$tool" >&2
        printf '  add the component to the toolchain: rustup component add %s\n' \
            "$([[ $tool == fmt ]] && echo rustfmt || echo clippy)" >&2
        printf '  (this needs rustup'"'"'s server; the scripts do not download toolchain parts)\n\n' >&2
        exit 1
    }
done

step "cargo fmt --all -- --check"
if ! cargo fmt --all -- --check; then
    printf '\nrun-tests: formatting differs (diff above). Fix with: cargo fmt --all\n' >&2
    exit 1
fi

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy "${color[@]}" --workspace --all-targets --locked -- -D warnings

# A test killed mid-run (or a crashed daemon) can leave a FUSE mount under /tmp behind;
# nothing else mounts `spool` there, so detach those before the run.
awk '$3 ~ /^fuse/ && $1 == "spool" && $2 ~ "^/tmp/" {print $2}' /proc/mounts 2>/dev/null |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done

step "build the test binaries (cargo nextest run --no-run)"
cargo nextest run "${color[@]}" --workspace --locked --no-run

filter=()
[[ -n "${SPOOL_TEST_FILTER:-}" ]] && filter=(-E "$SPOOL_TEST_FILTER")

step "cargo nextest run --workspace --no-fail-fast ${filter[*]} $*"
# exec: nothing runs after the runner, so its summary is the last output and its exit
# code is ours.
exec cargo nextest run "${color[@]}" --workspace --locked --no-fail-fast "${filter[@]}" "$@" </dev/null
