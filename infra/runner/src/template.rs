//! A typed reading of `template.yaml`, so the local runner provisions and wires exactly what
//! SAM deploys: the same tables (keys, indexes, TTL), the same queues (visibility, DLQs), the
//! same functions with the same environment, event sources and schedules.
//!
//! Only the part of CloudFormation that this project's template uses is understood; anything
//! else that the runner would need is an error naming where it is, never a silent guess.
//! Intrinsic functions arrive from serde_yaml either as tagged values (`!Ref X`,
//! `!GetAtt X.Y`, `!Sub "..."`) or in their long form (`{Ref: X}`, `{"Fn::GetAtt": [X, Y]}`,
//! `{"Fn::Sub": "..."}`); both are accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::{Mapping, Value};

/// The template at the workspace root, as seen from this crate.
pub const WORKSPACE_TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../template.yaml");

/// Lambda's defaults when neither the function nor `Globals.Function` sets them.
const DEFAULT_TIMEOUT_SECONDS: u32 = 3;
const DEFAULT_MEMORY_MB: u32 = 128;
/// The event source mapping defaults for SQS.
const DEFAULT_SQS_BATCH_SIZE: u32 = 10;
const DEFAULT_SQS_BATCHING_WINDOW_SECONDS: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template is not valid YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("template {at}: {message}")]
    Invalid { at: String, message: String },
    #[error("parameter override {0} names no parameter of the template")]
    UnknownParameter(String),
    #[error("function {function}: environment variable {variable}: {reason}")]
    Unresolvable {
        function: String,
        variable: String,
        reason: String,
    },
}

fn invalid(at: impl Into<String>, message: impl Into<String>) -> TemplateError {
    TemplateError::Invalid {
        at: at.into(),
        message: message.into(),
    }
}

/// The parsed template.
#[derive(Clone, Debug)]
pub struct Template {
    pub parameters: BTreeMap<String, ParameterSpec>,
    /// Values given with [`Template::with_parameter_overrides`], by parameter name.
    pub parameter_overrides: BTreeMap<String, String>,
    pub tables: Vec<TableSpec>,
    pub queues: Vec<QueueSpec>,
    pub functions: Vec<FunctionSpec>,
    /// `AWS::IAM::Role` resources, with the statements of every policy attached to them.
    pub roles: Vec<RoleSpec>,
    /// `AWS::CloudWatch::Alarm` resources.
    pub alarms: Vec<AlarmSpec>,
    /// Every resource's logical id and type, for error messages about references.
    pub resource_types: BTreeMap<String, String>,
    document: Value,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParameterSpec {
    pub name: String,
    /// `String`, `Number`, ...
    pub parameter_type: String,
    /// The default as a string (CloudFormation hands every parameter to `!Ref` as a string).
    pub default: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAttr {
    pub name: String,
    /// `S`, `N` or `B`.
    pub attr_type: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub logical_id: String,
    pub hash_key: KeyAttr,
    pub range_key: Option<KeyAttr>,
    pub gsis: Vec<GsiSpec>,
    /// The TTL attribute when `TimeToLiveSpecification.Enabled` is true.
    pub ttl_attribute: Option<String>,
}

impl TableSpec {
    /// Every attribute that some key (table or index) uses, once each: what CreateTable
    /// takes as `AttributeDefinitions`.
    pub fn key_attributes(&self) -> Vec<KeyAttr> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let keys = std::iter::once(&self.hash_key)
            .chain(self.range_key.as_ref())
            .chain(
                self.gsis
                    .iter()
                    .flat_map(|g| std::iter::once(&g.hash_key).chain(g.range_key.as_ref())),
            );
        for key in keys {
            if seen.insert(key.name.clone()) {
                out.push(key.clone());
            }
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GsiSpec {
    pub name: String,
    pub hash_key: KeyAttr,
    pub range_key: Option<KeyAttr>,
    /// `ALL`, `KEYS_ONLY` or `INCLUDE`.
    pub projection: String,
    pub non_key_attributes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueSpec {
    pub logical_id: String,
    pub visibility_timeout: Option<i32>,
    pub message_retention_period: Option<i32>,
    pub redrive: Option<Redrive>,
    pub fifo: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redrive {
    /// Logical id of the dead-letter queue.
    pub dead_letter_queue: String,
    pub max_receive_count: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSpec {
    pub logical_id: String,
    /// `Metadata.BuildProperties.Binary`: the Cargo binary that is this function.
    pub binary: String,
    /// Runtime and architectures after merging `Globals.Function`.
    pub runtime: Option<String>,
    pub architectures: Vec<String>,
    /// `Timeout` after merging `Globals.Function` (Lambda's default 3 when neither sets it).
    pub timeout_seconds: u32,
    /// `MemorySize` after merging `Globals.Function` (Lambda's default 128).
    pub memory_mb: u32,
    /// `Environment.Variables`, `Globals.Function` first, the function's own on top.
    pub environment: BTreeMap<String, EnvValue>,
    pub sqs_events: Vec<SqsEventSpec>,
    pub schedules: Vec<ScheduleSpec>,
    /// `(METHOD, path)` of every `HttpApi` (or `Api`) event, e.g. `("GET", "/orders/{orderId}")`.
    pub http_routes: Vec<(String, String)>,
    /// Events of other types, as `(event name, type)`: not run locally.
    pub other_events: Vec<(String, String)>,
    /// The role's logical id, from `Role: !GetAtt XRole.Arn` (an `AWS::IAM::Role` of the
    /// template); `None` when the function has no `Role` (SAM would generate one).
    pub role: Option<String>,
    /// `LoggingConfig.LogGroup` (function, else `Globals.Function`): the logical id of the
    /// `AWS::Logs::LogGroup` in `!Ref LogGroup`.
    pub log_group: Option<String>,
    /// `Tracing` after merging `Globals.Function` (`Active`, `PassThrough`).
    pub tracing: Option<String>,
    /// Whether the function has SAM `Policies` (policy templates or statements, which SAM
    /// turns into a generated role; their content is not read).
    pub sam_policies: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqsEventSpec {
    /// The event's name under `Events`.
    pub name: String,
    /// Logical id of the source queue.
    pub queue: String,
    pub batch_size: u32,
    pub batching_window_seconds: u32,
    pub report_batch_item_failures: bool,
    pub maximum_concurrency: Option<u32>,
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduleSpec {
    /// The event's name under `Events`.
    pub name: String,
    /// The schedule expression as written, a `!Ref` to a parameter resolved.
    pub expression: String,
    /// The period of a `rate(...)` expression; `None` for `cron(...)`.
    pub every: Option<Duration>,
    pub enabled: bool,
}

/// An `AWS::IAM::Role`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleSpec {
    pub logical_id: String,
    /// The statements of its inline `Policies`, then those of every `AWS::IAM::Policy` or
    /// `AWS::IAM::ManagedPolicy` resource that names the role in its `Roles`.
    pub statements: Vec<PolicyStatement>,
    /// `ManagedPolicyArns` as written: a literal ARN, or an intrinsic as `!Sub "..."`.
    pub managed_policy_arns: Vec<String>,
    /// The `Principal.Service` values of `AssumeRolePolicyDocument` (e.g.
    /// `lambda.amazonaws.com`).
    pub assumed_by: Vec<String>,
}

/// One statement of a policy document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyStatement {
    /// The inline policy's `PolicyName`; for an `AWS::IAM::Policy` or
    /// `AWS::IAM::ManagedPolicy` resource, its logical id.
    pub policy_name: String,
    pub sid: Option<String>,
    pub effect: Effect,
    /// `Action`, one or a list, as written (e.g. `dynamodb:GetItem`).
    pub actions: Vec<String>,
    /// `Resource`, one or a list.
    pub resources: Vec<ResourceRef>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

/// An entry of a statement's `Resource`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceRef {
    /// `"*"`.
    Any,
    /// The ARN of a resource of the template, and what follows it: `!GetAtt X.Arn` has the
    /// suffix `""`; `!Sub "${X.Arn}/index/*"` has `/index/*`.
    Arn { logical_id: String, suffix: String },
    /// Any other plain string (an ARN written out).
    Literal(String),
}

/// An `AWS::CloudWatch::Alarm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlarmSpec {
    pub logical_id: String,
    pub namespace: Option<String>,
    pub metric_name: Option<String>,
    /// `Dimensions`, as `(Name, Value)`.
    pub dimensions: Vec<(String, DimensionValue)>,
    /// `AlarmActions`: the logical id of each `!Ref X`, or the literal ARN.
    pub alarm_actions: Vec<String>,
}

/// The `Value` of an alarm's dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DimensionValue {
    GetAtt {
        logical_id: String,
        attribute: String,
    },
    Ref(String),
    Literal(String),
}

/// The value of an environment variable as the template writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    Literal(String),
    Ref(String),
    GetAtt(String, String),
    Sub(String),
    /// An intrinsic the runner cannot resolve (e.g. `!If`, `!Join`, `!Sub` with a variable
    /// map); resolving it is an error naming the variable.
    Unsupported(String),
}

/// What the local resources are called, by logical id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalNames {
    /// Table logical id -> local table name.
    pub tables: BTreeMap<String, String>,
    /// Queue logical id -> queue URL.
    pub queue_urls: BTreeMap<String, String>,
    /// Queue logical id -> queue ARN.
    pub queue_arns: BTreeMap<String, String>,
}

impl Template {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TemplateError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(&text)
    }

    #[allow(clippy::should_implement_trait)] // also offered as `FromStr` below
    pub fn from_str(text: &str) -> Result<Self, TemplateError> {
        let document: Value = serde_yaml::from_str(text)?;
        Self::build(document, BTreeMap::new())
    }

    /// The same template with some parameters set (as `sam deploy --parameter-overrides`
    /// would); everything that refers to them (timeouts, schedules, environment) is read
    /// again. Naming a parameter the template does not declare is an error.
    pub fn with_parameter_overrides(
        self,
        overrides: BTreeMap<String, String>,
    ) -> Result<Self, TemplateError> {
        let mut merged = self.parameter_overrides;
        merged.extend(overrides);
        Self::build(self.document, merged)
    }

    pub fn function(&self, logical_id: &str) -> Option<&FunctionSpec> {
        self.functions.iter().find(|f| f.logical_id == logical_id)
    }

    pub fn queue(&self, logical_id: &str) -> Option<&QueueSpec> {
        self.queues.iter().find(|q| q.logical_id == logical_id)
    }

    pub fn table(&self, logical_id: &str) -> Option<&TableSpec> {
        self.tables.iter().find(|t| t.logical_id == logical_id)
    }

    pub fn role(&self, logical_id: &str) -> Option<&RoleSpec> {
        self.roles.iter().find(|r| r.logical_id == logical_id)
    }

    /// A parameter's effective value: its override, else its default.
    pub fn parameter_value(&self, name: &str) -> Option<&str> {
        parameter_value(&self.parameters, &self.parameter_overrides, name)
    }

    /// Queues that some queue names as its dead-letter queue.
    pub fn dead_letter_queues(&self) -> BTreeSet<&str> {
        self.queues
            .iter()
            .filter_map(|q| q.redrive.as_ref())
            .map(|r| r.dead_letter_queue.as_str())
            .collect()
    }

    fn build(document: Value, overrides: BTreeMap<String, String>) -> Result<Self, TemplateError> {
        let parameters = parse_parameters(&document)?;
        if let Some(unknown) = overrides.keys().find(|k| !parameters.contains_key(*k)) {
            return Err(TemplateError::UnknownParameter(unknown.clone()));
        }
        let ctx = Ctx {
            parameters: &parameters,
            overrides: &overrides,
        };

        let resources = document
            .get("Resources")
            .and_then(Value::as_mapping)
            .ok_or_else(|| invalid("Resources", "missing or not a mapping"))?;

        let mut resource_types = BTreeMap::new();
        for (id, resource) in resources {
            let id = key_str(id, "Resources")?;
            let ty = resource
                .get("Type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("Resources.{id}.Type"), "missing"))?;
            resource_types.insert(id.to_string(), ty.to_string());
        }

        let globals = document
            .get("Globals")
            .and_then(|g| g.get("Function"))
            .and_then(Value::as_mapping);

        let mut tables = Vec::new();
        let mut queues = Vec::new();
        let mut functions = Vec::new();
        for (id, resource) in resources {
            let id = key_str(id, "Resources")?;
            match resource_types[id].as_str() {
                "AWS::DynamoDB::Table" => tables.push(parse_table(id, resource)?),
                "AWS::Serverless::SimpleTable" => tables.push(parse_simple_table(id, resource)?),
                "AWS::SQS::Queue" => queues.push(parse_queue(id, resource, &ctx)?),
                _ => {}
            }
        }
        let queue_ids: BTreeSet<&str> = queues.iter().map(|q| q.logical_id.as_str()).collect();
        for queue in &queues {
            if let Some(redrive) = &queue.redrive {
                if !queue_ids.contains(redrive.dead_letter_queue.as_str()) {
                    return Err(invalid(
                        format!("Resources.{}.Properties.RedrivePolicy", queue.logical_id),
                        format!(
                            "dead-letter queue {} is not an AWS::SQS::Queue of this template",
                            redrive.dead_letter_queue
                        ),
                    ));
                }
            }
        }
        let mut roles = Vec::new();
        let mut alarms = Vec::new();
        for (id, resource) in resources {
            let id = key_str(id, "Resources")?;
            match resource_types[id].as_str() {
                "AWS::Serverless::Function" => functions.push(parse_function(
                    id,
                    resource,
                    globals,
                    &ctx,
                    &queue_ids,
                    &resource_types,
                )?),
                "AWS::IAM::Role" => roles.push(parse_role(id, resource, &resource_types)?),
                "AWS::CloudWatch::Alarm" => alarms.push(parse_alarm(id, resource, &ctx)?),
                _ => {}
            }
        }
        // Policies attached to roles from outside.
        for (id, resource) in resources {
            let id = key_str(id, "Resources")?;
            if matches!(
                resource_types[id].as_str(),
                "AWS::IAM::Policy" | "AWS::IAM::ManagedPolicy"
            ) {
                let at = format!("Resources.{id}.Properties");
                let props = properties(id, resource)?;
                let statements = parse_policy_document(
                    id,
                    props.get("PolicyDocument"),
                    &format!("{at}.PolicyDocument"),
                    &resource_types,
                )?;
                for role in list(props.get("Roles")) {
                    let role_id = match intrinsic(role) {
                        Some(Intrinsic::Ref(r)) => r,
                        _ => {
                            return Err(invalid(
                                format!("{at}.Roles"),
                                format!("{} is not a !Ref to a role", describe(role)),
                            ))
                        }
                    };
                    let role = roles
                        .iter_mut()
                        .find(|r: &&mut RoleSpec| r.logical_id == role_id)
                        .ok_or_else(|| {
                            invalid(
                                format!("{at}.Roles"),
                                format!("{role_id} is not an AWS::IAM::Role of this template"),
                            )
                        })?;
                    role.statements.extend(statements.iter().cloned());
                }
            }
        }

        Ok(Template {
            parameters,
            parameter_overrides: overrides,
            tables,
            queues,
            functions,
            roles,
            alarms,
            resource_types,
            document,
        })
    }
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Template::from_str(text)
    }
}

impl FunctionSpec {
    /// The function's environment with every reference replaced by its local value:
    /// `!Ref Table` -> table name; `!Ref Queue` or `!GetAtt Queue.QueueUrl` -> URL;
    /// `!GetAtt Queue.Arn` -> ARN; `!GetAtt Queue.QueueName` -> the name in its URL;
    /// `!Ref Parameter` -> the parameter's override or default; `!Sub` with `${...}` of
    /// any of those. Anything else is an error naming the variable.
    pub fn resolve_environment(
        &self,
        names: &LocalNames,
        template: &Template,
    ) -> Result<BTreeMap<String, String>, TemplateError> {
        let resolver = Resolver { names, template };
        let mut out = BTreeMap::new();
        for (variable, value) in &self.environment {
            let resolved =
                resolver
                    .resolve(value)
                    .map_err(|reason| TemplateError::Unresolvable {
                        function: self.logical_id.clone(),
                        variable: variable.clone(),
                        reason,
                    })?;
            out.insert(variable.clone(), resolved);
        }
        Ok(out)
    }
}

// ------------------------------------------------------------------------------------------
// Intrinsic functions
// ------------------------------------------------------------------------------------------

enum Intrinsic {
    Ref(String),
    GetAtt(String, String),
    Sub(String),
    /// Any other intrinsic, by name (`If`, `Join`, `Sub` with variables, ...).
    Other(String),
}

fn short_name(tag: &serde_yaml::value::Tag) -> String {
    let tag = tag.to_string();
    tag.strip_prefix('!').unwrap_or(&tag).to_string()
}

/// Reads `v` as an intrinsic function call, short or long form; `None` for plain values.
fn intrinsic(v: &Value) -> Option<Intrinsic> {
    let (name, arg) = match v {
        Value::Tagged(tagged) => (short_name(&tagged.tag), &tagged.value),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, arg) = m.iter().next()?;
            let k = k.as_str()?;
            if k == "Ref" {
                ("Ref".to_string(), arg)
            } else {
                (k.strip_prefix("Fn::")?.to_string(), arg)
            }
        }
        _ => return None,
    };
    Some(match name.as_str() {
        "Ref" => match arg.as_str() {
            Some(target) => Intrinsic::Ref(target.to_string()),
            None => Intrinsic::Other("Ref with a non-string argument".into()),
        },
        "GetAtt" => match arg {
            Value::String(s) => match s.split_once('.') {
                Some((id, attr)) => Intrinsic::GetAtt(id.to_string(), attr.to_string()),
                None => Intrinsic::Other(format!("GetAtt {s} (expected Resource.Attribute)")),
            },
            Value::Sequence(items) if items.len() == 2 => {
                match (items[0].as_str(), items[1].as_str()) {
                    (Some(id), Some(attr)) => Intrinsic::GetAtt(id.to_string(), attr.to_string()),
                    _ => Intrinsic::Other("GetAtt with non-string arguments".into()),
                }
            }
            _ => Intrinsic::Other("GetAtt with an unexpected argument".into()),
        },
        "Sub" => match arg.as_str() {
            Some(s) => Intrinsic::Sub(s.to_string()),
            None => Intrinsic::Other("Sub with a variable map".into()),
        },
        other => Intrinsic::Other(other.to_string()),
    })
}

