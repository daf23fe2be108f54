# Sourced by the VM lab's benchmark scripts: cd to the repository and set $bin to an
# absolute path to the spool binary (SPOOL_BIN, default target/release/spool, built if
# missing).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin="${SPOOL_BIN:-target/release/spool}"
if [[ ! -x "$bin" ]]; then
    cargo build --release --locked -p spool-controlplane --bin spool
fi
bin="$(realpath "$bin")"
