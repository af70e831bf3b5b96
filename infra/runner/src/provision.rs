//! Creates the template's tables and queues on the local services (DynamoDB Local, moto),
//! named `prefix + logical id`, and reports their names, URLs and ARNs.
//!
//! Idempotent: a table or queue that already exists is reused (so a restarted runner keeps
//! its data), after checking that a table still has the template's keys and indexes, and
//! after setting a queue's attributes to the template's values. Tests give each run its own
//! prefix so that they can share one DynamoDB Local and one moto.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::error::{BuildError, DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::{
    create_table::CreateTableError, delete_table::DeleteTableError,
    describe_table::DescribeTableError, describe_time_to_live::DescribeTimeToLiveError,
    update_table::UpdateTableError, update_time_to_live::UpdateTimeToLiveError,
};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, IndexStatus, KeySchemaElement, KeyType, Projection, ProjectionType,
    ScalarAttributeType, TableDescription, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use aws_sdk_sqs::operation::{
    create_queue::CreateQueueError, delete_queue::DeleteQueueError,
    get_queue_attributes::GetQueueAttributesError, get_queue_url::GetQueueUrlError,
    set_queue_attributes::SetQueueAttributesError,
};
use aws_sdk_sqs::types::QueueAttributeName;
use backon::Retryable;

use crate::template::{GsiSpec, KeyAttr, LocalNames, QueueSpec, TableSpec, Template};

/// SQS's values for attributes a queue in the template leaves unset; an existing queue is
/// set back to them so that it matches what CloudFormation would create.
const SQS_DEFAULT_VISIBILITY_TIMEOUT: i32 = 30;
const SQS_DEFAULT_MESSAGE_RETENTION_PERIOD: i32 = 345_600;

/// How long a new table may take to become ACTIVE (DynamoDB Local: at once).
const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },
    #[error(
        "refusing to delete with an empty prefix: that would remove the unprefixed resources a local run keeps its data in"
    )]
    EmptyPrefix,
    #[error("building the {request} request for {resource}: {source}")]
    Build {
        request: &'static str,
        resource: String,
        #[source]
        source: BuildError,
    },
    #[error("DescribeTable {table}: {}", DisplayErrorContext(.source))]
    DescribeTable {
        table: String,
        #[source]
        source: Box<SdkError<DescribeTableError>>,
    },
    #[error("CreateTable {table}: {}", DisplayErrorContext(.source))]
    CreateTable {
        table: String,
        #[source]
        source: Box<SdkError<CreateTableError>>,
    },
    #[error("UpdateTable {table}: {}", DisplayErrorContext(.source))]
    UpdateTable {
        table: String,
        #[source]
        source: Box<SdkError<UpdateTableError>>,
    },
    #[error("DeleteTable {table}: {}", DisplayErrorContext(.source))]
    DeleteTable {
        table: String,
        #[source]
        source: Box<SdkError<DeleteTableError>>,
    },
    #[error("DescribeTimeToLive {table}: {}", DisplayErrorContext(.source))]
    DescribeTimeToLive {
        table: String,
        #[source]
        source: Box<SdkError<DescribeTimeToLiveError>>,
    },
    #[error("UpdateTimeToLive {table}: {}", DisplayErrorContext(.source))]
    UpdateTimeToLive {
        table: String,
        #[source]
        source: Box<SdkError<UpdateTimeToLiveError>>,
    },
    #[error(
        "table {table} exists but does not match {logical_id} in the template: {difference}; delete the table (or use another prefix) so that it is created again"
    )]
    TableMismatch {
        table: String,
        logical_id: String,
        difference: String,
    },
    #[error("table {table} is not ACTIVE after {waited:?}")]
    TableNotActive { table: String, waited: Duration },
    #[error("GetQueueUrl {queue}: {}", DisplayErrorContext(.source))]
    GetQueueUrl {
        queue: String,
        #[source]
        source: Box<SdkError<GetQueueUrlError>>,
    },
    #[error("CreateQueue {queue}: {}", DisplayErrorContext(.source))]
    CreateQueue {
        queue: String,
        #[source]
        source: Box<SdkError<CreateQueueError>>,
    },
    #[error("SetQueueAttributes {queue}: {}", DisplayErrorContext(.source))]
    SetQueueAttributes {
        queue: String,
        #[source]
        source: Box<SdkError<SetQueueAttributesError>>,
    },
    #[error("GetQueueAttributes {queue}: {}", DisplayErrorContext(.source))]
    GetQueueAttributes {
        queue: String,
        #[source]
        source: Box<SdkError<GetQueueAttributesError>>,
    },
    #[error("DeleteQueue {queue}: {}", DisplayErrorContext(.source))]
    DeleteQueue {
        queue: String,
        #[source]
        source: Box<SdkError<DeleteQueueError>>,
    },
    #[error("{operation} {queue}: the answer has no {missing}")]
    IncompleteAnswer {
        operation: &'static str,
        queue: String,
        missing: &'static str,
    },
    #[error("queues {0:?} name each other as dead-letter queues in a cycle")]
    RedriveCycle(Vec<String>),
}