fn describe(v: &Value) -> String {
    match intrinsic(v) {
        Some(Intrinsic::Ref(t)) => format!("!Ref {t}"),
        Some(Intrinsic::GetAtt(id, attr)) => format!("!GetAtt {id}.{attr}"),
        Some(Intrinsic::Sub(s)) => format!("!Sub {s:?}"),
        Some(Intrinsic::Other(name)) => format!("!{name}"),
        None => serde_yaml::to_string(v)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| format!("{v:?}")),
    }
}

fn plain_scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn key_str<'a>(k: &'a Value, at: &str) -> Result<&'a str, TemplateError> {
    k.as_str()
        .ok_or_else(|| invalid(at, format!("key {} is not a string", describe(k))))
}

// ------------------------------------------------------------------------------------------
// Parameters and scalar properties
// ------------------------------------------------------------------------------------------

fn parameter_value<'a>(
    parameters: &'a BTreeMap<String, ParameterSpec>,
    overrides: &'a BTreeMap<String, String>,
    name: &str,
) -> Option<&'a str> {
    overrides
        .get(name)
        .map(String::as_str)
        .or_else(|| parameters.get(name).and_then(|p| p.default.as_deref()))
}

fn parse_parameters(document: &Value) -> Result<BTreeMap<String, ParameterSpec>, TemplateError> {
    let mut out = BTreeMap::new();
    let Some(params) = document.get("Parameters") else {
        return Ok(out);
    };
    let params = params
        .as_mapping()
        .ok_or_else(|| invalid("Parameters", "not a mapping"))?;
    for (name, spec) in params {
        let name = key_str(name, "Parameters")?;
        let at = format!("Parameters.{name}");
        let parameter_type = spec
            .get("Type")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{at}.Type"), "missing"))?
            .to_string();
        let default = match spec.get("Default") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                plain_scalar(v).ok_or_else(|| invalid(format!("{at}.Default"), "not a scalar"))?,
            ),
        };
        out.insert(
            name.to_string(),
            ParameterSpec {
                name: name.to_string(),
                parameter_type,
                default,
            },
        );
    }
    Ok(out)
}

