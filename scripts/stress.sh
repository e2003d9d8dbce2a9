#!/usr/bin/env bash
# The stress check developers run before resolving anything that touches concurrency: the
# concurrency-sensitive end-to-end tests (replicas on etcd, AWS revocation races, kill -9 and
# restart, MCP servers, disk full) run ROUNDS times (default 20) while a CPU hog keeps both cores
# busy, as CI's shared machine may. Any failure is printed with its output; the last line counts
# them. Run ./scripts/test.sh once first (it installs etcd, moto, the MCP SDK and the Node
# upstreams). The binaries are copied before the first round, so building meanwhile changes
# nothing under test.
#
#   ./scripts/stress.sh                 # 20 rounds of the default set
#   ROUNDS=3 ./scripts/stress.sh mcp::  # 3 rounds of the tests whose names contain mcp::
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${ROUNDS:-20}
filters=("$@")
if [ ${#filters[@]} -eq 0 ]; then
  filters=(distributed:: aws:: restart:: mcp:: disk_full:: console:: hostile:: abuse::)
fi

cargo build --workspace --bins --locked || exit 1
e2e=$(cargo test -p valet-tests --test e2e --locked --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "e2e" and message.get("executable"):
        print(message["executable"])') || exit 1
# The binaries under test, copied once: the rounds run these, whatever is built meanwhile. The
# harness finds valetd and valet next to the test executable's directory, as under target/debug.
snapshot=$(mktemp -d)
mkdir -p "$snapshot/debug/deps"
cp target/debug/valetd target/debug/valet target/debug/valet-bench "$snapshot/debug/"
cp "$e2e" "$snapshot/debug/deps/"
e2e="$snapshot/debug/deps/$(basename "$e2e")"

# One busy loop per core, stopped however this script ends.
hogs=()
for _ in $(seq "$(nproc)"); do
  (while :; do :; done) &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null; rm -rf "$snapshot"' EXIT

directory=$(mktemp -d)
failures=0
passed=0
for round in $(seq "$rounds"); do
  output="$directory/round-$round.log"
  started=$(date +%s)
  if "$e2e" "${filters[@]}" >"$output" 2>&1; then
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