/// The local name of a table: `prefix + logical id`.
pub fn local_table_name(prefix: &str, table: &TableSpec) -> String {
    format!("{prefix}{}", table.logical_id)
}

/// The local name of a queue: `prefix + logical id`, with `.fifo` for a FIFO queue.
pub fn local_queue_name(prefix: &str, queue: &QueueSpec) -> String {
    let suffix = if queue.fifo { ".fifo" } else { "" };
    format!("{prefix}{}{suffix}", queue.logical_id)
}

/// Characters valid in both table and queue names.
fn check_prefix(prefix: &str, template: &Template) -> Result<(), ProvisionError> {
    let invalid = |reason: String| ProvisionError::InvalidPrefix {
        prefix: prefix.to_string(),
        reason,
    };
    if let Some(c) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "{c:?} is not allowed (letters, digits, '-' and '_' only)"
        )));
    }
    for queue in &template.queues {
        let name = local_queue_name(prefix, queue);
        if name.len() > 80 {
            return Err(invalid(format!("queue name {name} is over 80 characters")));
        }
    }
    for table in &template.tables {
        let name = local_table_name(prefix, table);
        if !(3..=255).contains(&name.len()) {
            return Err(invalid(format!(
                "table name {name} is not 3 to 255 characters"
            )));
        }
    }
    Ok(())
}

/// Creates (or reuses) every table and queue of the template, named `prefix + logical id`.
pub async fn provision(
    template: &Template,
    prefix: &str,
    dynamodb: &aws_sdk_dynamodb::Client,
    sqs: &aws_sdk_sqs::Client,
) -> Result<LocalNames, ProvisionError> {
    check_prefix(prefix, template)?;
    let mut names = LocalNames::default();

    for table in &template.tables {
        let name = local_table_name(prefix, table);
        ensure_table(dynamodb, table, &name).await?;
        names.tables.insert(table.logical_id.clone(), name);
    }

    // Dead-letter queues first: a source queue's RedrivePolicy needs its DLQ's ARN.
    for queue in queues_dead_letter_first(template)? {
        let name = local_queue_name(prefix, queue);
        let (url, arn) = ensure_queue(sqs, queue, &name, &names).await?;
        names.queue_urls.insert(queue.logical_id.clone(), url);
        names.queue_arns.insert(queue.logical_id.clone(), arn);
    }

    Ok(names)
}