/// Resolves parameters for properties the runner reads (timeouts, sizes, schedules).
struct Ctx<'a> {
    parameters: &'a BTreeMap<String, ParameterSpec>,
    overrides: &'a BTreeMap<String, String>,
}

impl Ctx<'_> {
    /// A scalar property: a plain value or a `!Ref` to a parameter.
    fn scalar(&self, v: &Value, at: &str) -> Result<String, TemplateError> {
        if let Some(s) = plain_scalar(v) {
            return Ok(s);
        }
        match intrinsic(v) {
            Some(Intrinsic::Ref(name)) if self.parameters.contains_key(&name) => {
                parameter_value(self.parameters, self.overrides, &name)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        invalid(at, format!("parameter {name} has no default and no override"))
                    })
            }
            _ => Err(invalid(
                at,
                format!(
                    "{} is not a literal or a !Ref to a parameter (all the local runner reads here)",
                    describe(v)
                ),
            )),
        }
    }

    fn number<T: std::str::FromStr>(&self, v: &Value, at: &str) -> Result<T, TemplateError> {
        let s = self.scalar(v, at)?;
        s.trim()
            .parse()
            .map_err(|_| invalid(at, format!("{s:?} is not a valid number here")))
    }

    fn optional_number<T: std::str::FromStr>(
        &self,
        parent: &Value,
        key: &str,
        at: &str,
    ) -> Result<Option<T>, TemplateError> {
        match parent.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => self.number(v, &format!("{at}.{key}")).map(Some),
        }
    }

    fn boolean(&self, v: &Value, at: &str) -> Result<bool, TemplateError> {
        match self.scalar(v, at)?.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            other => Err(invalid(at, format!("{other:?} is not true or false"))),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Tables
// ------------------------------------------------------------------------------------------

fn properties<'a>(id: &str, resource: &'a Value) -> Result<&'a Value, TemplateError> {
    resource
        .get("Properties")
        .ok_or_else(|| invalid(format!("Resources.{id}.Properties"), "missing"))
}

fn parse_key_schema(
    schema: Option<&Value>,
    types: &BTreeMap<String, String>,
    at: &str,
) -> Result<(KeyAttr, Option<KeyAttr>), TemplateError> {
    let elements = schema
        .and_then(Value::as_sequence)
        .ok_or_else(|| invalid(at, "missing or not a list"))?;
    let mut hash = None;
    let mut range = None;
    for element in elements {
        let name = element
            .get("AttributeName")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(at, "an element has no AttributeName"))?;
        let attr_type = types.get(name).ok_or_else(|| {
            invalid(
                at,
                format!("key attribute {name} is not in AttributeDefinitions"),
            )
        })?;
        let key = KeyAttr {
            name: name.to_string(),
            attr_type: attr_type.clone(),
        };
        match element.get("KeyType").and_then(Value::as_str) {
            Some("HASH") if hash.is_none() => hash = Some(key),
            Some("RANGE") if range.is_none() => range = Some(key),
            other => {
                return Err(invalid(
                    at,
                    format!("unexpected or repeated KeyType {other:?} for {name}"),
                ))
            }
        }
    }
    let hash = hash.ok_or_else(|| invalid(at, "no HASH key"))?;
    Ok((hash, range))
}

