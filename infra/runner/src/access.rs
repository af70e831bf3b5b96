//! What each function does with AWS, as IAM sees it.
//!
//! Every client a function uses (its handler's, and its event source mapping's: on AWS,
//! Lambda polls and deletes with the function's role) carries an [`Interceptor`] that knows
//! the function's logical id. For each call it records the IAM action(s) the call needs and
//! the resource(s) it acts on, named as the template names them: table names and queue URLs
//! are mapped back to logical ids with [`LocalNames`]. IAM authorises some operations under
//! another action, and those are mapped as IAM does:
//!
//! - `TransactWriteItems` has no action of its own: each item is authorised on its own table,
//!   `Put` by `dynamodb:PutItem`, `Update` by `dynamodb:UpdateItem`, `Delete` by
//!   `dynamodb:DeleteItem`, `ConditionCheck` by `dynamodb:ConditionCheckItem`;
//!   `TransactGetItems` likewise by `dynamodb:GetItem` per item;
//! - `SendMessageBatch`, `DeleteMessageBatch` and `ChangeMessageVisibilityBatch` are authorised
//!   by `sqs:SendMessage`, `sqs:DeleteMessage` and `sqs:ChangeMessageVisibility`;
//! - a `Query` or `Scan` of an index acts on the index's ARN, `<table ARN>/index/<name>`;
//! - every other operation needs the action of its own name (`dynamodb:GetItem`).
//!
//! The least-privilege test (`tests/tests/least_privilege.rs`) drives every path of the saga
//! with a recorder attached and compares what each function used with what its role grants.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::operation as ddb;
use aws_sdk_sqs::operation as sqs;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeSerializationInterceptorContextRef, Input,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::template::LocalNames;

/// The resource a call acts on.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// The ARN of the template's resource `logical_id` followed by `suffix`: `""` for the
    /// resource itself (`!GetAtt X.Arn` in a policy), `/index/NAME` for an index of a table
    /// (`!Sub ${X.Arn}/index/NAME`).
    Template { logical_id: String, suffix: String },
    /// A table or queue that is not one of the template's, as the call named it (or what of
    /// the call could not be read).
    Unknown(String),
}

impl Resource {
    /// The template's resource `logical_id` itself.
    pub fn of(logical_id: &str) -> Self {
        Resource::Template {
            logical_id: logical_id.to_string(),
            suffix: String::new(),
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Template { logical_id, suffix } => write!(f, "{logical_id}{suffix}"),
            Resource::Unknown(what) => write!(f, "{what} (not a resource of the template)"),
        }
    }
}

/// One kind of access a function made: by which operation, needing which action, on what.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// The function's logical id.
    pub function: String,
    /// The SDK operation, e.g. `TransactWriteItems`.
    pub operation: String,
    /// The IAM action, e.g. `dynamodb:PutItem`.
    pub action: String,
    pub resource: Resource,
}

/// Collects the accesses of every function whose clients carry one of its interceptors:
/// each distinct [`Access`] with how many times it happened.
#[derive(Clone, Debug, Default)]
pub struct AccessRecorder {
    seen: Arc<Mutex<BTreeMap<Access, u64>>>,
}

impl AccessRecorder {
    /// The interceptor for the clients of `function`; `names` maps the stack's physical names
    /// back to logical ids.
    pub fn interceptor(&self, function: &str, names: &LocalNames) -> Interceptor {
        let mut physical = HashMap::new();
        for (id, table) in &names.tables {
            physical.insert(table.clone(), id.clone());
        }
        for (id, url) in &names.queue_urls {
            physical.insert(url.clone(), id.clone());
        }
        Interceptor {
            function: function.to_string(),
            physical: Arc::new(physical),
            recorder: self.clone(),
        }
    }

    /// Every access so far, with its count.
    pub fn accesses(&self) -> BTreeMap<Access, u64> {
        self.seen.lock().expect("not poisoned").clone()
    }

    fn add(&self, access: Access) {
        *self
            .seen
            .lock()
            .expect("not poisoned")
            .entry(access)
            .or_default() += 1;
    }
}

/// Records the accesses of one function (see [`AccessRecorder::interceptor`]).
#[derive(Clone, Debug)]
pub struct Interceptor {
    function: String,
    /// Physical table name or queue URL -> logical id.
    physical: Arc<HashMap<String, String>>,
    recorder: AccessRecorder,
}

/// What a call names, before it is mapped to the template.
enum Named {
    /// A table (or its index).
    Table(String, Option<String>),
    Queue(String),
    /// The call's input was not understood: the access is recorded with an unknown resource.
    Unread(String),
}

impl Interceptor {
    fn resource(&self, named: Named) -> Resource {
        let logical = |physical: &str| self.physical.get(physical).cloned();
        match named {
            Named::Table(table, index) => match logical(&table) {
                Some(logical_id) => Resource::Template {
                    logical_id,
                    suffix: index.map(|i| format!("/index/{i}")).unwrap_or_default(),
                },
                None => Resource::Unknown(format!("table {table}")),
            },
            Named::Queue(url) => match logical(&url) {
                Some(logical_id) => Resource::Template {
                    logical_id,
                    suffix: String::new(),
                },
                None => Resource::Unknown(format!("queue {url}")),
            },
            Named::Unread(what) => Resource::Unknown(what),
        }
    }
}