/// Deletes the tables and queues that [`provision`] made for `prefix`; ones already gone
/// are skipped. An empty prefix is refused.
pub async fn delete_prefixed(
    template: &Template,
    prefix: &str,
    dynamodb: &aws_sdk_dynamodb::Client,
    sqs: &aws_sdk_sqs::Client,
) -> Result<(), ProvisionError> {
    if prefix.is_empty() {
        return Err(ProvisionError::EmptyPrefix);
    }
    check_prefix(prefix, template)?;

    for table in &template.tables {
        let name = local_table_name(prefix, table);
        match dynamodb.delete_table().table_name(&name).send().await {
            Ok(_) => tracing::debug!(table = %name, "deleted table"),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) => {}
            Err(e) => {
                return Err(ProvisionError::DeleteTable {
                    table: name,
                    source: Box::new(e),
                });
            }
        }
    }

    for queue in &template.queues {
        let name = local_queue_name(prefix, queue);
        let Some(url) = queue_url(sqs, &name).await? else {
            continue;
        };
        match sqs.delete_queue().queue_url(&url).send().await {
            Ok(_) => tracing::debug!(queue = %name, "deleted queue"),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_queue_does_not_exist()) => {}
            Err(e) => {
                return Err(ProvisionError::DeleteQueue {
                    queue: name,
                    source: Box::new(e),
                });
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------

fn key_element(
    name: &str,
    key_type: KeyType,
    table: &str,
) -> Result<KeySchemaElement, ProvisionError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(key_type)
        .build()
        .map_err(|source| ProvisionError::Build {
            request: "CreateTable",
            resource: table.to_string(),
            source,
        })
}

fn key_schema(
    hash: &KeyAttr,
    range: Option<&KeyAttr>,
    table: &str,
) -> Result<Vec<KeySchemaElement>, ProvisionError> {
    let mut schema = vec![key_element(&hash.name, KeyType::Hash, table)?];
    if let Some(range) = range {
        schema.push(key_element(&range.name, KeyType::Range, table)?);
    }
    Ok(schema)
}

async fn ensure_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    spec: &TableSpec,
    name: &str,
) -> Result<(), ProvisionError> {
    match describe_table(dynamodb, name).await? {
        Some(existing) => {
            let existing = add_missing_indexes(dynamodb, spec, name, existing).await?;
            check_table_shape(spec, name, &existing)?;
            tracing::info!(table = %name, "reusing existing table");
        }
        None => create_table(dynamodb, spec, name).await?,
    }
    wait_until_active(dynamodb, name).await?;
    if let Some(attribute) = &spec.ttl_attribute {
        ensure_ttl(dynamodb, spec, name, attribute).await?;
    }
    Ok(())
}

async fn describe_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    name: &str,
) -> Result<Option<TableDescription>, ProvisionError> {
    match dynamodb.describe_table().table_name(name).send().await {
        Ok(out) => Ok(out.table),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            Ok(None)
        }
        Err(e) => Err(ProvisionError::DescribeTable {
            table: name.to_string(),
            source: Box::new(e),
        }),
    }
}

/// Every key attribute of the table and its indexes, as DynamoDB takes them.
fn attribute_definitions(
    spec: &TableSpec,
    request: &'static str,
    name: &str,
) -> Result<Vec<AttributeDefinition>, ProvisionError> {
    (spec.key_attributes().iter())
        .map(|key| {
            AttributeDefinition::builder()
                .attribute_name(&key.name)
                .attribute_type(ScalarAttributeType::from(key.attr_type.as_str()))
                .build()
                .map_err(|source| ProvisionError::Build {
                    request,
                    resource: name.to_string(),
                    source,
                })
        })
        .collect()
}

fn projection(gsi: &GsiSpec) -> Projection {
    Projection::builder()
        .projection_type(ProjectionType::from(gsi.projection.as_str()))
        .set_non_key_attributes(
            (!gsi.non_key_attributes.is_empty()).then(|| gsi.non_key_attributes.clone()),
        )
        .build()
}

/// Adds the template's indexes an existing table lacks, one `UpdateTable` each (DynamoDB
/// creates one index per update), and waits for them: a table kept from an earlier version of
/// the template (`make run` keeps its data) gets a new index rather than being refused.
/// Returns the table as it is afterwards.
async fn add_missing_indexes(
    dynamodb: &aws_sdk_dynamodb::Client,
    spec: &TableSpec,
    name: &str,
    existing: TableDescription,
) -> Result<TableDescription, ProvisionError> {
    let has = |index: &str| {
        (existing.global_secondary_indexes().iter()).any(|i| i.index_name() == Some(index))
    };
    let missing: Vec<&GsiSpec> = spec.gsis.iter().filter(|g| !has(&g.name)).collect();
    if missing.is_empty() {
        return Ok(existing);
    }
    for gsi in missing {
        let create = CreateGlobalSecondaryIndexAction::builder()
            .index_name(&gsi.name)
            .set_key_schema(Some(key_schema(
                &gsi.hash_key,
                gsi.range_key.as_ref(),
                name,
            )?))
            .projection(projection(gsi))
            .build()
            .map_err(|source| ProvisionError::Build {
                request: "UpdateTable",
                resource: name.to_string(),
                source,
            })?;
        dynamodb
            .update_table()
            .table_name(name)
            .set_attribute_definitions(Some(attribute_definitions(spec, "UpdateTable", name)?))
            .global_secondary_index_updates(
                GlobalSecondaryIndexUpdate::builder().create(create).build(),
            )
            .send()
            .await
            .map_err(|e| ProvisionError::UpdateTable {
                table: name.to_string(),
                source: Box::new(e),
            })?;
        tracing::info!(table = %name, index = %gsi.name, "added the template's new index to an existing table");
        wait_until_active(dynamodb, name).await?;
    }
    describe_table(dynamodb, name)
        .await?
        .ok_or_else(|| ProvisionError::TableNotActive {
            table: name.to_string(),
            waited: Duration::ZERO,
        })
}

