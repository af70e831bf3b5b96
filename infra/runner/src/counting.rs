//! Counting the AWS calls the saga makes, for the budget benchmark (`make bench`).
//!
//! An SDK interceptor on the local clients records each call's service, operation and, for
//! DynamoDB, the table(s) it touches; the benchmark then sorts them into the budget's classes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::operation::{
    batch_get_item::BatchGetItemInput, delete_item::DeleteItemInput, get_item::GetItemInput,
    put_item::PutItemInput, query::QueryInput, transact_write_items::TransactWriteItemsInput,
    update_item::UpdateItemInput,
};
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

fn tables(ctx: &BeforeSerializationInterceptorContextRef<'_>) -> Vec<String> {
    let input = ctx.input();
    let one = |t: &Option<String>| t.iter().cloned().collect::<Vec<_>>();
    if let Some(i) = input.downcast_ref::<PutItemInput>() {
        return one(&i.table_name);
    }
    if let Some(i) = input.downcast_ref::<UpdateItemInput>() {
        return one(&i.table_name);
    }
    if let Some(i) = input.downcast_ref::<DeleteItemInput>() {
        return one(&i.table_name);
    }
    if let Some(i) = input.downcast_ref::<GetItemInput>() {
        return one(&i.table_name);
    }
    if let Some(i) = input.downcast_ref::<QueryInput>() {
        return one(&i.table_name);
    }
    if let Some(i) = input.downcast_ref::<BatchGetItemInput>() {
        return i
            .request_items
            .iter()
            .flat_map(|m| m.keys().cloned())
            .collect();
    }
    if let Some(i) = input.downcast_ref::<TransactWriteItemsInput>() {
        let mut t: Vec<String> = i
            .transact_items
            .iter()
            .flatten()
            .filter_map(|item| {
                item.put
                    .as_ref()
                    .map(|p| p.table_name.clone())
                    .or_else(|| item.update.as_ref().map(|u| u.table_name.clone()))
                    .or_else(|| item.condition_check.as_ref().map(|c| c.table_name.clone()))
                    .or_else(|| item.delete.as_ref().map(|d| d.table_name.clone()))
            })
            .collect();
        t.sort();
        t.dedup();
        return t;
    }
    Vec::new()
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
            service,
            operation,
            tables: tables(context),
        };
        self.calls.lock().expect("not poisoned").push(call);
        Ok(())
    }
}
