#!/usr/bin/env bash
# Runs one fuzz target of dataplane/fuzz (cargo-fuzz, libFuzzer) for a bounded time.
#
#   deploy/fuzz.sh TARGET [SECONDS] [-- ARGS] fuzz TARGET for SECONDS (default 60); ARGS
#                                            go to libFuzzer, e.g. `-- -fork=2
#                                            -ignore_crashes=1` to go on past crashes
#   deploy/fuzz.sh --merge TARGET [SECONDS]  same, then merge the new inputs that add
#                                            coverage (minimized set) into the checked-in
#                                            corpus dataplane/fuzz/corpus/TARGET
#   deploy/fuzz.sh --build                   only build every target
#   deploy/fuzz.sh --list                    list the targets
#
# Targets: superblock, wal_batch, snapshot (spool_dataplane::store::fuzzing::fuzz_TARGET,
# replayed by dataplane/tests/fuzz_corpus.rs), net_frame
# (spool_dataplane::net::fuzzing::fuzz_net_frame, the transport's frame decoder, also
# replayed by dataplane/tests/fuzz_corpus.rs), admin_request
# (spool_controlplane::admin::fuzz_parse_request, replayed by
# controlplane/tests/admin_request_corpus.rs) and ns_rpc (spool_fuse_shim::rpc::
# fuzz_message, the cluster namespace RPC's message decoder, replayed by
# fuse-shim/tests/rpc_corpus.rs): `cargo test` runs the same checks on the checked-in
# corpora.
#
# Does it work here? Yes, on the stable toolchain (checked with rustc 1.95.0 and
# cargo-fuzz 0.13.2): cargo-fuzz passes nightly-only flags (-Zsanitizer=address, ...),
# which stable rustc accepts with RUSTC_BOOTSTRAP=1, and stable ships the sanitizer
# runtimes (librustc-stable_rt.asan.a), so the default AddressSanitizer build works.
# No nightly toolchain is needed or downloaded (the script uses the default toolchain,
# stable on the project's machines). FUZZ_SANITIZER=none builds without a
# sanitizer (faster; Rust code is memory-safe without it, and this crate has no
# `unsafe`). Builds are release with debug assertions and overflow checks on (the
# cargo-fuzz default; do not add -O, it turns them off).
#
# cargo-fuzz itself is installed from crates.io (`cargo install cargo-fuzz --locked`)
# when missing. Builds go to $CARGO_TARGET_DIR if set, else dataplane/fuzz/target.
# New inputs go to a scratch corpus ($FUZZ_WORK, default /tmp/spool-fuzz/TARGET), never
# straight into the checked-in one; crashes are saved in dataplane/fuzz/artifacts/TARGET/
# and the script exits non-zero. Reproduce one with
#   (cd dataplane && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...)
# minimize it with `cargo fuzz tmin TARGET FILE` (same way), and check it in under
# dataplane/fuzz/regressions/TARGET/ so `cargo test --test fuzz_corpus` replays it.
set -euo pipefail

TARGETS=(superblock wal_batch snapshot net_frame admin_request ns_rpc)
CARGO_FUZZ_VERSION=0.13.2

script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
here="$(dirname "$(dirname "$script")")"
fuzz_crate="$here/dataplane/fuzz"
cd "$here/dataplane"

usage() {
    sed -n '2,11p' "$script" | sed 's/^# \{0,1\}//'
    exit 2
}

merge=0
case "${1:-}" in
    --list) printf '%s\n' "${TARGETS[@]}"; exit 0 ;;
    --merge) merge=1; shift ;;
    --build|"") ;;
    -*) usage ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io" >&2
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
build_args=(--fuzz-dir "$fuzz_crate" --sanitizer "$sanitizer")

if [[ "${1:-}" == "--build" ]]; then
    cargo fuzz build "${build_args[@]}"
    exit 0
fi

target="${1:-}"
seconds=60
if [[ $# -ge 2 && "$2" != "--" ]]; then
    seconds="$2"
fi
extra=()
for ((i = 2; i <= $#; i++)); do
    if [[ "${!i}" == "--" ]]; then
        extra=("${@:i+1}")
        break
    fi
done
[[ -n "$target" ]] || usage
if [[ ! " ${TARGETS[*]} " =~ " $target " ]]; then
    echo "unknown target '$target' (one of: ${TARGETS[*]})" >&2
    exit 2
fi
[[ "$seconds" =~ ^[0-9]+$ ]] || usage

case "$target" in
    superblock) max_len=8192 ;;
    *) max_len=16384 ;;
esac

seeds="$fuzz_crate/corpus/$target"
work="${FUZZ_WORK:-/tmp/spool-fuzz}/$target"
mkdir -p "$work" "$fuzz_crate/artifacts/$target"

# libFuzzer writes new inputs into the first corpus directory and reads all of them.
cargo fuzz run "${build_args[@]}" "$target" "$work" "$seeds" -- \
    -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 "${extra[@]}"
echo "fuzz $target: ${seconds}s without a crash; $(find "$work" -type f | wc -l) inputs in $work" >&2

if [[ $merge == 1 ]]; then
    before=$(find "$seeds" -type f | wc -l)
    # Adds to the checked-in corpus only the inputs that add coverage.
    cargo fuzz run "${build_args[@]}" "$target" "$seeds" "$work" -- -merge=1 -max_len="$max_len"
    after=$(find "$seeds" -type f | wc -l)
    echo "merged $((after - before)) new inputs into $seeds" >&2
fi
