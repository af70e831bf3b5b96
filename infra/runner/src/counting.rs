//! Counting the AWS calls the saga makes, for the budget benchmark (`make bench`).
//!
//! An SDK interceptor on the local clients records each call's service, operation and, for
//! DynamoDB, the table(s) it touches (read from the call's input as [`crate::access`] reads
//! it); the benchmark then sorts them into the budget's classes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub service: String,
    pub operation: String,
    /// DynamoDB tables the call touches (empty for SQS).
    pub tables: Vec<String>,
    /// Items the call writes or reads: the actions of a transaction, the keys or requests of
    /// a batch, 1 otherwise (what DynamoDB's request units are counted on).
    pub items: usize,
}

/// Records every call made through the clients it is attached to.
#[derive(Clone, Debug, Default)]
pub struct CallCounter {
    calls: Arc<Mutex<Vec<Call>>>,
}

impl CallCounter {
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().expect("not poisoned"))
    }

    /// Calls grouped by `service operation`.
    pub fn summary(calls: &[Call]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in calls {
            *m.entry(format!("{} {}", c.service, c.operation))
                .or_default() += 1;
        }
        m
    }
}

/// How many items a DynamoDB call acts on (1 for any other call).
fn items(input: &aws_smithy_runtime_api::client::interceptors::context::Input) -> usize {
    use aws_sdk_dynamodb::operation as ddb;
    if let Some(i) = input.downcast_ref::<ddb::transact_write_items::TransactWriteItemsInput>() {
        return i.transact_items.as_ref().map_or(0, Vec::len);
    }
    if let Some(i) = input.downcast_ref::<ddb::transact_get_items::TransactGetItemsInput>() {
        return i.transact_items.as_ref().map_or(0, Vec::len);
    }
    if let Some(i) = input.downcast_ref::<ddb::batch_get_item::BatchGetItemInput>() {
        return i
            .request_items
            .as_ref()
            .map_or(0, |m| m.values().map(|k| k.keys.len()).sum());
    }
    if let Some(i) = input.downcast_ref::<ddb::batch_write_item::BatchWriteItemInput>() {
        return i
            .request_items
            .as_ref()
            .map_or(0, |m| m.values().map(Vec::len).sum());
    }
    1
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "CallCounter"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_string(), m.name().to_string()))
            .unwrap_or_default();
        let call = Call {
            tables: crate::access::tables(&service, &operation, context.input()),
            items: items(context.input()),
            service,
            operation,
        };
        self.calls.lock().expect("not poisoned").push(call);
        Ok(())
    }
}
