#!/usr/bin/env bash
# Invokes a function with its events from events/ and prints each response.
#
#   infra/scripts/invoke-events.sh local    FUNCTION [EVENT_FILE...]
#       The native release binary (target/release/<binary>, built if missing) behind
#       `cargo lambda watch --only-lambda-apis` on 127.0.0.1, against the services and
#       resources of `make run` (DynamoDB Local on :8000, moto on :9324; SAGA_PREFIX as there).
#   infra/scripts/invoke-events.sh deployed FUNCTION [EVENT_FILE...]
#       The function of the deployed stack (STACK, default order-saga; AWS CLI and your
#       credentials), with `aws lambda invoke`.
#
# FUNCTION is the template's logical id (OrderApiFunction, StockFunction, PaymentFunction,
# CoordinatorFunction, SweeperFunction). Without EVENT_FILEs, every event of that function
# (api-*, sqs-stock-*, ...), in an order that makes sense as a sequence. The events name fixed
# ids (see docs/deploy.md): seed them first, e.g. events/api-put-product.json on
# OrderApiFunction before the stock events.
set -euo pipefail

usage() {
    sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ $# -ge 2 ] || usage
mode="$1"
function="$2"
shift 2

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
export PATH="$REPO/.venv/bin:$PATH"

# Each function's events, in an order that makes sense as a sequence.
case "$function" in
    OrderApiFunction)
        binary=order-api
        defaults="api-put-product api-get-product api-get-product-not-found api-place-order
            api-place-order-idempotency-key api-place-order-idempotency-key
            api-place-order-invalid-body api-place-order-malformed-json
            api-place-order-unknown-product api-place-order-wrong-content-type api-get-order
            api-get-order-not-found"
        ;;
    StockFunction)
        binary=stock
        defaults="sqs-stock-reserve sqs-stock-reserve-duplicate sqs-stock-reserve-rejected
            sqs-stock-release sqs-stock-batch-with-malformed"
        ;;
    PaymentFunction)
        binary=payment
        defaults="sqs-payment-charge sqs-payment-charge-duplicate sqs-payment-charge-declined
            sqs-payment-refund sqs-payment-batch-with-malformed"
        ;;
    CoordinatorFunction)
        binary=coordinator
        defaults="sqs-coordinator-stock-reserved sqs-coordinator-payment-charged
            sqs-coordinator-duplicate sqs-coordinator-stock-rejected
            sqs-coordinator-order-timed-out sqs-coordinator-batch-with-malformed"
        ;;
    SweeperFunction)
        binary=sweeper
        defaults="scheduled-sweep"
        ;;
    *) echo "unknown function $function" >&2 && usage ;;
esac

if [ $# -gt 0 ]; then
    events=("$@")
else
    events=()
    for name in $defaults; do events+=("events/$name.json"); done
fi

invoke_deployed() {
    local stack="${STACK:-order-saga}" name out
    name="$(aws cloudformation describe-stack-resource --stack-name "$stack" \
        --logical-resource-id "$function" \
        --query StackResourceDetail.PhysicalResourceId --output text)"
    out="$(mktemp)"
    for event in "${events[@]}"; do
        echo "== $event -> $name"
        aws lambda invoke --function-name "$name" --cli-binary-format raw-in-base64-out \
            --payload "file://$event" "$out" >/dev/null
        cat "$out"
        echo
    done
    rm -f "$out"
}

# Processes this script started (killed on exit, by pid).
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

invoke_local() {
    local prefix="${SAGA_PREFIX:-}" port
    for endpoint in 127.0.0.1:8000 127.0.0.1:9324; do
        if ! (exec 3<>"/dev/tcp/${endpoint%:*}/${endpoint#*:}") 2>/dev/null; then
            echo "nothing listens on $endpoint: start the local stack first (make run)" >&2
            exit 1
        fi
    done
    if [ ! -x "target/release/$binary" ]; then
        cargo build --release -p order-api -p stock -p payment -p coordinator -p sweeper
    fi
    queue_url() {
        python3 - "$prefix$1" <<'EOF'
import sys, boto3
sqs = boto3.client("sqs", endpoint_url="http://127.0.0.1:9324", region_name="us-east-1",
                   aws_access_key_id="local", aws_secret_access_key="local")
print(sqs.get_queue_url(QueueName=sys.argv[1])["QueueUrl"])
EOF
    }
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    cargo lambda watch --only-lambda-apis -A 127.0.0.1 -P "$port" >/dev/null 2>&1 &
    pids+=($!)
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done

    # Every variable any function reads, with the local names (a function ignores the others).
    env -i \
        PATH="$PATH" \
        AWS_LAMBDA_RUNTIME_API="http://127.0.0.1:$port/.rt" \
        AWS_LAMBDA_FUNCTION_NAME="$binary" \
        AWS_LAMBDA_FUNCTION_VERSION='$LATEST' \
        AWS_LAMBDA_FUNCTION_MEMORY_SIZE=128 \
        AWS_REGION=us-east-1 \
        AWS_ENDPOINT_URL_DYNAMODB=http://127.0.0.1:8000 \
        AWS_ENDPOINT_URL_SQS=http://127.0.0.1:9324 \
        AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local \
        AWS_EC2_METADATA_DISABLED=true \
        ORDERS_TABLE="${prefix}OrdersTable" \
        PRODUCTS_TABLE="${prefix}ProductsTable" \
        IDEMPOTENCY_TABLE="${prefix}IdempotencyTable" \
        PAYMENT_LEDGER_TABLE="${prefix}PaymentLedgerTable" \
        ORDERS_PENDING_INDEX=PendingOrdersIndex \
        STOCK_QUEUE_URL="$(queue_url StockQueue)" \
        PAYMENT_QUEUE_URL="$(queue_url PaymentQueue)" \
        COORDINATOR_QUEUE_URL="$(queue_url CoordinatorQueue)" \
        PAYMENT_FAILURE_RATE="${PAYMENT_FAILURE_RATE:-0}" \
        ORDER_TIMEOUT_SECONDS="${ORDER_TIMEOUT_SECONDS:-300}" \
        RUST_LOG="${RUST_LOG:-info}" \
        "target/release/$binary" >&2 &
    pids+=($!)

    for event in "${events[@]}"; do
        echo "== $event -> target/release/$binary"
        timeout 60 cargo lambda invoke -A 127.0.0.1 -P "$port" --data-file "$event"
        echo
    done
}

case "$mode" in
    local) invoke_local ;;
    deployed) invoke_deployed ;;
    *) usage ;;
esac