async fn create_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    spec: &TableSpec,
    name: &str,
) -> Result<(), ProvisionError> {
    let build_error = |source| ProvisionError::Build {
        request: "CreateTable",
        resource: name.to_string(),
        source,
    };
    let attribute_definitions = attribute_definitions(spec, "CreateTable", name)?;
    let mut request = dynamodb
        .create_table()
        .table_name(name)
        .billing_mode(BillingMode::PayPerRequest)
        .set_key_schema(Some(key_schema(
            &spec.hash_key,
            spec.range_key.as_ref(),
            name,
        )?))
        .set_attribute_definitions(Some(attribute_definitions));
    for gsi in &spec.gsis {
        let index = GlobalSecondaryIndex::builder()
            .index_name(&gsi.name)
            .set_key_schema(Some(key_schema(
                &gsi.hash_key,
                gsi.range_key.as_ref(),
                name,
            )?))
            .projection(projection(gsi))
            .build()
            .map_err(build_error)?;
        request = request.global_secondary_indexes(index);
    }

    match request.send().await {
        Ok(_) => {
            tracing::info!(table = %name, "created table");
            Ok(())
        }
        // Another runner created it between our DescribeTable and CreateTable.
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_in_use_exception()) =>
        {
            match describe_table(dynamodb, name).await? {
                Some(existing) => check_table_shape(spec, name, &existing),
                None => Err(ProvisionError::CreateTable {
                    table: name.to_string(),
                    source: Box::new(e),
                }),
            }
        }
        Err(e) => Err(ProvisionError::CreateTable {
            table: name.to_string(),
            source: Box::new(e),
        }),
    }
}

fn describe_keys(schema: &[KeySchemaElement]) -> Vec<(String, String)> {
    schema
        .iter()
        .map(|k| {
            (
                k.attribute_name().to_string(),
                k.key_type().as_str().to_string(),
            )
        })
        .collect()
}

fn expected_keys(hash: &KeyAttr, range: Option<&KeyAttr>) -> Vec<(String, String)> {
    std::iter::once((hash.name.clone(), "HASH".to_string()))
        .chain(range.map(|r| (r.name.clone(), "RANGE".to_string())))
        .collect()
}

/// A reused table must have the template's keys, key types and indexes, or the functions
/// would fail on it in confusing ways.
fn check_table_shape(
    spec: &TableSpec,
    name: &str,
    existing: &TableDescription,
) -> Result<(), ProvisionError> {
    let mismatch = |difference: String| ProvisionError::TableMismatch {
        table: name.to_string(),
        logical_id: spec.logical_id.clone(),
        difference,
    };

    let want = expected_keys(&spec.hash_key, spec.range_key.as_ref());
    let have = describe_keys(existing.key_schema());
    if want != have {
        return Err(mismatch(format!(
            "key schema is {have:?}, expected {want:?}"
        )));
    }

    let types: HashMap<&str, &str> = existing
        .attribute_definitions()
        .iter()
        .map(|d| (d.attribute_name(), d.attribute_type().as_str()))
        .collect();
    for key in spec.key_attributes() {
        let have = types.get(key.name.as_str()).copied();
        if have != Some(key.attr_type.as_str()) {
            return Err(mismatch(format!(
                "attribute {} has type {:?}, expected {}",
                key.name, have, key.attr_type
            )));
        }
    }

    for gsi in &spec.gsis {
        let Some(index) = existing
            .global_secondary_indexes()
            .iter()
            .find(|i| i.index_name() == Some(gsi.name.as_str()))
        else {
            return Err(mismatch(format!("index {} is missing", gsi.name)));
        };
        let want = expected_keys(&gsi.hash_key, gsi.range_key.as_ref());
        let have = describe_keys(index.key_schema());
        if want != have {
            return Err(mismatch(format!(
                "index {} has key schema {have:?}, expected {want:?}",
                gsi.name
            )));
        }
        let projection = index
            .projection()
            .and_then(|p| p.projection_type())
            .map(|p| p.as_str());
        if projection != Some(gsi.projection.as_str()) {
            return Err(mismatch(format!(
                "index {} has projection {projection:?}, expected {}",
                gsi.name, gsi.projection
            )));
        }
    }
    Ok(())
}

