#!/usr/bin/env bash
# The whole test suite, from a clean checkout: installs what the tests need, builds the binaries
# the end-to-end tests start, then runs every part — architecture checks, the Rust tests, the
# Python client's suite, the browser tests, the benchmark smoke — each even when an earlier one
# failed. It always ends with one line, `tests: N passed, M failed`, followed by the name of every
# failed test or part, and exits non-zero when anything failed.
#
# Tests write only under target/ and temp dirs; the installs go to var/ (git-ignored) and to the
# system (apt-get, as root).
set -uo pipefail
cd "$(dirname "$0")/.."

results=$(mktemp -d)
log="$results/all.log"
touch "$log"
failed_parts=()
checks_passed=0
summary_printed=false

# The closing lines: the counts from cargo's and pytest's own summaries, the checks run here, and
# every failure by name. Printed on every exit, also when a setup step fails.
summary() {
  $summary_printed && return
  summary_printed=true
  local counts failed_tests n_failed_parts=${#failed_parts[@]}
  counts=$(awk '/^test result:/ { passed += $4; failed += $6 }
       /^=* ?[0-9]+ (passed|failed|error)/ && / in [0-9.]+s/ {
         for (i = 1; i < NF; i++) {
           if ($(i+1) ~ /^passed/) passed += $i
           if ($(i+1) ~ /^(failed|errors?)/) failed += $i
         }
       }
       END { printf "%d %d", passed, failed }' "$log")
  local passed=${counts% *} failed=${counts#* }
  failed_tests=$(grep -E '^test .* \.\.\. FAILED$|^(FAILED|ERROR) [^ ]+' "$log" \
    | sed -E 's/^test (.*) \.\.\. FAILED$/\1/; s/^(FAILED|ERROR) ([^ ]+).*/\2/; s|^(\.\./)+||' | sort -u)
  # A part that failed without a failing test of its own (a build, a check, a crash) counts as one.
  local part unnamed=()
  for part in "${failed_parts[@]+"${failed_parts[@]}"}"; do
    grep -qF "[$part] " "$results/parts" 2>/dev/null || unnamed+=("$part")
  done
  failed=$((failed + ${#unnamed[@]}))
  passed=$((passed + checks_passed))
  echo
  echo "tests: $passed passed, $failed failed"
  if [ -n "$failed_tests" ]; then
    echo "$failed_tests" | sed 's/^/failed: /'
  fi
  for part in "${unnamed[@]+"${unnamed[@]}"}"; do
    echo "failed: $part (see its output above)"
  done
  [ "$n_failed_parts" -eq 0 ] && [ -z "$failed_tests" ] && [ "$failed" -eq 0 ]
}
trap 'status=$?; summary; rc=$?; rm -rf "$results"; [ $status -ne 0 ] && exit $status; exit $rc' EXIT

# A setup step: its failure ends the run (nothing after it could pass), with the summary.
setup() {
  local what=$1; shift
  echo "== $what"
  if ! "$@"; then
    failed_parts+=("setup: $what")
    exit 1
  fi
}

# A check or test part: runs whatever came before; its failure is counted and the run goes on.
# Lines of a part's tests that fail are attributed to it in $results/parts.
part() {
  local what=$1; shift
  echo "== $what"
  local before
  before=$(wc -l <"$log")
  if "$@" 2>&1 | tee -a "$log"; then
    return 0
  fi
  failed_parts+=("$what")
  tail -n +"$((before + 1))" "$log" | grep -E '^test .* \.\.\. FAILED$|^(FAILED|ERROR) ' \
    | sed "s/^/[$what] /" >>"$results/parts"
  return 0
}

# A check with no test count of its own counts as one test.
check() {
  local what=$1; shift
  local n_before=${#failed_parts[@]}
  part "$what" "$@"
  [ ${#failed_parts[@]} -eq "$n_before" ] && checks_passed=$((checks_passed + 1))
  return 0
}

apt_install() {
  [ -f "$results/apt-updated" ] || { apt-get update -qq && touch "$results/apt-updated"; } || return 1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# What the tests need, installed when missing.

install_nginx() {
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx-light || apt_install nginx
}
install_etcd() {
  { command -v etcd >/dev/null && command -v etcdctl >/dev/null; } || apt_install etcd-server etcd-client
}
install_chromium() {
  command -v chromium >/dev/null || apt_install chromium
}
install_go_and_php() {
  { [ -x /usr/bin/go ] && [ -x /usr/bin/php ]; } || apt_install golang-go php-cli
}
install_venv() {
  local venv=var/venv
  "$venv/bin/python" -c 'import moto, boto3, strawberry, uvicorn, starlette, fastapi, grpc, grpc_tools, kubernetes_validate, mcp' 2>/dev/null && return 0
  if ! "$venv/bin/python" -c '' 2>/dev/null && ! python3 -m venv "$venv" 2>/dev/null; then
    apt_install python3-venv && python3 -m venv "$venv" || return 1
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5' 'boto3==1.44.5' \
    'strawberry-graphql==0.341.2' 'uvicorn==0.54.0' 'starlette==0.50.0' 'fastapi==0.128.0' \
    'grpcio==1.85.1' 'grpcio-tools==1.85.1' 'kubernetes-validate==1.37.0' 'mcp==2.3.0'
}
install_node_upstreams() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm || { echo "node and npm are needed for the gateway's tests against real upstream servers"; return 1; }
  fi
  # node_modules/.installed-lock is the lock file the last install used: a changed lock reinstalls.
  cmp -s tests/upstreams/package-lock.json tests/upstreams/node_modules/.installed-lock 2>/dev/null && return 0
  npm ci --prefix tests/upstreams --no-audit --no-fund --loglevel=error &&
    cp tests/upstreams/package-lock.json tests/upstreams/node_modules/.installed-lock
}
# The Python client's wheel, built from a copy of clients/python (building in place leaves build
# output in the tree), installed into a fresh venv with pytest and Playwright.
install_client_venv() {
  local client_venv=var/python-client-venv source="$results/python-client"
  rm -rf "$client_venv" && python3 -m venv "$client_venv" || return 1
  cp -r clients/python "$source" && cp -r proto "$source/proto" || return 1
  "$client_venv/bin/pip" wheel --quiet --disable-pip-version-check --no-deps -w "$client_venv/dist" "$source" || return 1
  "$client_venv/bin/pip" install --quiet --disable-pip-version-check \
    "$(ls "$client_venv"/dist/valet_client-*.whl)[aws,httpx,requests]" 'pytest==9.2.0' 'pytest-timeout==2.4.0' 'playwright==1.65.2'
}

setup "nginx, the gateway benchmark's baseline (the benchmark smoke runs it)" install_nginx
setup "etcd for the distributed-mode tests (Debian's etcd-server and etcd-client)" install_etcd
setup "Python tools in var/venv: moto and boto3 (AWS), Strawberry and FastAPI (GraphQL and REST upstreams), grpcio (a non-Rust client), the MCP SDK (MCP server and agent)" install_venv
setup "Chromium for the web console's browser tests (Debian's chromium, driven by Playwright)" install_chromium
setup "Go and PHP, for upstreams in two more language families the gateway's tests run against (Debian's golang-go and php-cli)" install_go_and_php
setup "Node upstreams for the gateway's tests against real servers (express-graphql, Express), in tests/upstreams" install_node_upstreams
setup "build the binaries the end-to-end tests run (valetd, valet, valet-bench)" cargo build --workspace --bins --locked
setup "the Python client's wheel (stubs generated from proto/), in a fresh var/python-client-venv with pytest and Playwright" install_client_venv

# ---------------------------------------------------------------------------------------------
# Architecture checks.

dependency_direction() {
  local forbidden
  forbidden=$(cargo tree -p valet-core -e normal --prefix none | grep -E '^(tonic|tokio|sled|hyper|etcd-client) ')
  if [ -n "$forbidden" ]; then
    echo "valet-core must not depend on an I/O stack, but depends on:"; echo "$forbidden"; return 1
  fi
  # valet-service reaches etcd-client (which speaks gRPC) through valet-store's engine, so the
  # rule is about its own dependencies and its own source: no transport crate, no transport code.
  forbidden=$(cargo tree -p valet-service -e normal --depth 1 --prefix none | grep -E '^(tonic|tonic-[a-z]+|hyper|hyper-util|hyper-rustls|axum|valet-gateway|valet-server|valet-proto) ')
  if [ -n "$forbidden" ] || grep -rqE '\b(tonic|hyper)::' crates/valet-service/src; then
    echo "valet-service must not depend on a transport (tonic, hyper) or on its adapters, but depends on:"
    echo "$forbidden"; grep -rnE '\b(tonic|hyper)::' crates/valet-service/src; return 1
  fi
  if cargo tree -p valet-client -e normal --prefix none | grep -qE '^valet-(server|store|service|gateway) '; then
    echo "valet-client must not depend on valet-server, valet-service, valet-gateway or valet-store"; return 1
  fi
  echo "dependencies point one way"
}
check "dependency direction: valet-core has no I/O stack; valet-service no transport; the client never depends on the server" dependency_direction
check "Kubernetes manifests against the Kubernetes 1.37 schemas (kubernetes-validate, strict)" \
  var/venv/bin/kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml

# ---------------------------------------------------------------------------------------------
# The tests. A hung part is stopped (and counted as failed) so the summary is still printed.

tracked_before=$(git status --porcelain 2>/dev/null)

part "Rust tests" timeout 45m cargo test --workspace --locked --no-fail-fast

client_tests() {
  cd var/python-client-venv &&
    VALET_BINARIES="$PWD/../../target/debug" timeout 20m bin/pytest -q -rfE --timeout 180 -p no:cacheprovider "$@"
}
part "Python client tests" client_tests ../../clients/python/tests
part "browser tests" client_tests ../../tests/console
check "benchmark smoke: every scenario of valet-bench, a few hundred requests each, no errors" \
  timeout 15m ./target/debug/valet-bench all --smoke

# Tests write under target/ and temp dirs only: a run leaves the work tree as it found it.
unchanged_tree() {
  local after
  after=$(git status --porcelain 2>/dev/null)
  if [ "$after" != "$tracked_before" ]; then
    echo "the tests changed the work tree (they may write only under target/ or a temp dir):"
    diff <(echo "$tracked_before") <(echo "$after") | grep '^[<>]'
    return 1
  fi
  echo "the work tree is as the tests found it"
}
check "the tests wrote nothing into the work tree" unchanged_tree
