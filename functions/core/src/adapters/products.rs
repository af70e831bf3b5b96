//! The products table: a product's name, price and available stock.

use aws_sdk_dynamodb::types::KeysAndAttributes;
use serde::Deserialize;
use std::collections::HashMap;

use super::dynamo::{self, StoreError, s};
use crate::domain::Product;
use crate::ports::Products;

#[derive(Clone, Debug)]
pub struct DynamoProducts {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

/// How many times unprocessed keys of a batch read are retried before giving up.
const BATCH_GET_ATTEMPTS: u32 = 5;

/// The projection a price lookup reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Price {
    product_id: String,
    price_cents: u64,
}

impl DynamoProducts {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

impl Products for DynamoProducts {
    /// Creates or replaces a product, setting its available stock.
    async fn put(&self, product: &Product) -> Result<(), StoreError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(dynamo::to_item(product)?))
            .send()
            .await
            .map_err(|e| StoreError::sdk("put_product", e.into_service_error()))?;
        Ok(())
    }

    async fn get(&self, product_id: &str) -> Result<Option<Product>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("productId", s(product_id))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| StoreError::sdk("get_product", e.into_service_error()))?;
        out.item.map(dynamo::from_item).transpose()
    }

    /// Current prices of the given products, in one `BatchGetItem` (plus retries of any
    /// unprocessed keys). Unknown products are absent from the map.
    async fn prices(&self, product_ids: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let keys = product_ids
            .iter()
            .map(|id| HashMap::from([("productId".to_string(), s(*id))]))
            .collect::<Vec<_>>();
        let mut request = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .projection_expression("productId, priceCents")
                .consistent_read(true)
                .build()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        );
        let mut prices = HashMap::new();
        for attempt in 0..BATCH_GET_ATTEMPTS {
            let Some(keys) = request.take() else { break };
            if attempt > 0 {
                dynamo::conflict_backoff(attempt).await;
            }
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, keys)
                .send()
                .await
                .map_err(|e| StoreError::sdk("batch_get_prices", e.into_service_error()))?;
            for item in out
                .responses
                .and_then(|mut r| r.remove(&self.table))
                .unwrap_or_default()
            {
                let price: Price = dynamo::from_item(item)?;
                prices.insert(price.product_id, price.price_cents);
            }
            request = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.table))
                .filter(|k| !k.keys.is_empty());
        }
        if request.is_some() {
            return Err(StoreError::Sdk {
                op: "batch_get_prices",
                code: "UnprocessedKeys".into(),
                message: "DynamoDB left keys unprocessed after retries".into(),
            });
        }
        Ok(prices)
    }
}