/// Waits, with the runner's back-off, until the table and its indexes are ACTIVE; gives up
/// after [`TABLE_ACTIVE_TIMEOUT`].
async fn wait_until_active(
    dynamodb: &aws_sdk_dynamodb::Client,
    name: &str,
) -> Result<(), ProvisionError> {
    let started = tokio::time::Instant::now();
    let active = || async {
        if let Some(table) = describe_table(dynamodb, name).await? {
            let table_active = table.table_status() == Some(&TableStatus::Active);
            let indexes_active = table
                .global_secondary_indexes()
                .iter()
                .all(|i| i.index_status().is_none_or(|s| *s == IndexStatus::Active));
            if table_active && indexes_active {
                return Ok(());
            }
        }
        Err(ProvisionError::TableNotActive {
            table: name.to_string(),
            waited: started.elapsed(),
        })
    };
    active
        .retry(crate::pacing::backoff(
            Duration::from_millis(50),
            Duration::from_secs(1),
        ))
        .when(|e| {
            matches!(e, ProvisionError::TableNotActive { waited, .. } if *waited < TABLE_ACTIVE_TIMEOUT)
        })
        .await
}

async fn ensure_ttl(
    dynamodb: &aws_sdk_dynamodb::Client,
    spec: &TableSpec,
    name: &str,
    attribute: &str,
) -> Result<(), ProvisionError> {
    let current = dynamodb
        .describe_time_to_live()
        .table_name(name)
        .send()
        .await
        .map_err(|e| ProvisionError::DescribeTimeToLive {
            table: name.to_string(),
            source: Box::new(e),
        })?;
    if let Some(description) = current.time_to_live_description() {
        let on = matches!(
            description.time_to_live_status(),
            Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
        );
        match description.attribute_name() {
            Some(current) if on && current == attribute => return Ok(()),
            Some(current) if on => {
                return Err(ProvisionError::TableMismatch {
                    table: name.to_string(),
                    logical_id: spec.logical_id.clone(),
                    difference: format!("TTL is on attribute {current}, expected {attribute}"),
                });
            }
            _ => {}
        }
    }

    let specification = TimeToLiveSpecification::builder()
        .attribute_name(attribute)
        .enabled(true)
        .build()
        .map_err(|source| ProvisionError::Build {
            request: "UpdateTimeToLive",
            resource: name.to_string(),
            source,
        })?;
    match dynamodb
        .update_time_to_live()
        .table_name(name)
        .time_to_live_specification(specification)
        .send()
        .await
    {
        Ok(_) => {
            tracing::info!(table = %name, attribute, "enabled TTL");
            Ok(())
        }
        // Enabled by someone else since we looked (DynamoDB answers ValidationException
        // "TimeToLive is already enabled").
        Err(e)
            if e.code() == Some("ValidationException")
                && e.message()
                    .is_some_and(|m| m.to_ascii_lowercase().contains("already enabled")) =>
        {
            Ok(())
        }
        Err(e) => Err(ProvisionError::UpdateTimeToLive {
            table: name.to_string(),
            source: Box::new(e),
        }),
    }
}

// ------------------------------------------------------------------------------------------
// Queues
// ------------------------------------------------------------------------------------------

/// The template's queues ordered so that each dead-letter queue comes before the queues
/// that redrive into it.
fn queues_dead_letter_first(template: &Template) -> Result<Vec<&QueueSpec>, ProvisionError> {
    let mut ordered: Vec<&QueueSpec> = Vec::with_capacity(template.queues.len());
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut pending: Vec<&QueueSpec> = template.queues.iter().collect();
    while !pending.is_empty() {
        let (ready, waiting): (Vec<_>, Vec<_>) = pending.into_iter().partition(|q| {
            q.redrive
                .as_ref()
                .is_none_or(|r| placed.contains(r.dead_letter_queue.as_str()))
        });
        if ready.is_empty() {
            return Err(ProvisionError::RedriveCycle(
                waiting.iter().map(|q| q.logical_id.clone()).collect(),
            ));
        }
        for queue in ready {
            placed.insert(queue.logical_id.as_str());
            ordered.push(queue);
        }
        pending = waiting;
    }
    Ok(ordered)
}