fn parse_table(id: &str, resource: &Value) -> Result<TableSpec, TemplateError> {
    let props = properties(id, resource)?;
    let at = format!("Resources.{id}.Properties");

    let mut types = BTreeMap::new();
    let definitions = props
        .get("AttributeDefinitions")
        .and_then(Value::as_sequence)
        .ok_or_else(|| {
            invalid(
                format!("{at}.AttributeDefinitions"),
                "missing or not a list",
            )
        })?;
    for definition in definitions {
        let name = definition.get("AttributeName").and_then(Value::as_str);
        let ty = definition.get("AttributeType").and_then(Value::as_str);
        match (name, ty) {
            (Some(name), Some(ty @ ("S" | "N" | "B"))) => {
                types.insert(name.to_string(), ty.to_string());
            }
            _ => {
                return Err(invalid(
                    format!("{at}.AttributeDefinitions"),
                    format!("bad definition {}", describe(definition)),
                ))
            }
        }
    }

    let (hash_key, range_key) =
        parse_key_schema(props.get("KeySchema"), &types, &format!("{at}.KeySchema"))?;

    if props.get("LocalSecondaryIndexes").is_some() {
        return Err(invalid(
            format!("{at}.LocalSecondaryIndexes"),
            "local secondary indexes are not supported by the local runner",
        ));
    }

    let mut gsis = Vec::new();
    if let Some(indexes) = props.get("GlobalSecondaryIndexes") {
        let indexes = indexes
            .as_sequence()
            .ok_or_else(|| invalid(format!("{at}.GlobalSecondaryIndexes"), "not a list"))?;
        for (i, index) in indexes.iter().enumerate() {
            let iat = format!("{at}.GlobalSecondaryIndexes[{i}]");
            let name = index
                .get("IndexName")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{iat}.IndexName"), "missing"))?
                .to_string();
            let (hash_key, range_key) =
                parse_key_schema(index.get("KeySchema"), &types, &format!("{iat}.KeySchema"))?;
            let projection = index.get("Projection");
            let projection_type = projection
                .and_then(|p| p.get("ProjectionType"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{iat}.Projection.ProjectionType"), "missing"))?;
            if !matches!(projection_type, "ALL" | "KEYS_ONLY" | "INCLUDE") {
                return Err(invalid(
                    format!("{iat}.Projection.ProjectionType"),
                    format!("{projection_type:?} is not ALL, KEYS_ONLY or INCLUDE"),
                ));
            }
            let non_key_attributes = projection
                .and_then(|p| p.get("NonKeyAttributes"))
                .and_then(Value::as_sequence)
                .map(|attrs| {
                    attrs
                        .iter()
                        .map(|a| {
                            a.as_str().map(str::to_string).ok_or_else(|| {
                                invalid(
                                    format!("{iat}.Projection.NonKeyAttributes"),
                                    "not a string",
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default();
            gsis.push(GsiSpec {
                name,
                hash_key,
                range_key,
                projection: projection_type.to_string(),
                non_key_attributes,
            });
        }
    }

    let ttl_attribute = match props.get("TimeToLiveSpecification") {
        None => None,
        Some(ttl) => {
            let enabled = ttl.get("Enabled").and_then(Value::as_bool).unwrap_or(false);
            let attribute = ttl.get("AttributeName").and_then(Value::as_str);
            match (enabled, attribute) {
                (false, _) => None,
                (true, Some(attribute)) => Some(attribute.to_string()),
                (true, None) => {
                    return Err(invalid(
                        format!("{at}.TimeToLiveSpecification.AttributeName"),
                        "missing",
                    ))
                }
            }
        }
    };

    Ok(TableSpec {
        logical_id: id.to_string(),
        hash_key,
        range_key,
        gsis,
        ttl_attribute,
    })
}

fn parse_simple_table(id: &str, resource: &Value) -> Result<TableSpec, TemplateError> {
    let primary = resource.get("Properties").and_then(|p| p.get("PrimaryKey"));
    let (name, ty) = match primary {
        None => ("id".to_string(), "S".to_string()),
        Some(pk) => {
            let name = pk.get("Name").and_then(Value::as_str);
            let ty = match pk.get("Type").and_then(Value::as_str) {
                Some("String") => Some("S"),
                Some("Number") => Some("N"),
                Some("Binary") => Some("B"),
                _ => None,
            };
            match (name, ty) {
                (Some(n), Some(t)) => (n.to_string(), t.to_string()),
                _ => {
                    return Err(invalid(
                        format!("Resources.{id}.Properties.PrimaryKey"),
                        "needs Name and Type String|Number|Binary",
                    ))
                }
            }
        }
    };
    Ok(TableSpec {
        logical_id: id.to_string(),
        hash_key: KeyAttr {
            name,
            attr_type: ty,
        },
        range_key: None,
        gsis: Vec::new(),
        ttl_attribute: None,
    })
}

// ------------------------------------------------------------------------------------------
// Queues
// ------------------------------------------------------------------------------------------

fn parse_queue(id: &str, resource: &Value, ctx: &Ctx) -> Result<QueueSpec, TemplateError> {
    let at = format!("Resources.{id}.Properties");
    let empty = Value::Mapping(Mapping::new());
    let props = resource.get("Properties").unwrap_or(&empty);

    let visibility_timeout = ctx.optional_number(props, "VisibilityTimeout", &at)?;
    let message_retention_period = ctx.optional_number(props, "MessageRetentionPeriod", &at)?;
    let fifo = match props.get("FifoQueue") {
        None | Some(Value::Null) => false,
        Some(v) => ctx.boolean(v, &format!("{at}.FifoQueue"))?,
    };

    let redrive = match props.get("RedrivePolicy") {
        None | Some(Value::Null) => None,
        Some(policy) => {
            let rat = format!("{at}.RedrivePolicy");
            if policy.as_mapping().is_none() {
                return Err(invalid(
                    rat,
                    "only the mapping form {deadLetterTargetArn: !GetAtt Dlq.Arn, maxReceiveCount: N} is supported",
                ));
            }
            let target = policy
                .get("deadLetterTargetArn")
                .ok_or_else(|| invalid(format!("{rat}.deadLetterTargetArn"), "missing"))?;
            let dead_letter_queue = match intrinsic(target) {
                Some(Intrinsic::GetAtt(queue, attr)) if attr == "Arn" => queue,
                _ => {
                    return Err(invalid(
                        format!("{rat}.deadLetterTargetArn"),
                        format!(
                            "{} is not a !GetAtt of a queue of this template's Arn",
                            describe(target)
                        ),
                    ))
                }
            };
            let max_receive_count = ctx.number(
                policy
                    .get("maxReceiveCount")
                    .ok_or_else(|| invalid(format!("{rat}.maxReceiveCount"), "missing"))?,
                &format!("{rat}.maxReceiveCount"),
            )?;
            Some(Redrive {
                dead_letter_queue,
                max_receive_count,
            })
        }
    };

    Ok(QueueSpec {
        logical_id: id.to_string(),
        visibility_timeout,
        message_retention_period,
        redrive,
        fifo,
    })
}

// ------------------------------------------------------------------------------------------
// Functions
// ------------------------------------------------------------------------------------------

fn parse_env_value(v: &Value, at: &str) -> Result<EnvValue, TemplateError> {
    if let Some(s) = plain_scalar(v) {
        return Ok(EnvValue::Literal(s));
    }
    match intrinsic(v) {
        Some(Intrinsic::Ref(target)) => Ok(EnvValue::Ref(target)),
        Some(Intrinsic::GetAtt(id, attr)) => Ok(EnvValue::GetAtt(id, attr)),
        Some(Intrinsic::Sub(s)) => Ok(EnvValue::Sub(s)),
        Some(Intrinsic::Other(_)) => Ok(EnvValue::Unsupported(describe(v))),
        None => Err(invalid(at, format!("{} is not a value", describe(v)))),
    }
}

fn environment_of(
    source: Option<&Value>,
    at: &str,
    into: &mut BTreeMap<String, EnvValue>,
) -> Result<(), TemplateError> {
    let Some(variables) = source
        .and_then(|s| s.get("Environment"))
        .and_then(|e| e.get("Variables"))
    else {
        return Ok(());
    };
    let variables = variables
        .as_mapping()
        .ok_or_else(|| invalid(format!("{at}.Environment.Variables"), "not a mapping"))?;
    for (name, value) in variables {
        let name = key_str(name, at)?;
        let vat = format!("{at}.Environment.Variables.{name}");
        into.insert(name.to_string(), parse_env_value(value, &vat)?);
    }
    Ok(())
}

fn parse_rate(expression: &str) -> Result<Option<Duration>, String> {
    let expression = expression.trim();
    if expression.starts_with("cron(") {
        return Ok(None);
    }
    let inner = expression
        .strip_prefix("rate(")
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("{expression:?} is neither rate(...) nor cron(...)"))?;
    let mut parts = inner.split_whitespace();
    let (Some(n), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{expression:?}: expected rate(N unit)"));
    };
    let n: u64 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{expression:?}: {n:?} is not a positive whole number"))?;
    let seconds = match unit {
        "minute" | "minutes" => 60,
        "hour" | "hours" => 3600,
        "day" | "days" => 86_400,
        other => return Err(format!("{expression:?}: unknown unit {other:?}")),
    };
    Ok(Some(Duration::from_secs(n * seconds)))
}

fn parse_function(
    id: &str,
    resource: &Value,
    globals: Option<&Mapping>,
    ctx: &Ctx,
    queue_ids: &BTreeSet<&str>,
    resource_types: &BTreeMap<String, String>,
) -> Result<FunctionSpec, TemplateError> {
    let at = format!("Resources.{id}.Properties");
    let empty = Value::Mapping(Mapping::new());
    let props = resource.get("Properties").unwrap_or(&empty);
    let globals_value = globals.map(|g| Value::Mapping(g.clone()));
    let globals_value = globals_value.as_ref();

    // A property from the function, else from Globals.Function.
    let merged = |key: &str| -> Option<(&Value, String)> {
        props
            .get(key)
            .map(|v| (v, format!("{at}.{key}")))
            .or_else(|| {
                globals_value
                    .and_then(|g| g.get(key))
                    .map(|v| (v, format!("Globals.Function.{key}")))
            })
    };

    let binary = resource
        .get("Metadata")
        .and_then(|m| m.get("BuildProperties"))
        .and_then(|b| b.get("Binary"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            invalid(
                format!("Resources.{id}.Metadata.BuildProperties.Binary"),
                "missing: the local runner needs to know which binary this function is",
            )
        })?
        .to_string();

    let runtime = merged("Runtime")
        .map(|(v, at)| ctx.scalar(v, &at))
        .transpose()?;
    let architectures = match merged("Architectures") {
        None => Vec::new(),
        Some((v, aat)) => v
            .as_sequence()
            .ok_or_else(|| invalid(&aat, "not a list"))?
            .iter()
            .map(|a| ctx.scalar(a, &aat))
            .collect::<Result<_, _>>()?,
    };
    let timeout_seconds = match merged("Timeout") {
        None => DEFAULT_TIMEOUT_SECONDS,
        Some((v, at)) => ctx.number(v, &at)?,
    };
    let memory_mb = match merged("MemorySize") {
        None => DEFAULT_MEMORY_MB,
        Some((v, at)) => ctx.number(v, &at)?,
    };

    let mut environment = BTreeMap::new();
    environment_of(globals_value, "Globals.Function", &mut environment)?;
    environment_of(Some(props), &at, &mut environment)?;

    let mut sqs_events = Vec::new();
    let mut schedules = Vec::new();
    let mut http_routes = Vec::new();
    let mut other_events = Vec::new();
    if let Some(events) = props.get("Events") {
        let events = events
            .as_mapping()
            .ok_or_else(|| invalid(format!("{at}.Events"), "not a mapping"))?;
        for (name, event) in events {
            let name = key_str(name, &format!("{at}.Events"))?;
            let eat = format!("{at}.Events.{name}");
            let ty = event
                .get("Type")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("{eat}.Type"), "missing"))?;
            let eprops = event.get("Properties").unwrap_or(&empty);
            let pat = format!("{eat}.Properties");
            match ty {
                "SQS" => sqs_events.push(parse_sqs_event(name, eprops, &pat, ctx, queue_ids)?),
                "Schedule" | "ScheduleV2" => {
                    schedules.push(parse_schedule(name, ty, eprops, &pat, ctx)?)
                }
                "HttpApi" | "Api" => {
                    let method = eprops.get("Method").map(|v| ctx.scalar(v, &pat));
                    let path = eprops.get("Path").map(|v| ctx.scalar(v, &pat));
                    match (method, path) {
                        (Some(method), Some(path)) => {
                            http_routes.push((method?.to_ascii_uppercase(), path?))
                        }
                        // An HttpApi event without Method/Path is the catch-all route.
                        (None, None) if ty == "HttpApi" => {
                            http_routes.push(("ANY".to_string(), "$default".to_string()))
                        }
                        _ => return Err(invalid(pat, "needs both Method and Path")),
                    }
                }
                other => other_events.push((name.to_string(), other.to_string())),
            }
        }
    }

    let role = match props.get("Role") {
        None | Some(Value::Null) => None,
        Some(v) => match intrinsic(v) {
            Some(Intrinsic::GetAtt(role, attr))
                if attr == "Arn"
                    && resource_types.get(&role).map(String::as_str) == Some("AWS::IAM::Role") =>
            {
                Some(role)
            }
            _ => {
                return Err(invalid(
                    format!("{at}.Role"),
                    format!(
                        "{} is not !GetAtt Role.Arn of an AWS::IAM::Role of this template",
                        describe(v)
                    ),
                ))
            }
        },
    };
    let log_group = match props
        .get("LoggingConfig")
        .and_then(|l| l.get("LogGroup"))
        .map(|v| (v, format!("{at}.LoggingConfig.LogGroup")))
        .or_else(|| {
            globals_value
                .and_then(|g| g.get("LoggingConfig"))
                .and_then(|l| l.get("LogGroup"))
                .map(|v| (v, "Globals.Function.LoggingConfig.LogGroup".to_string()))
        }) {
        None => None,
        Some((v, lat)) => match intrinsic(v) {
            Some(Intrinsic::Ref(group)) => Some(group),
            _ => {
                return Err(invalid(
                    lat,
                    format!(
                        "{} is not a !Ref to a log group of this template",
                        describe(v)
                    ),
                ))
            }
        },
    };
    let tracing = merged("Tracing")
        .map(|(v, at)| ctx.scalar(v, &at))
        .transpose()?;
    let sam_policies = props.get("Policies").is_some_and(|p| !p.is_null());

    Ok(FunctionSpec {
        logical_id: id.to_string(),
        binary,
        runtime,
        architectures,
        timeout_seconds,
        memory_mb,
        environment,
        sqs_events,
        schedules,
        http_routes,
        other_events,
        role,
        log_group,
        tracing,
        sam_policies,
    })
}

fn parse_sqs_event(
    name: &str,
    props: &Value,
    at: &str,
    ctx: &Ctx,
    queue_ids: &BTreeSet<&str>,
) -> Result<SqsEventSpec, TemplateError> {
    let queue_value = props
        .get("Queue")
        .ok_or_else(|| invalid(format!("{at}.Queue"), "missing"))?;
    let queue = match intrinsic(queue_value) {
        Some(Intrinsic::GetAtt(queue, attr)) if attr == "Arn" => queue,
        _ => {
            return Err(invalid(
                format!("{at}.Queue"),
                format!(
                    "{} is not !GetAtt Queue.Arn of a queue of this template",
                    describe(queue_value)
                ),
            ))
        }
    };
    if !queue_ids.contains(queue.as_str()) {
        return Err(invalid(
            format!("{at}.Queue"),
            format!("{queue} is not an AWS::SQS::Queue of this template"),
        ));
    }

    let batch_size = ctx
        .optional_number(props, "BatchSize", at)?
        .unwrap_or(DEFAULT_SQS_BATCH_SIZE);
    if !(1..=10_000).contains(&batch_size) {
        return Err(invalid(
            format!("{at}.BatchSize"),
            format!("{batch_size} is outside 1..=10000"),
        ));
    }
    let batching_window_seconds = ctx
        .optional_number(props, "MaximumBatchingWindowInSeconds", at)?
        .unwrap_or(DEFAULT_SQS_BATCHING_WINDOW_SECONDS);
    if batching_window_seconds > 300 {
        return Err(invalid(
            format!("{at}.MaximumBatchingWindowInSeconds"),
            format!("{batching_window_seconds} is over 300"),
        ));
    }

    // cfn-lint does not check these values, so the runner does: a misspelt value would make
    // Lambda ignore the batch item failures that every handler reports.
    let mut report_batch_item_failures = false;
    if let Some(types) = props.get("FunctionResponseTypes") {
        let tat = format!("{at}.FunctionResponseTypes");
        let types = types
            .as_sequence()
            .ok_or_else(|| invalid(&tat, "not a list"))?;
        for t in types {
            match ctx.scalar(t, &tat)?.as_str() {
                "ReportBatchItemFailures" => report_batch_item_failures = true,
                other => {
                    return Err(invalid(
                        &tat,
                        format!(
                            "{other:?} is not a FunctionResponseType (ReportBatchItemFailures)"
                        ),
                    ))
                }
            }
        }
    }

    let maximum_concurrency = match props.get("ScalingConfig") {
        None | Some(Value::Null) => None,
        Some(scaling) => {
            let value: Option<u32> = ctx.optional_number(
                scaling,
                "MaximumConcurrency",
                &format!("{at}.ScalingConfig"),
            )?;
            if let Some(v) = value {
                if !(2..=1000).contains(&v) {
                    return Err(invalid(
                        format!("{at}.ScalingConfig.MaximumConcurrency"),
                        format!("{v} is outside 2..=1000"),
                    ));
                }
            }
            value
        }
    };

    let enabled = match props.get("Enabled") {
        None | Some(Value::Null) => true,
        Some(v) => ctx.boolean(v, &format!("{at}.Enabled"))?,
    };

    Ok(SqsEventSpec {
        name: name.to_string(),
        queue,
        batch_size,
        batching_window_seconds,
        report_batch_item_failures,
        maximum_concurrency,
        enabled,
    })
}

fn parse_schedule(
    name: &str,
    ty: &str,
    props: &Value,
    at: &str,
    ctx: &Ctx,
) -> Result<ScheduleSpec, TemplateError> {
    let key = if ty == "ScheduleV2" {
        "ScheduleExpression"
    } else {
        "Schedule"
    };
    let sat = format!("{at}.{key}");
    let expression = ctx.scalar(
        props.get(key).ok_or_else(|| invalid(&sat, "missing"))?,
        &sat,
    )?;
    let every = parse_rate(&expression).map_err(|m| invalid(&sat, m))?;
    let enabled = match (props.get("Enabled"), props.get("State")) {
        (Some(v), _) if !v.is_null() => ctx.boolean(v, &format!("{at}.Enabled"))?,
        (_, Some(v)) if !v.is_null() => match ctx.scalar(v, &format!("{at}.State"))?.as_str() {
            "ENABLED" => true,
            "DISABLED" => false,
            other => {
                return Err(invalid(
                    format!("{at}.State"),
                    format!("{other:?} is not ENABLED or DISABLED"),
                ))
            }
        },
        _ => true,
    };
    Ok(ScheduleSpec {
        name: name.to_string(),
        expression,
        every,
        enabled,
    })
}

// ------------------------------------------------------------------------------------------
// Roles, policies and alarms
// ------------------------------------------------------------------------------------------

/// A value that may be one item or a list of them.
fn list(v: Option<&Value>) -> Vec<&Value> {
    match v {
        None | Some(Value::Null) => vec![],
        Some(Value::Sequence(items)) => items.iter().collect(),
        Some(other) => vec![other],
    }
}

fn plain_string(v: &Value, at: &str) -> Result<String, TemplateError> {
    (intrinsic(v).is_none().then(|| v.as_str()).flatten())
        .map(str::to_string)
        .ok_or_else(|| invalid(at, format!("{} is not a string", describe(v))))
}

fn parse_role(
    id: &str,
    resource: &Value,
    resource_types: &BTreeMap<String, String>,
) -> Result<RoleSpec, TemplateError> {
    let at = format!("Resources.{id}.Properties");
    let props = properties(id, resource)?;
    let mut assumed_by = Vec::new();
    let trust = props.get("AssumeRolePolicyDocument");
    for (i, s) in list(trust.and_then(|d| d.get("Statement")))
        .into_iter()
        .enumerate()
    {
        let sat = format!("{at}.AssumeRolePolicyDocument.Statement[{i}].Principal.Service");
        for service in list(s.get("Principal").and_then(|p| p.get("Service"))) {
            assumed_by.push(plain_string(service, &sat)?);
        }
    }
    let mut statements = Vec::new();
    for (i, policy) in list(props.get("Policies")).into_iter().enumerate() {
        let pat = format!("{at}.Policies[{i}]");
        let name = plain_string(
            policy
                .get("PolicyName")
                .ok_or_else(|| invalid(format!("{pat}.PolicyName"), "missing"))?,
            &format!("{pat}.PolicyName"),
        )?;
        statements.extend(parse_policy_document(
            &name,
            policy.get("PolicyDocument"),
            &format!("{pat}.PolicyDocument"),
            resource_types,
        )?);
    }
    let managed_policy_arns = list(props.get("ManagedPolicyArns"))
        .into_iter()
        .map(|v| match intrinsic(v) {
            None => plain_scalar(v).unwrap_or_else(|| describe(v)),
            Some(_) => describe(v),
        })
        .collect();
    Ok(RoleSpec {
        logical_id: id.to_string(),
        statements,
        managed_policy_arns,
        assumed_by,
    })
}

fn parse_policy_document(
    policy_name: &str,
    document: Option<&Value>,
    at: &str,
    resource_types: &BTreeMap<String, String>,
) -> Result<Vec<PolicyStatement>, TemplateError> {
    let document = document.ok_or_else(|| invalid(at, "missing"))?;
    let mut out = Vec::new();
    for (i, s) in list(document.get("Statement")).into_iter().enumerate() {
        let sat = format!("{at}.Statement[{i}]");
        for not in ["NotAction", "NotResource", "NotPrincipal"] {
            if s.get(not).is_some() {
                return Err(invalid(
                    format!("{sat}.{not}"),
                    "not supported: write Action and Resource",
                ));
            }
        }
        let sid = s
            .get("Sid")
            .map(|v| plain_string(v, &format!("{sat}.Sid")))
            .transpose()?;
        let effect = match s.get("Effect").and_then(Value::as_str) {
            Some("Allow") => Effect::Allow,
            Some("Deny") => Effect::Deny,
            _ => return Err(invalid(format!("{sat}.Effect"), "not Allow or Deny")),
        };
        let actions = list(s.get("Action"))
            .into_iter()
            .map(|a| plain_string(a, &format!("{sat}.Action")))
            .collect::<Result<_, _>>()?;
        let resources = list(s.get("Resource"))
            .into_iter()
            .map(|r| resource_ref(r, &format!("{sat}.Resource"), resource_types))
            .collect::<Result<_, _>>()?;
        out.push(PolicyStatement {
            policy_name: policy_name.to_string(),
            sid,
            effect,
            actions,
            resources,
        });
    }
    Ok(out)
}

fn resource_ref(
    v: &Value,
    at: &str,
    resource_types: &BTreeMap<String, String>,
) -> Result<ResourceRef, TemplateError> {
    let arn = |id: &str, suffix: &str| {
        if resource_types.contains_key(id) {
            Ok(ResourceRef::Arn {
                logical_id: id.to_string(),
                suffix: suffix.to_string(),
            })
        } else {
            Err(invalid(
                at,
                format!("{id} names no resource of the template"),
            ))
        }
    };
    // Intrinsics first: `as_str` sees through a tag.
    match (intrinsic(v), v.as_str()) {
        (None, Some("*")) => Ok(ResourceRef::Any),
        (None, Some(s)) => Ok(ResourceRef::Literal(s.to_string())),
        (Some(Intrinsic::GetAtt(id, attr)), _) if attr == "Arn" => arn(&id, ""),
        (Some(Intrinsic::Sub(text)), _) => {
            match text
                .strip_prefix("${")
                .and_then(|rest| rest.split_once(".Arn}"))
                .filter(|(id, suffix)| !id.contains('{') && !suffix.contains("${"))
            {
                Some((id, suffix)) => arn(id, suffix),
                None => Err(invalid(
                    at,
                    format!("{} is not \"${{Resource.Arn}}...\"", describe(v)),
                )),
            }
        }
        _ => Err(invalid(
            at,
            format!(
                "{} is not \"*\", an ARN, !GetAtt Resource.Arn or !Sub \"${{Resource.Arn}}...\"",
                describe(v)
            ),
        )),
    }
}

fn parse_alarm(id: &str, resource: &Value, ctx: &Ctx) -> Result<AlarmSpec, TemplateError> {
    let at = format!("Resources.{id}.Properties");
    let props = properties(id, resource)?;
    let scalar = |key: &str| {
        props
            .get(key)
            .map(|v| ctx.scalar(v, &format!("{at}.{key}")))
            .transpose()
    };
    let namespace = scalar("Namespace")?;
    let metric_name = scalar("MetricName")?;
    let mut dimensions = Vec::new();
    for (i, d) in list(props.get("Dimensions")).into_iter().enumerate() {
        let dat = format!("{at}.Dimensions[{i}]");
        let name = plain_string(
            d.get("Name")
                .ok_or_else(|| invalid(format!("{dat}.Name"), "missing"))?,
            &format!("{dat}.Name"),
        )?;
        let value = d
            .get("Value")
            .ok_or_else(|| invalid(format!("{dat}.Value"), "missing"))?;
        let value = match (plain_scalar(value), intrinsic(value)) {
            (Some(s), _) => DimensionValue::Literal(s),
            (None, Some(Intrinsic::Ref(r))) => DimensionValue::Ref(r),
            (None, Some(Intrinsic::GetAtt(logical_id, attribute))) => DimensionValue::GetAtt {
                logical_id,
                attribute,
            },
            _ => {
                return Err(invalid(
                    format!("{dat}.Value"),
                    format!("{} is not a literal, !Ref or !GetAtt", describe(value)),
                ))
            }
        };
        dimensions.push((name, value));
    }
    let alarm_actions = list(props.get("AlarmActions"))
        .into_iter()
        .map(|v| match (intrinsic(v), v.as_str()) {
            (None, Some(s)) => Ok(s.to_string()),
            (Some(Intrinsic::Ref(r)), _) => Ok(r),
            _ => Err(invalid(
                format!("{at}.AlarmActions"),
                format!("{} is not a literal ARN or a !Ref", describe(v)),
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(AlarmSpec {
        logical_id: id.to_string(),
        namespace,
        metric_name,
        dimensions,
        alarm_actions,
    })
}

// ------------------------------------------------------------------------------------------
// Resolving environment values against local resources
// ------------------------------------------------------------------------------------------

struct Resolver<'a> {
    names: &'a LocalNames,
    template: &'a Template,
}

impl Resolver<'_> {
    fn resolve(&self, value: &EnvValue) -> Result<String, String> {
        match value {
            EnvValue::Literal(s) => Ok(s.clone()),
            EnvValue::Ref(target) => self.reference(target),
            EnvValue::GetAtt(id, attr) => self.attribute(id, attr),
            EnvValue::Sub(text) => self.substitute(text),
            EnvValue::Unsupported(what) => Err(format!(
                "{what} is not supported by the local runner (use !Ref, !GetAtt or !Sub)"
            )),
        }
    }

    fn kind(&self, id: &str) -> String {
        match self.template.resource_types.get(id) {
            Some(ty) => format!("{id} ({ty})"),
            None => id.to_string(),
        }
    }

    fn reference(&self, target: &str) -> Result<String, String> {
        if self.template.parameters.contains_key(target) {
            return self
                .template
                .parameter_value(target)
                .map(str::to_string)
                .ok_or_else(|| format!("parameter {target} has no default and no override"));
        }
        if target.starts_with("AWS::") {
            return Err(format!("pseudo parameter {target} has no local value"));
        }
        if let Some(table) = self.names.tables.get(target) {
            return Ok(table.clone());
        }
        if let Some(url) = self.names.queue_urls.get(target) {
            return Ok(url.clone());
        }
        if self.template.resource_types.contains_key(target) {
            Err(format!(
                "!Ref {} has no local value (not a provisioned table or queue)",
                self.kind(target)
            ))
        } else {
            Err(format!(
                "!Ref {target} names no parameter or resource of the template"
            ))
        }
    }

    fn attribute(&self, id: &str, attr: &str) -> Result<String, String> {
        let found = match attr {
            "QueueUrl" => self.names.queue_urls.get(id).cloned(),
            "Arn" => self.names.queue_arns.get(id).cloned(),
            "QueueName" => self
                .names
                .queue_urls
                .get(id)
                .and_then(|url| url.rsplit('/').next())
                .map(str::to_string),
            _ => None,
        };
        found.ok_or_else(|| {
            if self.template.resource_types.contains_key(id) {
                format!(
                    "!GetAtt {}.{attr} has no local value (queues' QueueUrl, Arn and QueueName are known)",
                    self.kind(id)
                )
            } else {
                format!("!GetAtt {id}.{attr} names no resource of the template")
            }
        })
    }

    fn substitute(&self, text: &str) -> Result<String, String> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            // `${!Literal}` stands for the text `${Literal}`.
            if let Some(literal) = after.strip_prefix('!') {
                let end = literal
                    .find('}')
                    .ok_or_else(|| format!("!Sub {text:?}: unterminated ${{"))?;
                out.push_str("${");
                out.push_str(&literal[..=end]);
                rest = &literal[end + 1..];
                continue;
            }
            let end = after
                .find('}')
                .ok_or_else(|| format!("!Sub {text:?}: unterminated ${{"))?;
            let name = after[..end].trim();
            let value = match name.split_once('.') {
                Some((id, attr)) if !name.starts_with("AWS::") => self.attribute(id, attr)?,
                _ => self.reference(name)?,
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn real_template() -> Template {
        Template::from_file(WORKSPACE_TEMPLATE).expect("template.yaml parses")
    }

    fn fake_names(template: &Template) -> LocalNames {
        let mut names = LocalNames::default();
        for table in &template.tables {
            names
                .tables
                .insert(table.logical_id.clone(), format!("t-{}", table.logical_id));
        }
        for queue in &template.queues {
            names.queue_urls.insert(
                queue.logical_id.clone(),
                format!("http://127.0.0.1:9324/000000000000/q-{}", queue.logical_id),
            );
            names.queue_arns.insert(
                queue.logical_id.clone(),
                format!("arn:aws:sqs:us-east-1:000000000000:q-{}", queue.logical_id),
            );
        }
        names
    }

    const FUNCTIONS: [(&str, &str); 5] = [
        ("OrderApiFunction", "order-api"),
        ("StockFunction", "stock"),
        ("PaymentFunction", "payment"),
        ("CoordinatorFunction", "coordinator"),
        ("SweeperFunction", "sweeper"),
    ];

    #[test]
    fn when_reading_the_real_template_should_find_every_function_with_its_binary() {
        let t = real_template();
        assert_eq!(t.functions.len(), FUNCTIONS.len());
        for (id, binary) in FUNCTIONS {
            let f = t.function(id).unwrap_or_else(|| panic!("{id} missing"));
            assert_eq!(f.binary, binary);
            assert_eq!(f.runtime.as_deref(), Some("provided.al2023"), "{id}");
            assert_eq!(f.architectures, vec!["arm64".to_string()], "{id}");
            assert_eq!(f.memory_mb, 128, "{id}");
            assert_eq!(
                f.environment.get("RUST_LOG"),
                Some(&EnvValue::Literal("info".into())),
                "{id} gets RUST_LOG from Globals"
            );
        }
        assert_eq!(t.function("OrderApiFunction").unwrap().timeout_seconds, 10);
        assert_eq!(t.function("StockFunction").unwrap().timeout_seconds, 10);
        assert_eq!(t.function("PaymentFunction").unwrap().timeout_seconds, 15);
        assert_eq!(
            t.function("CoordinatorFunction").unwrap().timeout_seconds,
            10
        );
        assert_eq!(t.function("SweeperFunction").unwrap().timeout_seconds, 60);
    }

    #[test]
    fn when_reading_the_real_template_should_find_tables_with_keys_indexes_and_ttl() {
        let t = real_template();
        let ids: Vec<_> = t.tables.iter().map(|t| t.logical_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "OrdersTable",
                "ProductsTable",
                "IdempotencyTable",
                "PaymentLedgerTable"
            ]
        );
        let s = |n: &str| KeyAttr {
            name: n.into(),
            attr_type: "S".into(),
        };

        let orders = t.table("OrdersTable").unwrap();
        assert_eq!(orders.hash_key, s("orderId"));
        assert_eq!(orders.range_key, None);
        assert_eq!(
            orders.gsis,
            vec![GsiSpec {
                name: "PendingOrdersIndex".into(),
                hash_key: s("pendingSweep"),
                range_key: Some(KeyAttr {
                    name: "createdAtMs".into(),
                    attr_type: "N".into()
                }),
                projection: "KEYS_ONLY".into(),
                non_key_attributes: vec![],
            }]
        );
        assert_eq!(orders.key_attributes().len(), 3);
        assert_eq!(orders.ttl_attribute, None);

        assert_eq!(t.table("ProductsTable").unwrap().hash_key, s("productId"));
        let idempotency = t.table("IdempotencyTable").unwrap();
        assert_eq!(idempotency.hash_key, s("id"));
        assert_eq!(idempotency.ttl_attribute.as_deref(), Some("expiresAt"));
        assert_eq!(
            t.table("PaymentLedgerTable").unwrap().hash_key,
            s("idempotencyKey")
        );
    }

    #[test]
    fn when_reading_the_real_template_should_give_every_work_queue_a_dlq_and_enough_visibility() {
        let t = real_template();
        assert_eq!(t.queues.len(), 6);
        let dlqs = t.dead_letter_queues();
        for (queue, dlq, consumer) in [
            ("StockQueue", "StockDeadLetterQueue", "StockFunction"),
            ("PaymentQueue", "PaymentDeadLetterQueue", "PaymentFunction"),
            (
                "CoordinatorQueue",
                "CoordinatorDeadLetterQueue",
                "CoordinatorFunction",
            ),
        ] {
            let q = t.queue(queue).unwrap();
            assert!(!q.fifo);
            let redrive = q.redrive.as_ref().expect("work queue has a DLQ");
            assert_eq!(redrive.dead_letter_queue, dlq);
            assert_eq!(redrive.max_receive_count, 5);
            assert!(dlqs.contains(dlq));

            let timeout = t.function(consumer).unwrap().timeout_seconds as i32;
            let visibility = q.visibility_timeout.expect("visibility timeout set");
            assert!(
                visibility >= 6 * timeout,
                "{queue}: visibility {visibility} < 6 x {timeout}"
            );

            let d = t.queue(dlq).unwrap();
            assert_eq!(d.redrive, None);
            assert_eq!(d.message_retention_period, Some(1_209_600));
        }
    }

    #[test]
    fn when_reading_the_real_template_should_wire_each_consumer_to_its_queue() {
        let t = real_template();
        for (function, queue) in [
            ("StockFunction", "StockQueue"),
            ("PaymentFunction", "PaymentQueue"),
            ("CoordinatorFunction", "CoordinatorQueue"),
        ] {
            let f = t.function(function).unwrap();
            assert_eq!(f.sqs_events.len(), 1, "{function}");
            let e = &f.sqs_events[0];
            assert_eq!(e.queue, queue);
            assert_eq!(e.batch_size, 10);
            assert_eq!(e.batching_window_seconds, 1);
            assert!(e.report_batch_item_failures, "{function}");
            assert!(e.maximum_concurrency.is_some_and(|c| c >= 2));
            assert!(e.enabled);
            assert!(f.schedules.is_empty() && f.http_routes.is_empty());
        }

        let sweeper = t.function("SweeperFunction").unwrap();
        assert!(sweeper.sqs_events.is_empty());
        assert_eq!(
            sweeper.schedules,
            vec![ScheduleSpec {
                name: "Sweep".into(),
                expression: "rate(1 minute)".into(),
                every: Some(Duration::from_secs(60)),
                enabled: true,
            }]
        );

        let api = t.function("OrderApiFunction").unwrap();
        let mut routes = api.http_routes.clone();
        routes.sort();
        let expected: Vec<(String, String)> = [
            ("GET", "/orders/{orderId}"),
            ("GET", "/products/{productId}"),
            ("POST", "/orders"),
            ("PUT", "/products/{productId}"),
        ]
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
        assert_eq!(routes, expected);
        assert!(api.sqs_events.is_empty() && api.other_events.is_empty());
    }

    #[test]
    fn when_resolving_every_functions_environment_should_use_local_names_and_parameter_defaults() {
        let t = real_template();
        let names = fake_names(&t);
        let env = |id: &str| {
            t.function(id)
                .unwrap()
                .resolve_environment(&names, &t)
                .unwrap()
        };
        let url = |q: &str| names.queue_urls[q].clone();
        let table = |q: &str| names.tables[q].clone();

        let api = env("OrderApiFunction");
        assert_eq!(api["ORDERS_TABLE"], table("OrdersTable"));
        assert_eq!(api["PRODUCTS_TABLE"], table("ProductsTable"));
        assert_eq!(api["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(api["STOCK_QUEUE_URL"], url("StockQueue"));
        assert_eq!(api["PAYMENT_QUEUE_URL"], url("PaymentQueue"));
        assert_eq!(api["RUST_LOG"], "info");
        assert_eq!(api.len(), 6);

        let stock = env("StockFunction");
        assert_eq!(stock["PRODUCTS_TABLE"], table("ProductsTable"));
        assert_eq!(stock["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(stock["COORDINATOR_QUEUE_URL"], url("CoordinatorQueue"));
        assert_eq!(stock.len(), 4);

        let payment = env("PaymentFunction");
        assert_eq!(payment["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(payment["PAYMENT_LEDGER_TABLE"], table("PaymentLedgerTable"));
        assert_eq!(payment["COORDINATOR_QUEUE_URL"], url("CoordinatorQueue"));
        assert_eq!(payment["PAYMENT_FAILURE_RATE"], "0.1");
        assert_eq!(payment.len(), 5);

        let coordinator = env("CoordinatorFunction");
        assert_eq!(coordinator["ORDERS_TABLE"], table("OrdersTable"));
        assert_eq!(coordinator["STOCK_QUEUE_URL"], url("StockQueue"));
        assert_eq!(coordinator["PAYMENT_QUEUE_URL"], url("PaymentQueue"));
        assert_eq!(coordinator.len(), 4);

        let sweeper = env("SweeperFunction");
        assert_eq!(sweeper["ORDERS_TABLE"], table("OrdersTable"));
        assert_eq!(sweeper["ORDERS_PENDING_INDEX"], "PendingOrdersIndex");
        assert_eq!(sweeper["COORDINATOR_QUEUE_URL"], url("CoordinatorQueue"));
        assert_eq!(sweeper["ORDER_TIMEOUT_SECONDS"], "300");
        assert_eq!(sweeper.len(), 5);

        // The index the sweeper is told to query is one the orders table has.
        let orders = t.table("OrdersTable").unwrap();
        assert!(orders
            .gsis
            .iter()
            .any(|g| g.name == sweeper["ORDERS_PENDING_INDEX"]));
    }

    #[test]
    fn when_reading_the_real_template_should_link_each_function_to_its_own_role() {
        let t = real_template();
        assert_eq!(t.roles.len(), FUNCTIONS.len());
        for (id, binary) in FUNCTIONS {
            let f = t.function(id).unwrap();
            let prefix = id.strip_suffix("Function").unwrap();
            let role_id = format!("{prefix}Role");
            assert_eq!(f.role.as_deref(), Some(role_id.as_str()), "{id}");
            assert_eq!(f.log_group, Some(format!("{prefix}LogGroup")), "{id}");
            assert_eq!(f.tracing.as_deref(), Some("Active"), "{id} (from Globals)");
            assert!(!f.sam_policies, "{id}");

            let role = t.role(&role_id).unwrap();
            assert_eq!(role.assumed_by, ["lambda.amazonaws.com"], "{role_id}");
            assert!(role.managed_policy_arns.is_empty(), "{role_id}");
            assert!(!role.statements.is_empty(), "{role_id}");
            for s in &role.statements {
                assert_eq!(s.policy_name, binary, "{role_id}");
                assert_eq!(s.effect, Effect::Allow, "{role_id}");
                assert!(s.sid.is_some(), "{role_id}");
            }
            // Logs to its own log group; X-Ray on "*".
            let logs = role
                .statements
                .iter()
                .find(|s| s.sid.as_deref() == Some("Logs"))
                .unwrap();
            assert_eq!(
                logs.resources,
                [ResourceRef::Arn {
                    logical_id: format!("{prefix}LogGroup"),
                    suffix: String::new()
                }]
            );
            let tracing = role
                .statements
                .iter()
                .find(|s| s.sid.as_deref() == Some("Tracing"))
                .unwrap();
            assert_eq!(tracing.resources, [ResourceRef::Any]);
        }
        assert!(t.role("StockFunction").is_none());
    }

    #[test]
    fn when_reading_the_real_template_should_read_each_roles_grants() {
        let t = real_template();
        let arn = |id: &str| ResourceRef::Arn {
            logical_id: id.into(),
            suffix: String::new(),
        };
        let grants = |role: &str, action: &str, resource: &ResourceRef| {
            t.role(role).unwrap().statements.iter().any(|s| {
                s.effect == Effect::Allow
                    && s.actions.iter().any(|a| a == action)
                    && s.resources.contains(resource)
            })
        };
        assert!(grants(
            "StockRole",
            "dynamodb:UpdateItem",
            &arn("ProductsTable")
        ));
        assert!(!grants(
            "StockRole",
            "dynamodb:UpdateItem",
            &arn("OrdersTable")
        ));
        assert!(grants(
            "StockRole",
            "sqs:ReceiveMessage",
            &arn("StockQueue")
        ));
        assert!(grants(
            "StockRole",
            "dynamodb:ConditionCheckItem",
            &arn("IdempotencyTable")
        ));
        // One statement, two queues.
        assert!(grants(
            "OrderApiRole",
            "sqs:SendMessage",
            &arn("StockQueue")
        ));
        assert!(grants(
            "OrderApiRole",
            "sqs:SendMessage",
            &arn("PaymentQueue")
        ));
        // !Sub "${OrdersTable.Arn}/index/PendingOrdersIndex"
        let sweeper = t.role("SweeperRole").unwrap();
        let query = sweeper
            .statements
            .iter()
            .find(|s| s.sid.as_deref() == Some("PendingOrders"))
            .unwrap();
        assert_eq!(query.actions, ["dynamodb:Query"]);
        assert_eq!(
            query.resources,
            [ResourceRef::Arn {
                logical_id: "OrdersTable".into(),
                suffix: "/index/PendingOrdersIndex".into()
            }]
        );
    }

    #[test]
    fn when_reading_the_real_template_should_find_an_alarm_on_each_dead_letter_queue() {
        let t = real_template();
        assert_eq!(t.alarms.len(), 6);
        for dlq in t.dead_letter_queues() {
            let watched = t.alarms.iter().any(|a| {
                a.namespace.as_deref() == Some("AWS/SQS")
                    && a.metric_name.as_deref() == Some("ApproximateNumberOfMessagesVisible")
                    && a.alarm_actions == ["AlarmTopic"]
                    && a.dimensions
                        == [(
                            "QueueName".to_string(),
                            DimensionValue::GetAtt {
                                logical_id: dlq.to_string(),
                                attribute: "QueueName".into(),
                            },
                        )]
            });
            assert!(watched, "no alarm on {dlq}");
        }
        let age = t
            .alarms
            .iter()
            .find(|a| a.logical_id == "StockQueueAgeAlarm")
            .unwrap();
        assert_eq!(
            age.metric_name.as_deref(),
            Some("ApproximateAgeOfOldestMessage")
        );
    }

    #[test]
    fn when_parameters_are_overridden_should_change_environment_and_schedule() {
        let overrides = BTreeMap::from([
            ("PaymentFailureRate".to_string(), "0".to_string()),
            ("OrderTimeoutSeconds".to_string(), "5".to_string()),
            ("SweepSchedule".to_string(), "rate(2 minutes)".to_string()),
        ]);
        let t = real_template().with_parameter_overrides(overrides).unwrap();
        let names = fake_names(&t);
        let payment = t
            .function("PaymentFunction")
            .unwrap()
            .resolve_environment(&names, &t)
            .unwrap();
        assert_eq!(payment["PAYMENT_FAILURE_RATE"], "0");
        let sweeper = t.function("SweeperFunction").unwrap();
        assert_eq!(
            sweeper.resolve_environment(&names, &t).unwrap()["ORDER_TIMEOUT_SECONDS"],
            "5"
        );
        assert_eq!(sweeper.schedules[0].expression, "rate(2 minutes)");
        assert_eq!(sweeper.schedules[0].every, Some(Duration::from_secs(120)));
        assert_eq!(t.parameter_value("Stage"), Some("dev"));
    }

    #[test]
    fn when_an_override_names_no_parameter_should_refuse_it() {
        let err = real_template()
            .with_parameter_overrides(BTreeMap::from([("Nope".into(), "1".into())]))
            .unwrap_err();
        assert!(matches!(err, TemplateError::UnknownParameter(p) if p == "Nope"));
    }

    #[test]
    fn when_a_queue_is_not_provisioned_should_name_the_function_and_variable() {
        let t = real_template();
        let mut names = fake_names(&t);
        names.queue_urls.remove("CoordinatorQueue");
        let err = t
            .function("StockFunction")
            .unwrap()
            .resolve_environment(&names, &t)
            .unwrap_err();
        match err {
            TemplateError::Unresolvable {
                function, variable, ..
            } => {
                assert_eq!(function, "StockFunction");
                assert_eq!(variable, "COORDINATOR_QUEUE_URL");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    const SMALL: &str = r#"
Parameters:
  Window:
    Type: Number
    Default: 2
  Rate:
    Type: String
    Default: rate(5 minutes)
Globals:
  Function:
    Timeout: 7
    Environment:
      Variables:
        SHARED: from-globals
        OVERRIDDEN: globals
Resources:
  Dlq:
    Type: AWS::SQS::Queue
  Work:
    Type: AWS::SQS::Queue
    Properties:
      FifoQueue: true
      VisibilityTimeout: "45"
      RedrivePolicy:
        deadLetterTargetArn: {"Fn::GetAtt": [Dlq, Arn]}
        maxReceiveCount: 3
  Table:
    Type: AWS::DynamoDB::Table
    Properties:
      AttributeDefinitions:
        - {AttributeName: pk, AttributeType: S}
        - {AttributeName: sk, AttributeType: N}
      KeySchema:
        - {AttributeName: pk, KeyType: HASH}
        - {AttributeName: sk, KeyType: RANGE}
      TimeToLiveSpecification: {AttributeName: ttl, Enabled: false}
  Fn:
    Type: AWS::Serverless::Function
    Metadata:
      BuildProperties:
        Binary: fn-bin
    Properties:
      MemorySize: 256
      Environment:
        Variables:
          OVERRIDDEN: function
          LONG_REF: {Ref: Table}
          LONG_ATT: {"Fn::GetAtt": [Work, QueueUrl]}
          ARN: !GetAtt Work.Arn
          NAME: !GetAtt Work.QueueName
          SUB: !Sub "${Table}|${Work.Arn}|${!Literal}|${Rate}"
          NUMBER: 5
          JOINED: !Join ["", [a, b]]
      Events:
        Q:
          Type: SQS
          Properties:
            Queue: !GetAtt Work.Arn
            MaximumBatchingWindowInSeconds: !Ref Window
            Enabled: false
        Tick:
          Type: ScheduleV2
          Properties:
            ScheduleExpression: cron(0 12 * * ? *)
            State: DISABLED
        Poll:
          Type: Schedule
          Properties:
            Schedule: !Ref Rate
        Bucket:
          Type: S3
          Properties: {}
"#;

    #[test]
    fn when_reading_long_form_intrinsics_and_globals_should_merge_and_resolve_them() {
        let t = Template::from_str(SMALL).unwrap();
        let work = t.queue("Work").unwrap();
        assert!(work.fifo);
        assert_eq!(work.visibility_timeout, Some(45));
        assert_eq!(
            work.redrive,
            Some(Redrive {
                dead_letter_queue: "Dlq".into(),
                max_receive_count: 3
            })
        );
        let table = t.table("Table").unwrap();
        assert_eq!(table.range_key.as_ref().unwrap().attr_type, "N");
        assert_eq!(table.ttl_attribute, None);

        let f = t.function("Fn").unwrap();
        assert_eq!(f.binary, "fn-bin");
        assert_eq!(f.timeout_seconds, 7);
        assert_eq!(f.memory_mb, 256);
        assert_eq!(f.sqs_events[0].batch_size, 10);
        assert_eq!(f.sqs_events[0].batching_window_seconds, 2);
        assert!(!f.sqs_events[0].report_batch_item_failures);
        assert!(!f.sqs_events[0].enabled);
        assert_eq!(f.schedules[0].every, None);
        assert!(!f.schedules[0].enabled);
        assert_eq!(f.schedules[1].every, Some(Duration::from_secs(300)));
        assert_eq!(f.other_events, vec![("Bucket".into(), "S3".into())]);

        let names = fake_names(&t);
        let err = f.resolve_environment(&names, &t).unwrap_err();
        assert!(
            matches!(&err, TemplateError::Unresolvable { variable, .. } if variable == "JOINED"),
            "{err}"
        );

        let mut f = f.clone();
        f.environment.remove("JOINED");
        let env = f.resolve_environment(&names, &t).unwrap();
        assert_eq!(env["SHARED"], "from-globals");
        assert_eq!(env["OVERRIDDEN"], "function");
        assert_eq!(env["LONG_REF"], "t-Table");
        assert_eq!(env["LONG_ATT"], names.queue_urls["Work"]);
        assert_eq!(env["ARN"], names.queue_arns["Work"]);
        assert_eq!(env["NAME"], "q-Work");
        assert_eq!(
            env["SUB"],
            format!(
                "t-Table|{}|${{Literal}}|rate(5 minutes)",
                names.queue_arns["Work"]
            )
        );
        assert_eq!(env["NUMBER"], "5");
    }

    #[test]
    fn when_a_response_type_is_misspelt_should_refuse_the_template() {
        let text = SMALL.replace(
            "            Enabled: false\n        Tick:",
            "            FunctionResponseTypes: [ReportBatchItemFailure]\n        Tick:",
        );
        let err = Template::from_str(&text).unwrap_err();
        assert!(err.to_string().contains("ReportBatchItemFailure"), "{err}");
    }

    #[test]
    fn when_a_redrive_names_an_unknown_queue_should_refuse_the_template() {
        let text = SMALL.replace("[Dlq, Arn]", "[Elsewhere, Arn]");
        let err = Template::from_str(&text).unwrap_err();
        assert!(err.to_string().contains("Elsewhere"), "{err}");
    }

    const ROLES: &str = r#"
Resources:
  Table:
    Type: AWS::DynamoDB::Table
    Properties:
      AttributeDefinitions: [{AttributeName: pk, AttributeType: S}]
      KeySchema: [{AttributeName: pk, KeyType: HASH}]
  Topic:
    Type: AWS::SNS::Topic
  Role:
    Type: AWS::IAM::Role
    Properties:
      AssumeRolePolicyDocument:
        Statement:
          Effect: Allow
          Principal: {Service: [lambda.amazonaws.com, edgelambda.amazonaws.com]}
          Action: sts:AssumeRole
      ManagedPolicyArns:
        - arn:aws:iam::aws:policy/ReadOnlyAccess
      Policies:
        - PolicyName: inline
          PolicyDocument:
            Statement:
              Effect: Deny
              Action: [dynamodb:DeleteItem, dynamodb:PutItem]
              Resource:
                - {"Fn::GetAtt": [Table, Arn]}
                - {"Fn::Sub": "${Table.Arn}/stream/*"}
                - arn:aws:s3:::bucket/*
  Extra:
    Type: AWS::IAM::Policy
    Properties:
      PolicyName: extra
      Roles: [!Ref Role]
      PolicyDocument:
        Statement:
          - Sid: Everything
            Effect: Allow
            Action: dynamodb:GetItem
            Resource: "*"
  Alarm:
    Type: AWS::CloudWatch::Alarm
    Properties:
      Namespace: Custom
      Dimensions:
        - {Name: Table, Value: !Ref Table}
        - {Name: Fixed, Value: x}
      AlarmActions: [!Ref Topic, "arn:aws:sns:us-east-1:1:t"]
  Fn:
    Type: AWS::Serverless::Function
    Metadata: {BuildProperties: {Binary: fn}}
    Properties:
      Role: !GetAtt Role.Arn
      Tracing: PassThrough
      Policies: [AWSLambdaBasicExecutionRole]
"#;

    #[test]
    fn when_reading_roles_policies_and_alarms_should_accept_both_forms_and_attached_policies() {
        let t = Template::from_str(ROLES).unwrap();
        let role = t.role("Role").unwrap();
        assert_eq!(
            role.assumed_by,
            ["lambda.amazonaws.com", "edgelambda.amazonaws.com"]
        );
        assert_eq!(
            role.managed_policy_arns,
            ["arn:aws:iam::aws:policy/ReadOnlyAccess"]
        );
        assert_eq!(
            role.statements,
            vec![
                PolicyStatement {
                    policy_name: "inline".into(),
                    sid: None,
                    effect: Effect::Deny,
                    actions: vec!["dynamodb:DeleteItem".into(), "dynamodb:PutItem".into()],
                    resources: vec![
                        ResourceRef::Arn {
                            logical_id: "Table".into(),
                            suffix: String::new()
                        },
                        ResourceRef::Arn {
                            logical_id: "Table".into(),
                            suffix: "/stream/*".into()
                        },
                        ResourceRef::Literal("arn:aws:s3:::bucket/*".into()),
                    ],
                },
                PolicyStatement {
                    policy_name: "Extra".into(),
                    sid: Some("Everything".into()),
                    effect: Effect::Allow,
                    actions: vec!["dynamodb:GetItem".into()],
                    resources: vec![ResourceRef::Any],
                },
            ]
        );
        let alarm = &t.alarms[0];
        assert_eq!(alarm.namespace.as_deref(), Some("Custom"));
        assert_eq!(alarm.metric_name, None);
        assert_eq!(
            alarm.dimensions,
            vec![
                ("Table".to_string(), DimensionValue::Ref("Table".into())),
                ("Fixed".to_string(), DimensionValue::Literal("x".into())),
            ]
        );
        assert_eq!(alarm.alarm_actions, ["Topic", "arn:aws:sns:us-east-1:1:t"]);
        let f = t.function("Fn").unwrap();
        assert_eq!(f.role.as_deref(), Some("Role"));
        assert_eq!(f.tracing.as_deref(), Some("PassThrough"));
        assert_eq!(f.log_group, None);
        assert!(f.sam_policies);
    }

    #[test]
    fn when_a_role_or_statement_is_not_understood_should_refuse_it_naming_where() {
        for (find, replace, expected) in [
            (
                "Role: !GetAtt Role.Arn",
                "Role: !GetAtt Table.Arn",
                "Resources.Fn.Properties.Role",
            ),
            (
                "Action: dynamodb:GetItem",
                "NotAction: dynamodb:GetItem",
                "Resources.Extra.Properties.PolicyDocument.Statement[0].NotAction",
            ),
            (
                "Resource: \"*\"",
                "Resource: !Ref Table",
                "Resources.Extra.Properties.PolicyDocument.Statement[0].Resource",
            ),
            (
                "${Table.Arn}/stream/*",
                "${Elsewhere.Arn}/stream/*",
                "Resources.Role.Properties.Policies[0].PolicyDocument.Statement[0].Resource",
            ),
            (
                "Roles: [!Ref Role]",
                "Roles: [!Ref Table]",
                "Resources.Extra.Properties.Roles",
            ),
        ] {
            assert!(ROLES.contains(find), "{find}");
            let err = Template::from_str(&ROLES.replace(find, replace)).unwrap_err();
            assert!(err.to_string().contains(expected), "{replace}: {err}");
        }
    }

    #[test]
    fn when_parsing_rates_should_accept_units_and_refuse_nonsense() {
        assert_eq!(
            parse_rate("rate(1 minute)"),
            Ok(Some(Duration::from_secs(60)))
        );
        assert_eq!(
            parse_rate("rate(3 hours)"),
            Ok(Some(Duration::from_secs(10_800)))
        );
        assert_eq!(
            parse_rate("rate(1 day)"),
            Ok(Some(Duration::from_secs(86_400)))
        );
        assert_eq!(parse_rate("cron(0/5 * * * ? *)"), Ok(None));
        assert!(parse_rate("rate(0 minutes)").is_err());
        assert!(parse_rate("rate(5 fortnights)").is_err());
        assert!(parse_rate("every minute").is_err());
    }
}