/// The DynamoDB tables a call acts on, each once, sorted (what [`crate::counting`] sorts the
/// budget's calls by).
pub(crate) fn tables(service: &str, operation: &str, input: &Input) -> Vec<String> {
    let mut tables: Vec<String> = actions(service, operation, input)
        .into_iter()
        .filter_map(|(_, named)| match named {
            Named::Table(table, _) => Some(table),
            _ => None,
        })
        .collect();
    tables.sort();
    tables.dedup();
    tables
}

/// `(action, what it acts on)` for each resource a call of `operation` acts on.
fn actions(service: &str, operation: &str, input: &Input) -> Vec<(String, Named)> {
    let prefix = service.to_ascii_lowercase();
    let own = || format!("{prefix}:{operation}");
    let table = |t: &Option<String>, i: &Option<String>| {
        Named::Table(t.clone().unwrap_or_default(), i.clone())
    };
    macro_rules! by_table {
        ($($ty:ty),*) => {$(
            if let Some(i) = input.downcast_ref::<$ty>() {
                return vec![(own(), table(&i.table_name, &None))];
            }
        )*};
    }
    macro_rules! by_queue {
        ($($ty:ty),*) => {$(
            if let Some(i) = input.downcast_ref::<$ty>() {
                return vec![(action_of_queue_call(&prefix, operation), Named::Queue(i.queue_url.clone().unwrap_or_default()))];
            }
        )*};
    }
    by_table!(
        ddb::get_item::GetItemInput,
        ddb::put_item::PutItemInput,
        ddb::update_item::UpdateItemInput,
        ddb::delete_item::DeleteItemInput,
        ddb::describe_table::DescribeTableInput
    );
    if let Some(i) = input.downcast_ref::<ddb::query::QueryInput>() {
        return vec![(own(), table(&i.table_name, &i.index_name))];
    }
    if let Some(i) = input.downcast_ref::<ddb::scan::ScanInput>() {
        return vec![(own(), table(&i.table_name, &i.index_name))];
    }
    if let Some(i) = input.downcast_ref::<ddb::batch_get_item::BatchGetItemInput>() {
        return i
            .request_items
            .iter()
            .flat_map(|m| m.keys())
            .map(|t| (own(), Named::Table(t.clone(), None)))
            .collect();
    }
    if let Some(i) = input.downcast_ref::<ddb::batch_write_item::BatchWriteItemInput>() {
        return i
            .request_items
            .iter()
            .flat_map(|m| m.keys())
            .map(|t| (own(), Named::Table(t.clone(), None)))
            .collect();
    }
    if let Some(i) = input.downcast_ref::<ddb::transact_write_items::TransactWriteItemsInput>() {
        return i
            .transact_items
            .iter()
            .flatten()
            .flat_map(|item| {
                let put = item.put.as_ref().map(|p| ("PutItem", &p.table_name));
                let update = item.update.as_ref().map(|u| ("UpdateItem", &u.table_name));
                let delete = item.delete.as_ref().map(|d| ("DeleteItem", &d.table_name));
                let check = item
                    .condition_check
                    .as_ref()
                    .map(|c| ("ConditionCheckItem", &c.table_name));
                [put, update, delete, check].into_iter().flatten()
            })
            .map(|(action, t)| (format!("{prefix}:{action}"), Named::Table(t.clone(), None)))
            .collect();
    }
    if let Some(i) = input.downcast_ref::<ddb::transact_get_items::TransactGetItemsInput>() {
        return i
            .transact_items
            .iter()
            .flatten()
            .filter_map(|item| item.get.as_ref())
            .map(|g| {
                (
                    format!("{prefix}:GetItem"),
                    Named::Table(g.table_name.clone(), None),
                )
            })
            .collect();
    }
    by_queue!(
        sqs::send_message::SendMessageInput,
        sqs::send_message_batch::SendMessageBatchInput,
        sqs::receive_message::ReceiveMessageInput,
        sqs::delete_message::DeleteMessageInput,
        sqs::delete_message_batch::DeleteMessageBatchInput,
        sqs::change_message_visibility::ChangeMessageVisibilityInput,
        sqs::change_message_visibility_batch::ChangeMessageVisibilityBatchInput,
        sqs::get_queue_attributes::GetQueueAttributesInput,
        sqs::set_queue_attributes::SetQueueAttributesInput,
        sqs::purge_queue::PurgeQueueInput,
        sqs::delete_queue::DeleteQueueInput
    );
    vec![(
        own(),
        Named::Unread(format!(
            "the input of {service} {operation}, which this recorder does not read"
        )),
    )]
}

/// The action a call on a queue needs: the batch operations are authorised by the action of
/// their single form.
fn action_of_queue_call(prefix: &str, operation: &str) -> String {
    let single = operation.strip_suffix("Batch").unwrap_or(operation);
    format!("{prefix}:{single}")
}

