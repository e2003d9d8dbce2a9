# The everyday commands. CI runs `.ci/run`, which is `just ci` without needing just installed.

# Start valetd with the embedded store and the example config (development mode).
run:
    cargo run -p valet-server --bin valetd -- --config deploy/examples/valet.toml --dev

# The whole test suite (what the README says).
test:
    ./scripts/test.sh

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets --locked -- -D warnings

# Everything CI runs.
ci:
    ./.ci/run

# Every benchmark (release build, same-run baselines); writes docs/benchmarks.md.
bench:
    ./scripts/bench.sh
