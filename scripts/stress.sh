#!/usr/bin/env bash
# The stress check developers run before resolving anything that touches concurrency: the
# concurrency-sensitive end-to-end tests (replicas on etcd, AWS revocation races, kill -9 and
# restart, MCP servers, disk full) run ROUNDS times (default 20) while a CPU hog keeps both cores
# busy, as CI's shared machine may. Any failure is printed with its output; the last line counts
# them. Run ./scripts/test.sh once first (it installs etcd, moto, the MCP SDK and the Node
# upstreams).
#
#   ./scripts/stress.sh                 # 20 rounds of the default set
#   ROUNDS=3 ./scripts/stress.sh mcp::  # 3 rounds of the tests whose names contain mcp::
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-20}
filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
  filters=(distributed:: aws:: restart:: mcp:: disk_full:: console::)
fi

cargo build --workspace --bins --locked || exit 1
cargo test -p valet-tests --test e2e --locked --no-run || exit 1

# One busy loop per core, stopped however this script ends.
hogs=()
for _ in $(seq "$(nproc)"); do
  (while :; do :; done) &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null' EXIT

directory=$(mktemp -d)
failures=0
passed=0
for round in $(seq "$rounds"); do
  output="$directory/round-$round.log"
  started=$(date +%s)
  if cargo test -p valet-tests --test e2e --locked -- "${filters[@]}" >"$output" 2>&1; then
    status=passed
  else
    status=FAILED
    failures=$((failures + 1))
  fi
  counts=$(grep -E '^test result:' "$output" | tail -1)
  n_passed=$(echo "$counts" | awk '{print $4}')
  passed=$((passed + ${n_passed:-0}))
  echo "round $round/$rounds: $status in $(($(date +%s) - started)) s ($counts)"
  if [ "$status" = FAILED ]; then
    grep -E '^test .* \.\.\. FAILED$' "$output" | sed 's/^/  /'
    sed -n '/^failures:$/,/^test result:/p' "$output" | head -200
  fi
done
rm -rf "$directory"
echo "stress: $rounds rounds under a CPU hog on $(nproc) cores, $passed tests passed, $failures rounds failed"
[ "$failures" -eq 0 ]
