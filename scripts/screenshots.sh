#!/usr/bin/env bash
# Regenerates the console screenshots the docs show (docs/console/*.png): runs the browser tests
# with VALET_SCREENSHOTS pointing there. The test command writes its screenshots under target/
# instead, so a test run never changes a tracked file. Needs what ./scripts/test.sh installs
# (the client venv with Playwright, Debian's chromium) and the debug binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
client_venv=var/python-client-venv
if ! [ -x "$client_venv/bin/pytest" ]; then
  echo "$client_venv is missing: run ./scripts/test.sh once, which creates it"; exit 1
fi
cargo build --workspace --bins --locked
(cd "$client_venv" && VALET_SCREENSHOTS="$PWD/../../docs/console" VALET_BINARIES="$PWD/../../target/debug" \
  bin/pytest -q --timeout 180 -p no:cacheprovider ../../tests/console)
git status --short docs/console
