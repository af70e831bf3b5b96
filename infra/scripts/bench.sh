#!/usr/bin/env bash
# make bench: measures everything and writes target/bench/report.md with its plots.
#   1. the stock function beside its peers (bench/peers: Node.js SDK v3, Python boto3, Python
#      Powertools), interleaved on one fake Runtime API: init, first event, warm p50/p99, peak RSS;
#   2. every function's cold start (process start -> first /next; budget 10 ms);
#   3. the arm64 artifacts' sizes (budget 5 MB);
#   4. AWS calls per confirmed order (budget 13);
#   5. the whole saga under open-loop load on the stack of `make run` (saga-bench load): the
#      emulators' ceiling (DynamoDB Local TransactWriteItems of the stock function's shape, moto
#      send/receive/delete, from client loops alone), then offered rates stepped up (BENCH_RATES,
#      BENCH_STEP_SECONDS each) until one saturates, with latency p50/p95/p99 and where the time
#      goes per hop, then batching window 0 against the template's (BENCH_WINDOW_RATES);
# and from 4 and 5 the AWS projection (each function's invocations and duration under load).
# Then `saga-bench report` checks every budget (also: init >= 20x faster than the Node peer, peak
# RSS <= 1/4 of the Node peer's, saga throughput >= 1/2 of the emulators' ceiling) and exits
# non-zero naming any missed one.
# BENCH_ROUNDS / BENCH_WARM / BENCH_RUNS / BENCH_RATES / BENCH_STEP_SECONDS /
# BENCH_WINDOW_RATES shorten or lengthen the runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FUNCTIONS=(order-api stock payment coordinator sweeper)
OUT=target/bench
started=$SECONDS
phase() { echo; echo "== [$((SECONDS - started)) s] $*"; }
status=0

phase "installing the peers (bench/peers/install.sh)"
bench/peers/install.sh

phase "building release binaries (LTO, opt-level z, strip) and saga-bench"
cargo build --release $(printf -- '-p %s ' "${FUNCTIONS[@]}")
cargo build -p local-runner --bin saga-bench
rm -rf "$OUT" && mkdir -p "$OUT"

phase "one function, side by side (${BENCH_ROUNDS:-10} interleaved rounds x (1 + ${BENCH_WARM:-25}) events per runtime)"
target/debug/saga-bench peers --rounds "${BENCH_ROUNDS:-10}" --warm "${BENCH_WARM:-25}" \
  --json "$OUT/peers.json" --logs "$OUT/logs" || status=1

phase "Lambda artifacts: cargo lambda build --release --arm64"
cargo lambda build --release --arm64 $(printf -- '--bin %s ' "${FUNCTIONS[@]}") >/dev/null
target/debug/saga-bench sizes --json "$OUT/sizes.json" "${FUNCTIONS[@]}" || true

phase "cold start of every function (${BENCH_RUNS:-30} runs each)"
target/debug/saga-bench cold-start --runs "${BENCH_RUNS:-30}" --json "$OUT/cold-start.json" \
  $(printf -- 'target/release/%s ' "${FUNCTIONS[@]}") || true

phase "AWS calls per confirmed order"
RUST_LOG=error target/debug/saga-bench calls --json "$OUT/calls.json" || true

phase "the whole saga under open-loop load (rates ${BENCH_RATES:-5,10,25,50,100,200,400}/s, ${BENCH_STEP_SECONDS:-20} s each, until one saturates)"
RUST_LOG=error target/debug/saga-bench load --rates "${BENCH_RATES:-5,10,25,50,100,200,400}" \
  --seconds "${BENCH_STEP_SECONDS:-20}" --window-rates "${BENCH_WINDOW_RATES:-5,10}" \
  --json "$OUT/load.json" || status=1

phase "report and budgets"
target/debug/saga-bench report --dir "$OUT" || status=1
echo "make bench took $((SECONDS - started)) s"
exit $status
