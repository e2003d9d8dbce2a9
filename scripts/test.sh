#!/usr/bin/env bash
# The whole test suite, from a clean checkout: checks the dependency direction, builds the
# binaries the end-to-end tests start, and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== dependency direction: valet-core has no I/O stack; the client never depends on the server"
forbidden_in_core=$(cargo tree -p valet-core -e normal --prefix none | grep -E '^(tonic|tokio|sled|hyper) ' || true)
if [ -n "$forbidden_in_core" ]; then
  echo "valet-core must not depend on an I/O stack, but depends on:"; echo "$forbidden_in_core"; exit 1
fi
if cargo tree -p valet-client -e normal --prefix none | grep -qE '^valet-(server|store) '; then
  echo "valet-client must not depend on valet-server or valet-store"; exit 1
fi

echo "== build the binaries the end-to-end tests run (valetd, valet)"
cargo build --workspace --bins --locked

echo "== tests"
cargo test --workspace --locked

echo "== benchmark smoke: every scenario of valet-bench, a few hundred requests each, no errors"
./target/debug/valet-bench all --smoke
