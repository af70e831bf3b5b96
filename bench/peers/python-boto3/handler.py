"""The stock function's ReserveStock work, written the way a Python Lambda user writes it.

boto3 clients built once at import; a handler over the SQS event that reports
batchItemFailures. Per record: one TransactWriteItems (the `{orderId}#reserve` idempotency
record, put only if absent, plus `quantity >= :n` on every line), then one SendMessage of the
result to the coordinator queue. A duplicate replays the recorded result; a short or unknown line
records and sends a rejection. Endpoints come from AWS_ENDPOINT_URL_DYNAMODB / _SQS.
Run by the official runtime interface client: python -m awslambdaric handler.lambda_handler
"""
import hashlib
import json
import os
import time

import boto3

PRODUCTS_TABLE = os.environ["PRODUCTS_TABLE"]
IDEMPOTENCY_TABLE = os.environ["IDEMPOTENCY_TABLE"]
COORDINATOR_QUEUE_URL = os.environ["COORDINATOR_QUEUE_URL"]
TTL_SECONDS = 30 * 24 * 3600
KEY_FREE = "attribute_not_exists(id) OR expiresAt < :nowSeconds"

dynamodb = boto3.client("dynamodb")
sqs = boto3.client("sqs")


def _record(order_id, payload_hash, result, now):
    return {
        "TableName": IDEMPOTENCY_TABLE,
        "Item": {
            "id": {"S": f"{order_id}#reserve"},
            "status": {"S": "COMPLETED"},
            "payloadHash": {"S": payload_hash},
            "result": {"S": json.dumps(result, separators=(",", ":"))},
            "expiresAt": {"N": str(int(now) + TTL_SECONDS)},
        },
        "ConditionExpression": KEY_FREE,
        "ExpressionAttributeValues": {":nowSeconds": {"N": str(int(now))}},
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def _replay(item, payload_hash):
    if item.get("payloadHash", {}).get("S") != payload_hash:
        raise ValueError("order id reused with other items")
    return json.loads(item["result"]["S"])


def reserve(order_id, items):
    if not order_id or not items:
        raise ValueError("invalid ReserveStock")
    payload_hash = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    now = time.time()
    reserved = {"type": "StockReserved", "orderId": order_id}
    lines = [
        {
            "Update": {
                "TableName": PRODUCTS_TABLE,
                "Key": {"productId": {"S": line["productId"]}},
                "UpdateExpression": "SET quantity = quantity - :n",
                "ConditionExpression": "quantity >= :n",
                "ExpressionAttributeValues": {":n": {"N": str(int(line["quantity"]))}},
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        }
        for line in items
    ]
    try:
        dynamodb.transact_write_items(
            TransactItems=[{"Put": _record(order_id, payload_hash, reserved, now)}, *lines]
        )
        return reserved
    except dynamodb.exceptions.TransactionCanceledException as err:
        reasons = err.response.get("CancellationReasons", [])

        def failed(i):
            return i < len(reasons) and reasons[i].get("Code") == "ConditionalCheckFailed"

        if failed(0):
            return _replay(reasons[0]["Item"], payload_hash)
        short = next((i for i in range(len(items)) if failed(i + 1)), None)
        if short is None:
            raise
        rejected = {
            "type": "StockRejected",
            "orderId": order_id,
            "reason": "INSUFFICIENT_STOCK" if reasons[short + 1].get("Item") else "UNKNOWN_PRODUCT",
            "productId": items[short]["productId"],
        }
        try:
            dynamodb.put_item(**_record(order_id, payload_hash, rejected, now))
            return rejected
        except dynamodb.exceptions.ConditionalCheckFailedException as e:
            return _replay(e.response["Item"], payload_hash)


def lambda_handler(event, context):
    failures = []
    for record in event.get("Records", []):
        try:
            command = json.loads(record["body"])
            if command.get("type") != "ReserveStock":
                raise ValueError(f"not handled here: {command.get('type')}")
            result = reserve(command["orderId"], command["items"])
            sqs.send_message(
                QueueUrl=COORDINATOR_QUEUE_URL,
                MessageBody=json.dumps(result, separators=(",", ":")),
            )
        except Exception as err:  # one record's failure is that record's alone
            print(json.dumps({"level": "ERROR", "messageId": record.get("messageId"), "error": repr(err)}))
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}