impl Intercept for Interceptor {
    fn name(&self) -> &'static str {
        "AccessRecorder"
    }

    // Before serialization: once per call, however many times it is retried (each attempt
    // needs the same permission).
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
        for (action, named) in actions(&service, &operation, context.input()) {
            self.recorder.add(Access {
                function: self.function.clone(),
                operation: operation.clone(),
                action,
                resource: self.resource(named),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::types::{ConditionCheck, Put, TransactWriteItem, Update};

    fn names() -> LocalNames {
        LocalNames {
            tables: [
                ("OrdersTable", "t1-OrdersTable"),
                ("IdempotencyTable", "t1-Idem"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .into(),
            queue_urls: [("StockQueue", "http://sqs/000/t1-StockQueue")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .into(),
            ..LocalNames::default()
        }
    }

    /// `(action, resource)` of each access a call with `input` makes.
    fn accesses(service: &str, operation: &str, input: Input) -> Vec<(String, Resource)> {
        let interceptor = AccessRecorder::default().interceptor("F", &names());
        actions(service, operation, &input)
            .into_iter()
            .map(|(action, named)| (action, interceptor.resource(named)))
            .collect()
    }

    fn res(logical_id: &str, suffix: &str) -> Resource {
        Resource::Template {
            logical_id: logical_id.into(),
            suffix: suffix.into(),
        }
    }

    #[test]
    fn when_a_transaction_is_recorded_should_need_each_items_action_on_its_table() {
        let put = Put::builder()
            .table_name("t1-Idem")
            .item("id", aws_sdk_dynamodb::types::AttributeValue::S("k".into()))
            .build()
            .unwrap();
        let check = ConditionCheck::builder()
            .table_name("t1-Idem")
            .key("id", aws_sdk_dynamodb::types::AttributeValue::S("k".into()))
            .condition_expression("attribute_exists(id)")
            .build()
            .unwrap();
        let update = Update::builder()
            .table_name("t1-OrdersTable")
            .key(
                "orderId",
                aws_sdk_dynamodb::types::AttributeValue::S("o".into()),
            )
            .update_expression("SET a = :a")
            .build()
            .unwrap();
        let input = ddb::transact_write_items::TransactWriteItemsInput::builder()
            .transact_items(TransactWriteItem::builder().put(put).build())
            .transact_items(TransactWriteItem::builder().condition_check(check).build())
            .transact_items(TransactWriteItem::builder().update(update).build())
            .build()
            .unwrap();
        assert_eq!(
            accesses("DynamoDB", "TransactWriteItems", Input::erase(input)),
            vec![
                ("dynamodb:PutItem".to_string(), res("IdempotencyTable", "")),
                (
                    "dynamodb:ConditionCheckItem".to_string(),
                    res("IdempotencyTable", "")
                ),
                ("dynamodb:UpdateItem".to_string(), res("OrdersTable", "")),
            ]
        );
    }

    #[test]
    fn when_an_index_is_queried_should_act_on_the_index() {
        let input = ddb::query::QueryInput::builder()
            .table_name("t1-OrdersTable")
            .index_name("PendingOrdersIndex")
            .build()
            .unwrap();
        assert_eq!(
            accesses("DynamoDB", "Query", Input::erase(input)),
            vec![(
                "dynamodb:Query".to_string(),
                res("OrdersTable", "/index/PendingOrdersIndex")
            )]
        );
    }

    #[test]
    fn when_a_name_is_not_the_templates_should_record_it_as_unknown() {
        let input = sqs::delete_message_batch::DeleteMessageBatchInput::builder()
            .queue_url("http://sqs/000/t1-StockQueue")
            .build()
            .unwrap();
        assert_eq!(
            accesses("SQS", "DeleteMessageBatch", Input::erase(input)),
            vec![("sqs:DeleteMessage".to_string(), res("StockQueue", ""))]
        );
        let input = ddb::get_item::GetItemInput::builder()
            .table_name("elsewhere")
            .build()
            .unwrap();
        assert_eq!(
            accesses("DynamoDB", "GetItem", Input::erase(input)),
            vec![(
                "dynamodb:GetItem".to_string(),
                Resource::Unknown("table elsewhere".into())
            )]
        );
        let unread = accesses("DynamoDB", "ListTables", Input::erase(42u8));
        assert_eq!(unread[0].0, "dynamodb:ListTables");
        assert!(matches!(&unread[0].1, Resource::Unknown(w) if w.contains("does not read")));
    }

    #[test]
    fn when_a_batch_operation_is_named_should_need_the_action_of_its_single_form() {
        assert_eq!(
            action_of_queue_call("sqs", "SendMessageBatch"),
            "sqs:SendMessage"
        );
        assert_eq!(
            action_of_queue_call("sqs", "DeleteMessageBatch"),
            "sqs:DeleteMessage"
        );
        assert_eq!(
            action_of_queue_call("sqs", "ChangeMessageVisibilityBatch"),
            "sqs:ChangeMessageVisibility"
        );
        assert_eq!(
            action_of_queue_call("sqs", "ReceiveMessage"),
            "sqs:ReceiveMessage"
        );
    }
}