/// The attributes a queue must have, except `FifoQueue` (which only CreateQueue takes).
fn queue_attributes(
    spec: &QueueSpec,
    names: &LocalNames,
) -> Result<HashMap<QueueAttributeName, String>, ProvisionError> {
    let mut attributes = HashMap::from([
        (
            QueueAttributeName::VisibilityTimeout,
            spec.visibility_timeout
                .unwrap_or(SQS_DEFAULT_VISIBILITY_TIMEOUT)
                .to_string(),
        ),
        (
            QueueAttributeName::MessageRetentionPeriod,
            spec.message_retention_period
                .unwrap_or(SQS_DEFAULT_MESSAGE_RETENTION_PERIOD)
                .to_string(),
        ),
    ]);
    if let Some(redrive) = &spec.redrive {
        // queues_dead_letter_first placed the DLQ before this queue.
        let arn = names
            .queue_arns
            .get(&redrive.dead_letter_queue)
            .ok_or_else(|| {
                ProvisionError::RedriveCycle(vec![
                    spec.logical_id.clone(),
                    redrive.dead_letter_queue.clone(),
                ])
            })?;
        let policy = serde_json::json!({
            "deadLetterTargetArn": arn,
            "maxReceiveCount": redrive.max_receive_count,
        });
        attributes.insert(QueueAttributeName::RedrivePolicy, policy.to_string());
    }
    Ok(attributes)
}

/// The URL of the queue called `name`, or `None` when there is none.
async fn queue_url(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
) -> Result<Option<String>, ProvisionError> {
    match sqs.get_queue_url().queue_name(name).send().await {
        Ok(out) => out
            .queue_url
            .map(Some)
            .ok_or_else(|| ProvisionError::IncompleteAnswer {
                operation: "GetQueueUrl",
                queue: name.to_string(),
                missing: "QueueUrl",
            }),
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_queue_does_not_exist()) =>
        {
            Ok(None)
        }
        Err(e) => Err(ProvisionError::GetQueueUrl {
            queue: name.to_string(),
            source: Box::new(e),
        }),
    }
}

async fn queue_arn_and_redrive(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    url: &str,
) -> Result<(String, Option<String>), ProvisionError> {
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| ProvisionError::GetQueueAttributes {
            queue: name.to_string(),
            source: Box::new(e),
        })?;
    let attributes = out.attributes();
    let arn = attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .ok_or_else(|| ProvisionError::IncompleteAnswer {
            operation: "GetQueueAttributes",
            queue: name.to_string(),
            missing: "QueueArn",
        })?;
    let redrive = attributes
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .filter(|p| !p.is_empty())
        .cloned();
    Ok((arn, redrive))
}

