#!/usr/bin/env bash
# Compares two release builds at one call in flight, interleaved so both see the same machine:
#   scripts/bench-compare.sh BEFORE_DIR AFTER_DIR [ROUNDS]
# where each directory holds a valetd and a valet-bench built from the commit to compare
# (`cargo build --release --locked --bins -p valet-server -p valet-bench`, then copy both).
# Prints, per scenario and build, the medians over the rounds of the gateway and mcp scenarios.
set -euo pipefail
before=$1 after=$2 rounds=${3:-4}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  for build in before after; do
    directory=$before
    [ "$build" = after ] && directory=$after
    for scenario in gateway mcp; do
      "$directory/valet-bench" "$scenario" --concurrency 1 --duration 10s --json 2>/dev/null \
        | sed "s/^/$build $round /" >>"$out"
    done
  done
done
python3 - "$out" <<'PYTHON'
import collections, json, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    build, _round, text = line.split(" ", 2)
    if text.startswith("{"):
        report = json.loads(text)
        rows[(report["scenario"], build)].append(report)
print("| scenario | build | added p50 µs | added p99 µs | valetd CPU µs/call | ratio |")
print("| --- | --- | ---: | ---: | ---: | ---: |")
for (scenario, build), reports in sorted(rows.items()):
    def median(key):
        values = [report[key] for report in reports if report.get(key) is not None]
        return f"{statistics.median(values):.0f}" if values else "–"
    ratio = statistics.median(report["ratio"] for report in reports)
    print(f"| {scenario} | {build} | {median('added_p50_us')} | {median('added_p99_us')} | {median('valetd_cpu_us_per_op')} | {ratio:.3f} |")
PYTHON
