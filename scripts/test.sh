#!/usr/bin/env bash
# The whole test suite, from a clean checkout: checks the dependency direction, builds the
# binaries the end-to-end tests start, and runs every test in the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== dependency direction: valet-core has no I/O stack; valet-service no transport; the client never depends on the server"
forbidden_in_core=$(cargo tree -p valet-core -e normal --prefix none | grep -E '^(tonic|tokio|sled|hyper|etcd-client) ' || true)
if [ -n "$forbidden_in_core" ]; then
  echo "valet-core must not depend on an I/O stack, but depends on:"; echo "$forbidden_in_core"; exit 1
fi
# valet-service reaches etcd-client (which speaks gRPC) through valet-store's engine, so the rule is
# about its own dependencies and its own source: no transport crate, no transport code.
forbidden_in_service=$(cargo tree -p valet-service -e normal --depth 1 --prefix none | grep -E '^(tonic|tonic-[a-z]+|hyper|hyper-util|hyper-rustls|axum|valet-gateway|valet-server|valet-proto) ' || true)
if [ -n "$forbidden_in_service" ] || grep -rqE '\b(tonic|hyper)::' crates/valet-service/src; then
  echo "valet-service must not depend on a transport (tonic, hyper) or on its adapters, but depends on:"
  echo "$forbidden_in_service"; grep -rnE '\b(tonic|hyper)::' crates/valet-service/src || true; exit 1
fi
if cargo tree -p valet-client -e normal --prefix none | grep -qE '^valet-(server|store|service|gateway) '; then
  echo "valet-client must not depend on valet-server, valet-service, valet-gateway or valet-store"; exit 1
fi

echo "== nginx, the gateway benchmark's baseline (the benchmark smoke runs it)"
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi

echo "== etcd for the distributed-mode tests (Debian's etcd-server and etcd-client)"
if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
fi

echo "== Python tools: moto (a local STS/IAM/S3 peer) and boto3 for the AWS tests, Strawberry (a real GraphQL upstream) for the gateway's, grpcio for a non-Rust client over TLS, the MCP SDK (server and agent) for the MCP tests, in var/venv"
venv=var/venv
if ! "$venv/bin/python" -c 'import moto, boto3, strawberry, uvicorn, starlette, grpc, grpc_tools, kubernetes_validate, mcp' 2>/dev/null; then
  if ! "$venv/bin/python" -c '' 2>/dev/null && ! python3 -m venv "$venv" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' 'boto3==1.44.5' \
    'strawberry-graphql==0.341.2' 'uvicorn==0.54.0' 'starlette==0.50.0' \
    'grpcio==1.85.1' 'grpcio-tools==1.85.1' 'kubernetes-validate==1.37.0' 'mcp==2.3.0'
fi

echo "== Chromium for the web console's browser tests (Debian's chromium; Playwright drives it, it cannot download browsers here)"
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== Node upstreams for the gateway's differential tests (express-graphql, Express with method-override), in tests/upstreams"
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "node and npm are needed for the gateway's differential tests against real upstream servers"; exit 1
fi
# node_modules/.installed-lock is the lock file the last install used: a changed lock reinstalls.
if ! cmp -s tests/upstreams/package-lock.json tests/upstreams/node_modules/.installed-lock 2>/dev/null; then
  npm ci --prefix tests/upstreams --no-audit --no-fund --loglevel=error
  cp tests/upstreams/package-lock.json tests/upstreams/node_modules/.installed-lock
fi

echo "== Kubernetes manifests against the Kubernetes 1.37 schemas (kubernetes-validate, strict)"
"$venv/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/*.yaml

echo "== build the binaries the end-to-end tests run (valetd, valet)"
cargo build --workspace --bins --locked

echo "== tests"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"

echo "== Python client: a wheel built from clients/python (stubs generated from proto/ by its build), installed into a fresh venv, its pytest suite against real valetd processes"
client_venv=var/python-client-venv
rm -rf "$client_venv" clients/python/build && python3 -m venv "$client_venv"
"$client_venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -w "$client_venv/dist" ./clients/python
"$client_venv/bin/pip" install --quiet --disable-pip-version-check \
  "$(ls "$client_venv"/dist/valet_client-*.whl)[aws,httpx,requests]" 'pytest==9.2.0' 'pytest-timeout==2.4.0' 'playwright==1.65.2'
(cd "$client_venv" && VALET_BINARIES="$PWD/../../target/debug" bin/pytest -q --timeout 180 -p no:cacheprovider ../../clients/python/tests) 2>&1 | tee -a "$log"

echo "== Web console in a real browser: Playwright (from PyPI, in the client venv) driving Debian's Chromium against real valetd processes; writes the screenshots in docs/console/"
(cd "$client_venv" && VALET_BINARIES="$PWD/../../target/debug" bin/pytest -q --timeout 180 -p no:cacheprovider ../../tests/console) 2>&1 | tee -a "$log"

echo "== benchmark smoke: every scenario of valet-bench, a few hundred requests each, no errors"
./target/debug/valet-bench all --smoke

# One closing line for the whole suite (cargo prints one per test binary).
# pytest's summary ("15 passed in 9.8s", "1 failed, 14 passed in …") counts in too.
awk '/^test result:/ { passed += $4; failed += $6 }
     /^[0-9]+ (passed|failed).* in [0-9.]+s/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) passed += $i; if ($(i+1) ~ /^failed/) failed += $i } }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
