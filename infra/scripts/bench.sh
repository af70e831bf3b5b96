#!/usr/bin/env bash
# The design budgets, measured (make bench):
#   1. each function ready for its first event within 10 ms of process start (SDK clients built);
#   2. a release binary of at most 5 MB;
#   3. a confirmed order costs at most 13 AWS calls (8 DynamoDB writes, 1 batch read, 4 SQS sends).
# Exits non-zero if a budget is exceeded.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FUNCTIONS=(order-api stock payment coordinator sweeper)
SIZE_BUDGET=5000000
status=0

echo "== building release binaries (LTO, opt-level z, strip)"
cargo build --release $(printf -- '-p %s ' "${FUNCTIONS[@]}")
cargo build -p local-runner --bin saga-bench

echo
echo "== Lambda artifacts: arm64 bootstrap per function, as sam build makes them (budget 5 MB)"
cargo lambda build --release --arm64 $(printf -- '--bin %s ' "${FUNCTIONS[@]}") >/dev/null
for f in "${FUNCTIONS[@]}"; do
  size=$(stat -c %s "target/lambda/$f/bootstrap")
  verdict=ok; [ "$size" -le "$SIZE_BUDGET" ] || { verdict=OVER; status=1; }
  printf '  %-12s %8d bytes  %5.2f MiB  %s\n' "$f" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')" "$verdict"
done
echo "== for reference: the same binaries built for this machine ($(uname -m)), which the cold-start run uses"
for f in "${FUNCTIONS[@]}"; do
  size=$(stat -c %s "target/release/$f")
  printf '  %-12s %8d bytes  %5.2f MiB\n' "$f" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')"
done

echo
target/debug/saga-bench cold-start --runs "${BENCH_RUNS:-30}" $(printf -- 'target/release/%s ' "${FUNCTIONS[@]}") || status=1
echo
RUST_LOG=error target/debug/saga-bench calls || status=1
exit $status
