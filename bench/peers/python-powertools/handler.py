"""The stock function's ReserveStock work with AWS Lambda Powertools (Python), as its docs show.

Powertools' BatchProcessor walks the SQS batch and builds batchItemFailures; its idempotency
utility (`@idempotent_function` on a DynamoDB persistence layer, keyed on the order id, with
the items as the validated payload) makes the reservation run once per order: it claims the key
with a conditional PutItem (INPROGRESS), runs the function, then stores the result with an
UpdateItem (COMPLETED); a duplicate gets the stored result back. The reservation itself is one
TransactWriteItems of `quantity >= :n` updates; the result is then sent to the coordinator
queue (on a duplicate too, as the Rust function does). Per event: PutItem, TransactWriteItems,
UpdateItem, SendMessage.
Run by the official runtime interface client: python -m awslambdaric handler.lambda_handler
"""
import json
import os

import boto3
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)

PRODUCTS_TABLE = os.environ["PRODUCTS_TABLE"]
COORDINATOR_QUEUE_URL = os.environ["COORDINATOR_QUEUE_URL"]

dynamodb = boto3.client("dynamodb")
sqs = boto3.client("sqs")
processor = BatchProcessor(event_type=EventType.SQS)
persistence = DynamoDBPersistenceLayer(table_name=os.environ["IDEMPOTENCY_TABLE"])
config = IdempotencyConfig(
    event_key_jmespath="orderId",
    payload_validation_jmespath="items",
    raise_on_no_idempotency_key=True,
    expires_after_seconds=30 * 24 * 3600,
)


@idempotent_function(data_keyword_argument="command", config=config, persistence_store=persistence)
def reserve(command: dict) -> dict:
    order_id, items = command["orderId"], command["items"]
    if not items:
        raise ValueError("invalid ReserveStock")
    try:
        dynamodb.transact_write_items(
            TransactItems=[
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
        )
        return {"type": "StockReserved", "orderId": order_id}
    except dynamodb.exceptions.TransactionCanceledException as err:
        reasons = err.response.get("CancellationReasons", [])
        for i, reason in enumerate(reasons):
            if reason.get("Code") == "ConditionalCheckFailed":
                return {
                    "type": "StockRejected",
                    "orderId": order_id,
                    "reason": "INSUFFICIENT_STOCK" if reason.get("Item") else "UNKNOWN_PRODUCT",
                    "productId": items[i]["productId"],
                }
        raise


def record_handler(record: SQSRecord):
    command = json.loads(record.body)
    if command.get("type") != "ReserveStock":
        raise ValueError(f"not handled here: {command.get('type')}")
    result = reserve(command=command)
    sqs.send_message(QueueUrl=COORDINATOR_QUEUE_URL, MessageBody=json.dumps(result, separators=(",", ":")))


def lambda_handler(event, context):
    config.register_lambda_context(context)
    return process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