async fn set_attributes(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    url: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> Result<(), ProvisionError> {
    sqs.set_queue_attributes()
        .queue_url(url)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(|e| ProvisionError::SetQueueAttributes {
            queue: name.to_string(),
            source: Box::new(e),
        })?;
    Ok(())
}

/// Creates the queue or brings an existing one to the template's attributes; returns its
/// URL and ARN.
async fn ensure_queue(
    sqs: &aws_sdk_sqs::Client,
    spec: &QueueSpec,
    name: &str,
    names: &LocalNames,
) -> Result<(String, String), ProvisionError> {
    let attributes = queue_attributes(spec, names)?;

    let url = match queue_url(sqs, name).await? {
        Some(url) => {
            set_attributes(sqs, name, &url, attributes).await?;
            tracing::info!(queue = %name, "reusing existing queue");
            url
        }
        None => {
            let mut create = attributes.clone();
            if spec.fifo {
                create.insert(QueueAttributeName::FifoQueue, "true".to_string());
            }
            match sqs
                .create_queue()
                .queue_name(name)
                .set_attributes(Some(create))
                .send()
                .await
            {
                Ok(out) => {
                    tracing::info!(queue = %name, "created queue");
                    out.queue_url
                        .ok_or_else(|| ProvisionError::IncompleteAnswer {
                            operation: "CreateQueue",
                            queue: name.to_string(),
                            missing: "QueueUrl",
                        })?
                }
                // Created by someone else since we looked, with other attributes.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_queue_name_exists()) =>
                {
                    let url =
                        queue_url(sqs, name)
                            .await?
                            .ok_or_else(|| ProvisionError::CreateQueue {
                                queue: name.to_string(),
                                source: Box::new(e),
                            })?;
                    set_attributes(sqs, name, &url, attributes).await?;
                    url
                }
                Err(e) => {
                    return Err(ProvisionError::CreateQueue {
                        queue: name.to_string(),
                        source: Box::new(e),
                    });
                }
            }
        }
    };

    let (arn, redrive) = queue_arn_and_redrive(sqs, name, &url).await?;
    // A queue that once had a DLQ and no longer has one in the template: an empty
    // RedrivePolicy removes it.
    if spec.redrive.is_none() && redrive.is_some() {
        let clear = HashMap::from([(QueueAttributeName::RedrivePolicy, String::new())]);
        set_attributes(sqs, name, &url, clear).await?;
    }
    Ok((url, arn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::WORKSPACE_TEMPLATE;

    #[test]
    fn when_ordering_queues_should_place_each_dlq_before_its_source() {
        let template = Template::from_file(WORKSPACE_TEMPLATE).unwrap();
        let ordered: Vec<&str> = queues_dead_letter_first(&template)
            .unwrap()
            .iter()
            .map(|q| q.logical_id.as_str())
            .collect();
        assert_eq!(ordered.len(), template.queues.len());
        for queue in &template.queues {
            if let Some(redrive) = &queue.redrive {
                let dlq = ordered.iter().position(|q| *q == redrive.dead_letter_queue);
                let source = ordered.iter().position(|q| *q == queue.logical_id);
                assert!(
                    dlq < source,
                    "{} before {}",
                    redrive.dead_letter_queue,
                    queue.logical_id
                );
            }
        }
    }

    #[test]
    fn when_queues_redrive_in_a_cycle_should_refuse_them() {
        let text = r#"
Resources:
  A:
    Type: AWS::SQS::Queue
    Properties:
      RedrivePolicy: {deadLetterTargetArn: !GetAtt B.Arn, maxReceiveCount: 5}
  B:
    Type: AWS::SQS::Queue
    Properties:
      RedrivePolicy: {deadLetterTargetArn: !GetAtt A.Arn, maxReceiveCount: 5}
"#;
        let template = Template::from_str(text).unwrap();
        assert!(matches!(
            queues_dead_letter_first(&template),
            Err(ProvisionError::RedriveCycle(_))
        ));
    }

    #[test]
    fn when_building_queue_attributes_should_give_the_redrive_policy_the_dlq_arn() {
        let template = Template::from_file(WORKSPACE_TEMPLATE).unwrap();
        let mut names = LocalNames::default();
        names.queue_arns.insert(
            "StockDeadLetterQueue".into(),
            "arn:aws:sqs:us-east-1:000000000000:p-StockDeadLetterQueue".into(),
        );
        let attributes = queue_attributes(template.queue("StockQueue").unwrap(), &names).unwrap();
        let policy: serde_json::Value =
            serde_json::from_str(&attributes[&QueueAttributeName::RedrivePolicy]).unwrap();
        assert_eq!(
            policy,
            serde_json::json!({
                "deadLetterTargetArn": "arn:aws:sqs:us-east-1:000000000000:p-StockDeadLetterQueue",
                "maxReceiveCount": 5
            })
        );
        assert_eq!(attributes[&QueueAttributeName::VisibilityTimeout], "70");

        let dlq =
            queue_attributes(template.queue("StockDeadLetterQueue").unwrap(), &names).unwrap();
        assert_eq!(dlq[&QueueAttributeName::MessageRetentionPeriod], "1209600");
        assert_eq!(dlq[&QueueAttributeName::VisibilityTimeout], "30");
        assert!(!dlq.contains_key(&QueueAttributeName::RedrivePolicy));
    }

    #[test]
    fn when_a_prefix_has_characters_queue_names_refuse_should_refuse_it() {
        let template = Template::from_file(WORKSPACE_TEMPLATE).unwrap();
        assert!(check_prefix("it-1a2b_", &template).is_ok());
        assert!(check_prefix("", &template).is_ok());
        assert!(matches!(
            check_prefix("a.b", &template),
            Err(ProvisionError::InvalidPrefix { .. })
        ));
        assert!(check_prefix(&"x".repeat(70), &template).is_err());
    }
}
