// The stock function's ReserveStock work, written the way a Node.js Lambda user writes it:
// SDK v3 clients built once at module load, an async handler over the SQS event that reports
// batchItemFailures. Per record: one TransactWriteItems (the `{orderId}#reserve` idempotency
// record, put only if absent, plus `quantity >= :n` on every line), then one SendMessage of the
// result to the coordinator queue. A duplicate replays the recorded result; a short or unknown
// line records and sends a rejection. Endpoints come from AWS_ENDPOINT_URL_DYNAMODB/_SQS.
import { createHash } from "node:crypto";
import { DynamoDBClient, PutItemCommand, TransactWriteItemsCommand } from "@aws-sdk/client-dynamodb";
import { SQSClient, SendMessageCommand } from "@aws-sdk/client-sqs";

const { PRODUCTS_TABLE, IDEMPOTENCY_TABLE, COORDINATOR_QUEUE_URL } = process.env;
if (!PRODUCTS_TABLE || !IDEMPOTENCY_TABLE || !COORDINATOR_QUEUE_URL) {
  throw new Error("PRODUCTS_TABLE, IDEMPOTENCY_TABLE and COORDINATOR_QUEUE_URL must be set");
}
const dynamodb = new DynamoDBClient({});
const sqs = new SQSClient({});
const TTL_SECONDS = 30 * 24 * 3600;
const KEY_FREE = "attribute_not_exists(id) OR expiresAt < :nowSeconds";

const record = (orderId, hash, result, now) => ({
  TableName: IDEMPOTENCY_TABLE,
  Item: {
    id: { S: `${orderId}#reserve` },
    status: { S: "COMPLETED" },
    payloadHash: { S: hash },
    result: { S: JSON.stringify(result) },
    expiresAt: { N: String(Math.floor(now / 1000) + TTL_SECONDS) },
  },
  ConditionExpression: KEY_FREE,
  ExpressionAttributeValues: { ":nowSeconds": { N: String(Math.floor(now / 1000)) } },
  ReturnValuesOnConditionCheckFailure: "ALL_OLD",
});

function replay(item, hash) {
  if (item.payloadHash?.S !== hash) throw new Error("order id reused with other items");
  return JSON.parse(item.result.S);
}

async function reserve({ orderId, items }) {
  if (!orderId || !Array.isArray(items) || items.length === 0) throw new Error("invalid ReserveStock");
  const hash = createHash("sha256").update(JSON.stringify(items)).digest("hex");
  const now = Date.now();
  const reserved = { type: "StockReserved", orderId };
  const lines = items.map(({ productId, quantity }) => ({
    Update: {
      TableName: PRODUCTS_TABLE,
      Key: { productId: { S: productId } },
      UpdateExpression: "SET quantity = quantity - :n",
      ConditionExpression: "quantity >= :n",
      ExpressionAttributeValues: { ":n": { N: String(quantity) } },
      ReturnValuesOnConditionCheckFailure: "ALL_OLD",
    },
  }));
  try {
    await dynamodb.send(new TransactWriteItemsCommand({
      TransactItems: [{ Put: record(orderId, hash, reserved, now) }, ...lines],
    }));
    return reserved;
  } catch (err) {
    if (err.name !== "TransactionCanceledException") throw err;
    const reasons = err.CancellationReasons ?? [];
    const failed = (i) => reasons[i]?.Code === "ConditionalCheckFailed";
    if (failed(0)) return replay(reasons[0].Item, hash);
    const i = items.findIndex((_, j) => failed(j + 1));
    if (i < 0) throw err;
    const known = reasons[i + 1].Item && Object.keys(reasons[i + 1].Item).length > 0;
    const rejected = {
      type: "StockRejected",
      orderId,
      reason: known ? "INSUFFICIENT_STOCK" : "UNKNOWN_PRODUCT",
      productId: items[i].productId,
    };
    try {
      await dynamodb.send(new PutItemCommand(record(orderId, hash, rejected, now)));
      return rejected;
    } catch (e) {
      if (e.name === "ConditionalCheckFailedException" && e.Item) return replay(e.Item, hash);
      throw e;
    }
  }
}

export const handler = async (event) => {
  const batchItemFailures = [];
  for (const rec of event.Records ?? []) {
    try {
      const command = JSON.parse(rec.body);
      if (command.type !== "ReserveStock") throw new Error(`not handled here: ${command.type}`);
      const result = await reserve(command);
      await sqs.send(new SendMessageCommand({
        QueueUrl: COORDINATOR_QUEUE_URL,
        MessageBody: JSON.stringify(result),
      }));
    } catch (err) {
      console.error(JSON.stringify({ level: "ERROR", messageId: rec.messageId, error: String(err) }));
      batchItemFailures.push({ itemIdentifier: rec.messageId });
    }
  }
  return { batchItemFailures };
};
