//! A typed reading of `template.yaml`, so the local runner provisions and wires exactly what
//! SAM deploys (the same tables, queues, functions, environment, event sources and schedules),
//! and the template checks (tests/tests/template_policy.rs) read the same roles, alarms and
//! properties: one reader for both.
//!
//! Reading goes in three steps. `yaml_serde` reads the document; a `!Ref` to a parameter is
//! then replaced by the parameter's value (its override, else its default), as CloudFormation
//! would. Each resource is deserialized by its `Type` into a property struct, with
//! `serde_path_to_error` naming where a value does not fit (e.g.
//! `Resources.StockQueue.Properties.VisibilityTimeout: "soon" is not a valid i32`). Last, the
//! specs are built: `Globals.Function` merged, references between resources checked.
//! Intrinsic functions are read both as YAML tags (`!Ref X`, `!GetAtt X.Y`, `!Sub "..."`) and
//! in their long form (`{Ref: X}`, `{"Fn::GetAtt": [X, Y]}`, `{"Fn::Sub": "..."}`).
//!
//! Only the part of CloudFormation that this project's template uses is understood; anything
//! else that is read is an error naming where it is, never a silent guess. Resources of other
//! types are kept by logical id and type only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use yaml_serde::{Mapping, Value};

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
    /// Not YAML, or its top level is not what a template's is (the message names the path
    /// and the line).
    #[error("template: {0}")]
    Yaml(#[from] yaml_serde::Error),
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

// ------------------------------------------------------------------------------------------
// What the runner and the tests read
// ------------------------------------------------------------------------------------------

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
    /// `AWS::Cognito::UserPool`, `UserPoolClient` and `UserPoolGroup` resources whose
    /// `Condition` holds.
    pub user_pools: Vec<UserPoolSpec>,
    pub user_pool_clients: Vec<UserPoolClientSpec>,
    pub user_pool_groups: Vec<UserPoolGroupSpec>,
    /// `AWS::Serverless::HttpApi` resources, with their authorizers.
    pub http_apis: Vec<HttpApiSpec>,
    /// Every condition of `Conditions`, evaluated with the parameters' values.
    pub conditions: BTreeMap<String, bool>,
    /// Every resource's logical id and type, for error messages about references. A
    /// resource whose `Condition` is false is not created, so it is not here either.
    pub resource_types: BTreeMap<String, String>,
    document: Document,
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
        let keys = std::iter::once(&self.hash_key)
            .chain(self.range_key.as_ref())
            .chain(
                self.gsis
                    .iter()
                    .flat_map(|g| std::iter::once(&g.hash_key).chain(g.range_key.as_ref())),
            );
        keys.filter(|k| seen.insert(k.name.clone()))
            .cloned()
            .collect()
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
    /// Every `HttpApi` (or `Api`) event's route, e.g. `GET /orders/{orderId}`.
    pub http_routes: Vec<HttpRouteSpec>,
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

/// One statement of a policy document. `NotAction`, `NotResource` and `NotPrincipal` are
/// refused when reading.
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Effect {
    Allow,
    Deny,
}

/// An entry of a statement's `Resource`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Val")]
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
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Val")]
pub enum DimensionValue {
    GetAtt {
        logical_id: String,
        attribute: String,
    },
    Ref(String),
    Literal(String),
}

/// The value of an environment variable as the template writes it (a `!Ref` to a parameter
/// with a value reads as that value, a literal).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Val")]
pub enum EnvValue {
    Literal(String),
    Ref(String),
    GetAtt(String, String),
    Sub(String),
    /// An intrinsic the runner cannot resolve (e.g. `!If`, `!Join`, `!Sub` with a variable
    /// map); resolving it is an error naming the variable.
    Unsupported(String),
}

/// A route of an HTTP API, from a function's `HttpApi` event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HttpRouteSpec {
    /// Upper case, or `ANY`.
    pub method: String,
    /// `/orders/{orderId}`, or `$default` for the catch-all route.
    pub path: String,
    /// The event's `ApiId` (`!Ref X`); `None` for SAM's implicit API.
    pub api: Option<String>,
    pub auth: RouteAuth,
}

impl HttpRouteSpec {
    /// The route key API Gateway puts in the event: `GET /orders/{orderId}`, or `$default`.
    pub fn route_key(&self) -> String {
        if self.path == "$default" {
            self.path.clone()
        } else {
            format!("{} {}", self.method, self.path)
        }
    }
}

/// Which authorizer a route names in its `Auth.Authorizer`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteAuth {
    /// None named: the API's `DefaultAuthorizer`, if it has one.
    ApiDefault,
    /// `NONE`: public, whatever the API's default.
    Public,
    Named(String),
}

/// An `AWS::Serverless::HttpApi`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpApiSpec {
    pub logical_id: String,
    /// `Auth.DefaultAuthorizer`.
    pub default_authorizer: Option<String>,
    /// `Auth.Authorizers`, by name: JWT authorizers (the only kind the runner serves).
    pub authorizers: BTreeMap<String, JwtAuthorizerSpec>,
}

/// A JWT authorizer of an HTTP API, its `!If`s decided by the template's conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtAuthorizerSpec {
    /// Where the token is: `$request.header.Authorization` unless `IdentitySource` says.
    pub identity_source: String,
    /// `JwtConfiguration.issuer`, as written (e.g. `!Sub https://cognito-idp...${UserPool}`).
    pub issuer: EnvValue,
    /// `JwtConfiguration.audience`.
    pub audience: Vec<EnvValue>,
}

/// An `AWS::Cognito::UserPool`: what the local pool is created with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPoolSpec {
    pub logical_id: String,
    pub password_policy: PasswordPolicySpec,
    /// `AdminCreateUserConfig.AllowAdminCreateUserOnly`.
    pub admin_create_user_only: bool,
    /// `UsernameConfiguration.CaseSensitive`.
    pub case_sensitive_usernames: Option<bool>,
}

/// `Policies.PasswordPolicy`, with Cognito's defaults for what is not written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordPolicySpec {
    pub minimum_length: u32,
    pub require_lowercase: bool,
    pub require_uppercase: bool,
    pub require_numbers: bool,
    pub require_symbols: bool,
}

impl Default for PasswordPolicySpec {
    fn default() -> Self {
        Self {
            minimum_length: 8,
            require_lowercase: true,
            require_uppercase: true,
            require_numbers: true,
            require_symbols: true,
        }
    }
}

/// An `AWS::Cognito::UserPoolClient`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPoolClientSpec {
    pub logical_id: String,
    /// The logical id of its pool (`UserPoolId: !Ref Pool`).
    pub user_pool: String,
    pub client_name: Option<String>,
    pub generate_secret: bool,
    pub explicit_auth_flows: Vec<String>,
}

/// An `AWS::Cognito::UserPoolGroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPoolGroupSpec {
    pub logical_id: String,
    pub user_pool: String,
    pub group_name: String,
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
    /// User pool logical id -> pool id.
    pub user_pools: BTreeMap<String, String>,
    /// User pool client logical id -> client id.
    pub user_pool_clients: BTreeMap<String, String>,
    /// `AWS::Region`, when the resources live in one.
    pub region: Option<String>,
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
        // yaml_serde's own errors name the path and the line; the resources, read by type
        // afterwards, get theirs from serde_path_to_error (`typed`).
        Self::build(yaml_serde::from_str(text)?, BTreeMap::new())
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

    /// The authorizer that guards `route`; `None` when the route is public (it says
    /// `Authorizer: NONE`, or its API has no default authorizer).
    pub fn route_authorizer(
        &self,
        route: &HttpRouteSpec,
    ) -> Result<Option<&JwtAuthorizerSpec>, TemplateError> {
        let at = || format!("route {}", route.route_key());
        let api = match &route.api {
            Some(id) => Some(
                (self.http_apis.iter().find(|a| &a.logical_id == id)).ok_or_else(|| {
                    invalid(
                        at(),
                        format!("ApiId {id} is not an HttpApi of the template"),
                    )
                })?,
            ),
            None => None,
        };
        let name = match (&route.auth, api) {
            (RouteAuth::Public, _) | (RouteAuth::ApiDefault, None) => return Ok(None),
            (RouteAuth::ApiDefault, Some(api)) => match &api.default_authorizer {
                Some(name) => name,
                None => return Ok(None),
            },
            (RouteAuth::Named(name), _) => name,
        };
        let found = api.and_then(|api| api.authorizers.get(name));
        found.map(Some).ok_or_else(|| {
            invalid(
                at(),
                format!("authorizer {name} is not a JWT authorizer of its API"),
            )
        })
    }

    /// The issuer and audiences of a JWT authorizer, resolved to the local resources.
    pub fn resolve_authorizer(
        &self,
        authorizer: &JwtAuthorizerSpec,
        names: &LocalNames,
    ) -> Result<(String, Vec<String>), String> {
        let resolver = Resolver {
            names,
            template: self,
        };
        let issuer = resolver.resolve(&authorizer.issuer)?;
        let audience = (authorizer.audience.iter())
            .map(|a| resolver.resolve(a))
            .collect::<Result<_, _>>()?;
        Ok((issuer, audience))
    }

    /// A parameter's effective value: its override, else its default.
    pub fn parameter_value(&self, name: &str) -> Option<&str> {
        self.parameter_overrides
            .get(name)
            .or_else(|| self.parameters.get(name)?.default.as_ref())
            .map(String::as_str)
    }

    /// Queues that some queue names as its dead-letter queue.
    pub fn dead_letter_queues(&self) -> BTreeSet<&str> {
        self.queues
            .iter()
            .filter_map(|q| q.redrive.as_ref())
            .map(|r| r.dead_letter_queue.as_str())
            .collect()
    }
}

impl FromStr for Template {
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
// Values: literals and intrinsic functions
// ------------------------------------------------------------------------------------------

/// An intrinsic function call.
#[derive(Clone, Debug)]
enum Intrinsic {
    Ref(String),
    GetAtt(String, String),
    Sub(String),
    /// Any other intrinsic (`!If`, `!Join`, `!Sub` with a variable map, ...), described.
    Other(String),
}

impl fmt::Display for Intrinsic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Intrinsic::Ref(target) => write!(f, "!Ref {target}"),
            Intrinsic::GetAtt(id, attr) => write!(f, "!GetAtt {id}.{attr}"),
            Intrinsic::Sub(text) => write!(f, "!Sub {text:?}"),
            Intrinsic::Other(what) => f.write_str(what),
        }
    }
}

impl Intrinsic {
    /// The call of `name` (`Ref`, `GetAtt`, `Fn::GetAtt`, ...) on `argument`.
    fn read(name: &str, argument: Value) -> Result<Self, String> {
        let name = name.trim_start_matches('!').trim_start_matches("Fn::");
        Ok(match (name, argument) {
            ("Ref", Value::String(target)) => Intrinsic::Ref(target),
            ("GetAtt", Value::String(dotted)) => match dotted.split_once('.') {
                Some((id, attr)) => Intrinsic::GetAtt(id.to_string(), attr.to_string()),
                None => return Err(format!("!GetAtt {dotted}: expected Resource.Attribute")),
            },
            ("GetAtt", Value::Sequence(pair)) => match <[Value; 2]>::try_from(pair) {
                Ok([Value::String(id), Value::String(attr)]) => Intrinsic::GetAtt(id, attr),
                _ => return Err("!GetAtt takes [Resource, Attribute]".into()),
            },
            ("Ref" | "GetAtt", argument) => {
                return Err(format!(
                    "!{name} of {argument:?}: expected a logical id (.Attribute)"
                ));
            }
            ("Sub", Value::String(text)) => Intrinsic::Sub(text),
            ("Sub", _) => Intrinsic::Other("!Sub with a variable map".into()),
            (other, _) => Intrinsic::Other(format!("!{other}")),
        })
    }
}

/// A property as written: a literal (YAML numbers and booleans as their text, so `45` and
/// `"45"` are the same, as for CloudFormation), an intrinsic function, either as a tag
/// (`!Ref X`) or in its long form (`{Ref: X}`, `{"Fn::GetAtt": [X, Arn]}`), or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "Value")]
enum Val {
    Lit(String),
    Fn(Intrinsic),
    List(Vec<Val>),
}

impl TryFrom<Value> for Val {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        Ok(match value {
            Value::String(text) => Val::Lit(text),
            Value::Number(n) => Val::Lit(n.to_string()),
            Value::Bool(b) => Val::Lit(b.to_string()),
            Value::Sequence(items) => {
                Val::List((items.into_iter().map(Val::try_from)).collect::<Result<_, _>>()?)
            }
            Value::Tagged(call) => Val::Fn(Intrinsic::read(&call.tag.to_string(), call.value)?),
            Value::Mapping(m) => {
                let mut entries = m.into_iter();
                match (entries.next(), entries.next()) {
                    (Some((Value::String(name), argument)), None)
                        if name == "Ref" || name.starts_with("Fn::") =>
                    {
                        Val::Fn(Intrinsic::read(&name, argument)?)
                    }
                    _ => {
                        return Err(
                            "a mapping other than an intrinsic function is not a value".into()
                        );
                    }
                }
            }
            Value::Null => return Err("null is not a value".into()),
        })
    }
}

impl fmt::Display for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Lit(text) => write!(f, "{text:?}"),
            Val::Fn(call) => call.fmt(f),
            Val::List(items) => write!(f, "a list of {}", items.len()),
        }
    }
}

/// A string property: a literal, or a `!Ref` to a parameter (substituted before reading).
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "Val")]
struct Str(String);

impl TryFrom<Val> for Str {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        match value {
            Val::Lit(text) => Ok(Str(text)),
            other => Err(format!(
                "{other} is not a literal or a !Ref to a parameter with a value (all the local \
                 runner reads here)"
            )),
        }
    }
}

/// A number or boolean property, read from its text (`45` and `"45"`; `true` and `True`).
#[derive(Clone, Copy, Debug, Default)]
struct Parsed<T>(T);

impl<'de, T: FromStr> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Str(text) = Str::deserialize(d)?;
        let what = std::any::type_name::<T>();
        (text.trim().to_ascii_lowercase().parse().map(Parsed))
            .map_err(|_| de::Error::custom(format!("{text:?} is not a valid {what}")))
    }
}

/// A whole number in `MIN..=MAX`.
#[derive(Clone, Copy, Debug)]
struct InRange<const MIN: u32, const MAX: u32>(u32);

impl<'de, const MIN: u32, const MAX: u32> Deserialize<'de> for InRange<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Parsed::<u32>::deserialize(d)?.0 {
            n if (MIN..=MAX).contains(&n) => Ok(InRange(n)),
            n => Err(de::Error::custom(format!("{n} is outside {MIN}..={MAX}"))),
        }
    }
}

/// `!GetAtt X.Arn`: X.
#[derive(Deserialize)]
#[serde(try_from = "Val")]
struct ArnOf(String);

impl TryFrom<Val> for ArnOf {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        match value {
            Val::Fn(Intrinsic::GetAtt(id, attr)) if attr == "Arn" => Ok(ArnOf(id)),
            other => Err(format!("{other} is not !GetAtt X.Arn")),
        }
    }
}

/// `!Ref X`: X.
#[derive(Deserialize)]
#[serde(try_from = "Val")]
struct RefTo(String);

impl TryFrom<Val> for RefTo {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        match value {
            Val::Fn(Intrinsic::Ref(id)) => Ok(RefTo(id)),
            other => Err(format!("{other} is not !Ref X")),
        }
    }
}

/// A property the runner refuses rather than misread.
struct Refused;

impl<'de> Deserialize<'de> for Refused {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(de::Error::custom(
            "not supported by the local runner's template reader",
        ))
    }
}

/// IAM's "one or a list".
#[derive(Deserialize)]
#[serde(try_from = "Val", bound = "T: TryFrom<Val, Error = String>")]
struct Items<T>(Vec<T>);

impl<T: TryFrom<Val, Error = String>> TryFrom<Val> for Items<T> {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        let items = match value {
            Val::List(items) => items,
            one => vec![one],
        };
        (items.into_iter().map(T::try_from))
            .collect::<Result<_, _>>()
            .map(Items)
    }
}

impl<T> Default for Items<T> {
    fn default() -> Self {
        Items(Vec::new())
    }
}

impl TryFrom<Val> for EnvValue {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        Ok(match value {
            Val::Lit(text) => EnvValue::Literal(text),
            Val::Fn(Intrinsic::Ref(target)) => EnvValue::Ref(target),
            Val::Fn(Intrinsic::GetAtt(id, attr)) => EnvValue::GetAtt(id, attr),
            Val::Fn(Intrinsic::Sub(text)) => EnvValue::Sub(text),
            Val::Fn(other) => EnvValue::Unsupported(other.to_string()),
            Val::List(_) => return Err("a list is not a value".into()),
        })
    }
}

impl TryFrom<Val> for DimensionValue {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        match value {
            Val::Lit(text) => Ok(DimensionValue::Literal(text)),
            Val::Fn(Intrinsic::Ref(target)) => Ok(DimensionValue::Ref(target)),
            Val::Fn(Intrinsic::GetAtt(logical_id, attribute)) => Ok(DimensionValue::GetAtt {
                logical_id,
                attribute,
            }),
            other => Err(format!("{other} is not a literal, !Ref or !GetAtt")),
        }
    }
}

impl TryFrom<Val> for ResourceRef {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        let arn = |id: &str, suffix: &str| ResourceRef::Arn {
            logical_id: id.to_string(),
            suffix: suffix.to_string(),
        };
        match &value {
            Val::Lit(text) if text == "*" => return Ok(ResourceRef::Any),
            Val::Lit(text) => return Ok(ResourceRef::Literal(text.clone())),
            Val::Fn(Intrinsic::GetAtt(id, attr)) if attr == "Arn" => return Ok(arn(id, "")),
            Val::Fn(Intrinsic::Sub(text)) => {
                let found = (text.strip_prefix("${"))
                    .and_then(|rest| rest.split_once(".Arn}"))
                    .filter(|(id, suffix)| !id.contains(['$', '{', '}']) && !suffix.contains("${"));
                if let Some((id, suffix)) = found {
                    return Ok(arn(id, suffix));
                }
            }
            _ => {}
        }
        Err(format!(
            "{value} is not \"*\", an ARN, !GetAtt X.Arn or !Sub \"${{X.Arn}}...\""
        ))
    }
}

/// `!Ref X` (X), or a literal ARN: an alarm's action.
#[derive(Deserialize)]
#[serde(try_from = "Val")]
struct Target(String);

impl TryFrom<Val> for Target {
    type Error = String;

    fn try_from(value: Val) -> Result<Self, String> {
        match value {
            Val::Lit(arn) | Val::Fn(Intrinsic::Ref(arn)) => Ok(Target(arn)),
            other => Err(format!("{other} is not a literal ARN or a !Ref")),
        }
    }
}

/// `value` with every `!Ref` to a parameter that has a value replaced by that value (a
/// string: CloudFormation hands parameters to `!Ref` as strings).
fn substitute(value: &mut Value, parameters: &BTreeMap<&str, &str>) {
    let target = match &*value {
        Value::Tagged(t) if t.tag == "Ref" => t.value.as_str(),
        Value::Mapping(m) if m.len() == 1 => m.get("Ref").and_then(Value::as_str),
        _ => None,
    };
    if let Some(parameter) = target.and_then(|t| parameters.get(t)) {
        *value = Value::String(parameter.to_string());
        return;
    }
    match value {
        Value::Sequence(items) => items.iter_mut().for_each(|v| substitute(v, parameters)),
        Value::Mapping(m) => m.values_mut().for_each(|v| substitute(v, parameters)),
        Value::Tagged(t) => substitute(&mut t.value, parameters),
        _ => {}
    }
}

/// `value` (a resource, its `Properties` or `Metadata`, an event) as `T`; an error names its
/// path below `at`. A missing value reads as an empty mapping.
fn typed<T: DeserializeOwned>(value: &Value, at: &str) -> Result<T, TemplateError> {
    let empty = Value::Mapping(Mapping::new());
    let value = if value.is_null() { &empty } else { value };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let at = match e.path().to_string() {
            path if path == "." => at.to_string(),
            path if path.starts_with('[') => format!("{at}{path}"),
            path => format!("{at}.{path}"),
        };
        invalid(at, e.into_inner().to_string())
    })
}

// ------------------------------------------------------------------------------------------
// The template as written: what serde reads
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    #[serde(default)]
    parameters: BTreeMap<String, ParameterProps>,
    #[serde(default)]
    globals: Globals,
    /// Evaluated once parameters are substituted; they decide `Condition`s and `!If`s.
    #[serde(default)]
    conditions: BTreeMap<String, Value>,
    /// Read in the template's order, each by its `Type`, once parameters are substituted.
    resources: Mapping,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ParameterProps {
    #[serde(rename = "Type")]
    parameter_type: String,
    default: Option<Val>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Globals {
    #[serde(default)]
    function: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ResourceProps {
    #[serde(rename = "Type")]
    resource_type: String,
    condition: Option<String>,
    #[serde(default)]
    properties: Value,
    #[serde(default)]
    metadata: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TableProps {
    attribute_definitions: Vec<AttributeDefinition>,
    key_schema: Vec<KeyElement>,
    #[serde(default)]
    global_secondary_indexes: Vec<IndexProps>,
    #[serde(rename = "LocalSecondaryIndexes")]
    _local_secondary_indexes: Option<Refused>,
    time_to_live_specification: Option<TtlProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AttributeDefinition {
    attribute_name: String,
    attribute_type: AttributeType,
}

#[derive(Clone, Copy, Debug, Deserialize)]
enum AttributeType {
    S,
    N,
    B,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeyElement {
    attribute_name: String,
    key_type: KeyType,
}

#[derive(Debug, Deserialize)]
#[allow(clippy::upper_case_acronyms)] // as CloudFormation writes them
enum KeyType {
    HASH,
    RANGE,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IndexProps {
    index_name: String,
    key_schema: Vec<KeyElement>,
    projection: ProjectionProps,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProjectionProps {
    projection_type: ProjectionType,
    #[serde(default)]
    non_key_attributes: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
enum ProjectionType {
    ALL,
    KEYS_ONLY,
    INCLUDE,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TtlProps {
    attribute_name: Option<String>,
    #[serde(default)]
    enabled: Parsed<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SimpleTableProps {
    primary_key: Option<PrimaryKey>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PrimaryKey {
    name: String,
    #[serde(rename = "Type")]
    key_type: SimpleKeyType,
}

#[derive(Deserialize)]
enum SimpleKeyType {
    String,
    Number,
    Binary,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueueProps {
    visibility_timeout: Option<Parsed<i32>>,
    message_retention_period: Option<Parsed<i32>>,
    #[serde(default)]
    fifo_queue: Parsed<bool>,
    redrive_policy: Option<RedriveProps>,
}

#[derive(Deserialize)]
#[serde(
    rename_all = "camelCase",
    expecting = "the mapping form {deadLetterTargetArn: !GetAtt Dlq.Arn, maxReceiveCount: N}"
)]
struct RedriveProps {
    dead_letter_target_arn: ArnOf,
    max_receive_count: Parsed<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FunctionMetadata {
    build_properties: Option<BuildProperties>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct BuildProperties {
    binary: Option<String>,
}

/// A function's `Properties`, and `Globals.Function`.
#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct FunctionProps {
    runtime: Option<Str>,
    architectures: Option<Vec<Str>>,
    timeout: Option<Parsed<u32>>,
    memory_size: Option<Parsed<u32>>,
    tracing: Option<Str>,
    #[serde(default)]
    environment: EnvironmentProps,
    #[serde(default)]
    logging_config: LoggingProps,
    role: Option<ArnOf>,
    policies: Option<IgnoredAny>,
    /// Read in the template's order, each by its `Type`.
    #[serde(default)]
    events: Mapping,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnvironmentProps {
    #[serde(default)]
    variables: BTreeMap<String, EnvValue>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LoggingProps {
    log_group: Option<RefTo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventProps {
    #[serde(rename = "Type")]
    event_type: String,
    #[serde(default)]
    properties: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SqsEventProps {
    queue: ArnOf,
    batch_size: Option<InRange<1, 10_000>>,
    maximum_batching_window_in_seconds: Option<InRange<0, 300>>,
    /// cfn-lint does not check these values, so the runner does: a misspelt value would make
    /// Lambda ignore the batch item failures that every handler reports.
    #[serde(default)]
    function_response_types: Vec<ResponseType>,
    scaling_config: Option<ScalingProps>,
    enabled: Option<Parsed<bool>>,
}

#[derive(Deserialize)]
enum ResponseType {
    ReportBatchItemFailures,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScalingProps {
    maximum_concurrency: Option<InRange<2, 1000>>,
}

/// `Schedule` (EventBridge rule) and `ScheduleV2` (EventBridge Scheduler) events.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ScheduleProps {
    schedule: Option<Str>,
    schedule_expression: Option<Str>,
    enabled: Option<Parsed<bool>>,
    state: Option<ScheduleState>,
}

#[derive(Deserialize)]
#[allow(clippy::upper_case_acronyms)]
enum ScheduleState {
    ENABLED,
    DISABLED,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HttpEventProps {
    method: Option<Str>,
    path: Option<Str>,
    api_id: Option<RefTo>,
    #[serde(default)]
    auth: RouteAuthProps,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RouteAuthProps {
    authorizer: Option<Str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HttpApiProps {
    auth: Option<HttpApiAuthProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HttpApiAuthProps {
    default_authorizer: Option<Str>,
    #[serde(default)]
    authorizers: BTreeMap<String, AuthorizerProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AuthorizerProps {
    identity_source: Option<Str>,
    jwt_configuration: Option<JwtConfigurationProps>,
}

/// SAM writes these two keys in lower case.
#[derive(Deserialize)]
struct JwtConfigurationProps {
    issuer: EnvValue,
    #[serde(default)]
    audience: Vec<EnvValue>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserPoolProps {
    policies: Option<UserPoolPolicies>,
    admin_create_user_config: Option<AdminCreateUserProps>,
    username_configuration: Option<UsernameProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserPoolPolicies {
    password_policy: Option<PasswordPolicyProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PasswordPolicyProps {
    minimum_length: Option<InRange<6, 99>>,
    require_lowercase: Option<Parsed<bool>>,
    require_uppercase: Option<Parsed<bool>>,
    require_numbers: Option<Parsed<bool>>,
    require_symbols: Option<Parsed<bool>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AdminCreateUserProps {
    allow_admin_create_user_only: Option<Parsed<bool>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UsernameProps {
    case_sensitive: Option<Parsed<bool>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserPoolClientProps {
    user_pool_id: RefTo,
    client_name: Option<Str>,
    generate_secret: Option<Parsed<bool>>,
    #[serde(default)]
    explicit_auth_flows: Vec<Str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UserPoolGroupProps {
    user_pool_id: RefTo,
    group_name: Str,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RoleProps {
    assume_role_policy_document: Option<PolicyDocument>,
    #[serde(default)]
    policies: Vec<InlinePolicy>,
    #[serde(default)]
    managed_policy_arns: Vec<Val>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct InlinePolicy {
    policy_name: String,
    policy_document: PolicyDocument,
}

/// `AWS::IAM::Policy` and `AWS::IAM::ManagedPolicy`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AttachedPolicyProps {
    policy_document: PolicyDocument,
    #[serde(default)]
    roles: Vec<RefTo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PolicyDocument {
    statement: Vec<StatementProps>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StatementProps {
    sid: Option<String>,
    effect: Effect,
    #[serde(default)]
    action: Items<Str>,
    #[serde(default)]
    resource: Items<ResourceRef>,
    principal: Option<PrincipalProps>,
    #[serde(rename = "NotAction")]
    _not_action: Option<Refused>,
    #[serde(rename = "NotResource")]
    _not_resource: Option<Refused>,
    #[serde(rename = "NotPrincipal")]
    _not_principal: Option<Refused>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PrincipalProps {
    #[serde(default)]
    service: Items<Str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AlarmProps {
    namespace: Option<Str>,
    metric_name: Option<Str>,
    #[serde(default)]
    dimensions: Vec<DimensionProps>,
    #[serde(default)]
    alarm_actions: Vec<Target>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DimensionProps {
    name: String,
    value: DimensionValue,
}

// ------------------------------------------------------------------------------------------
// Building the specs: parameters substituted, Globals merged, references checked
// ------------------------------------------------------------------------------------------

impl Template {
    fn build(
        document: Document,
        overrides: BTreeMap<String, String>,
    ) -> Result<Self, TemplateError> {
        let mut parameters = BTreeMap::new();
        for (name, p) in &document.parameters {
            let default = match &p.default {
                None => None,
                Some(Val::Lit(text)) => Some(text.clone()),
                Some(other) => {
                    let at = format!("Parameters.{name}.Default");
                    return Err(invalid(at, format!("{other} is not a plain value")));
                }
            };
            let parameter_type = p.parameter_type.clone();
            let spec = ParameterSpec {
                name: name.clone(),
                parameter_type,
                default,
            };
            parameters.insert(name.clone(), spec);
        }
        if let Some(unknown) = overrides.keys().find(|k| !parameters.contains_key(*k)) {
            return Err(TemplateError::UnknownParameter(unknown.clone()));
        }
        let mut t = Template {
            parameters,
            parameter_overrides: overrides,
            tables: Vec::new(),
            queues: Vec::new(),
            functions: Vec::new(),
            roles: Vec::new(),
            alarms: Vec::new(),
            user_pools: Vec::new(),
            user_pool_clients: Vec::new(),
            user_pool_groups: Vec::new(),
            http_apis: Vec::new(),
            conditions: BTreeMap::new(),
            resource_types: BTreeMap::new(),
            document: Document::default(),
        };
        // Every `!Ref` to a parameter that has a value reads as that value.
        let values: BTreeMap<&str, &str> = (t.parameters.keys())
            .filter_map(|name| Some((name.as_str(), t.parameter_value(name)?)))
            .collect();
        let mut conditions = document.conditions.clone();
        for condition in conditions.values_mut() {
            substitute(condition, &values);
        }
        let decided = evaluate_conditions(&conditions)?;
        let mut globals = document.globals.function.clone();
        substitute(&mut globals, &values);
        decide(&mut globals, &decided, "Globals.Function")?;
        let globals: FunctionProps = typed(&globals, "Globals.Function")?;
        let mut resources = Vec::new();
        for (id, resource) in &document.resources {
            let id = id
                .as_str()
                .ok_or_else(|| invalid("Resources", "a key is not a string"))?;
            let at = format!("Resources.{id}");
            let mut resource = resource.clone();
            substitute(&mut resource, &values);
            decide(&mut resource, &decided, &at)?;
            let resource = typed::<ResourceProps>(&resource, &at)?;
            // A resource whose condition is false is not created.
            if let Some(condition) = &resource.condition {
                match decided.get(condition) {
                    Some(true) => {}
                    Some(false) => continue,
                    None => {
                        let message = format!("{condition} names no condition of the template");
                        return Err(invalid(format!("{at}.Condition"), message));
                    }
                }
            }
            resources.push((id, resource));
        }
        t.conditions = decided;
        t.resource_types = (resources.iter())
            .map(|(id, r)| (id.to_string(), r.resource_type.clone()))
            .collect();

        let mut attached = Vec::new();
        for (id, resource) in resources {
            let at = format!("Resources.{id}.Properties");
            let props = &resource.properties;
            match resource.resource_type.as_str() {
                "AWS::DynamoDB::Table" => t.tables.push(table(id, typed(props, &at)?, &at)?),
                "AWS::Serverless::SimpleTable" => {
                    t.tables.push(simple_table(id, typed(props, &at)?))
                }
                "AWS::SQS::Queue" => {
                    let queue = t.queue_spec(id, typed(props, &at)?, &at)?;
                    t.queues.push(queue);
                }
                "AWS::Serverless::Function" => {
                    let mat = format!("Resources.{id}.Metadata");
                    let metadata: FunctionMetadata = typed(&resource.metadata, &mat)?;
                    let binary = metadata.build_properties.and_then(|b| b.binary);
                    let binary = binary.ok_or_else(|| {
                        let why = "the local runner needs to know which binary this function is";
                        invalid(
                            format!("{mat}.BuildProperties.Binary"),
                            format!("missing: {why}"),
                        )
                    })?;
                    let f = t.function_spec(id, binary, typed(props, &at)?, &globals, &at)?;
                    t.functions.push(f);
                }
                "AWS::IAM::Role" => {
                    let role = t.role_spec(id, typed(props, &at)?, &at)?;
                    t.roles.push(role);
                }
                "AWS::IAM::Policy" | "AWS::IAM::ManagedPolicy" => {
                    let policy: AttachedPolicyProps = typed(props, &at)?;
                    let dat = format!("{at}.PolicyDocument");
                    let statements = t.statements(id, policy.policy_document, &dat)?;
                    attached.push((policy.roles, statements, at));
                }
                "AWS::Cognito::UserPool" => {
                    let p: UserPoolProps = typed(props, &at)?;
                    t.user_pools.push(user_pool(id, p));
                }
                "AWS::Cognito::UserPoolClient" => {
                    let p: UserPoolClientProps = typed(props, &at)?;
                    let pool_at = format!("{at}.UserPoolId");
                    t.user_pool_clients.push(UserPoolClientSpec {
                        logical_id: id.to_string(),
                        user_pool: t.of_type(
                            &p.user_pool_id.0,
                            "AWS::Cognito::UserPool",
                            &pool_at,
                        )?,
                        client_name: p.client_name.map(|n| n.0),
                        generate_secret: p.generate_secret.is_some_and(|g| g.0),
                        explicit_auth_flows: p
                            .explicit_auth_flows
                            .into_iter()
                            .map(|f| f.0)
                            .collect(),
                    });
                }
                "AWS::Cognito::UserPoolGroup" => {
                    let p: UserPoolGroupProps = typed(props, &at)?;
                    let pool_at = format!("{at}.UserPoolId");
                    t.user_pool_groups.push(UserPoolGroupSpec {
                        logical_id: id.to_string(),
                        user_pool: t.of_type(
                            &p.user_pool_id.0,
                            "AWS::Cognito::UserPool",
                            &pool_at,
                        )?,
                        group_name: p.group_name.0,
                    });
                }
                "AWS::Serverless::HttpApi" => {
                    let p: HttpApiProps = typed(props, &at)?;
                    t.http_apis.push(http_api(id, p, &at)?);
                }
                "AWS::CloudWatch::Alarm" => {
                    let p: AlarmProps = typed(props, &at)?;
                    t.alarms.push(AlarmSpec {
                        logical_id: id.to_string(),
                        namespace: p.namespace.map(|s| s.0),
                        metric_name: p.metric_name.map(|s| s.0),
                        dimensions: p
                            .dimensions
                            .into_iter()
                            .map(|d| (d.name, d.value))
                            .collect(),
                        alarm_actions: p.alarm_actions.into_iter().map(|a| a.0).collect(),
                    });
                }
                _ => {}
            }
        }
        // Policies attached to roles from outside them.
        for (roles, statements, at) in attached {
            for (i, RefTo(role)) in roles.into_iter().enumerate() {
                let role = t.of_type(&role, "AWS::IAM::Role", &format!("{at}.Roles[{i}]"))?;
                for spec in t.roles.iter_mut().filter(|r| r.logical_id == role) {
                    spec.statements.extend(statements.iter().cloned());
                }
            }
        }
        t.document = document;
        Ok(t)
    }

    /// `id`, when it names a resource of `resource_type`; else an error at `at`.
    fn of_type(&self, id: &str, resource_type: &str, at: &str) -> Result<String, TemplateError> {
        match self.resource_types.get(id) {
            Some(ty) if ty == resource_type => Ok(id.to_string()),
            _ => Err(invalid(
                at,
                format!("{id} is not an {resource_type} of this template"),
            )),
        }
    }

    fn queue_spec(&self, id: &str, p: QueueProps, at: &str) -> Result<QueueSpec, TemplateError> {
        let dlq = format!("{at}.RedrivePolicy.deadLetterTargetArn");
        let redrive = match p.redrive_policy {
            None => None,
            Some(r) => Some(Redrive {
                dead_letter_queue: self.of_type(
                    &r.dead_letter_target_arn.0,
                    "AWS::SQS::Queue",
                    &dlq,
                )?,
                max_receive_count: r.max_receive_count.0,
            }),
        };
        Ok(QueueSpec {
            logical_id: id.to_string(),
            visibility_timeout: p.visibility_timeout.map(|v| v.0),
            message_retention_period: p.message_retention_period.map(|v| v.0),
            redrive,
            fifo: p.fifo_queue.0,
        })
    }

    /// A function: its properties over `Globals.Function`'s (environment variables one by one).
    fn function_spec(
        &self,
        id: &str,
        binary: String,
        own: FunctionProps,
        globals: &FunctionProps,
        at: &str,
    ) -> Result<FunctionSpec, TemplateError> {
        let log_group = match (
            own.logging_config.log_group,
            &globals.logging_config.log_group,
        ) {
            (Some(RefTo(group)), _) => Some((group, format!("{at}.LoggingConfig.LogGroup"))),
            (None, Some(RefTo(group))) => Some((
                group.clone(),
                "Globals.Function.LoggingConfig.LogGroup".into(),
            )),
            (None, None) => None,
        };
        let string =
            |own: Option<Str>, global: &Option<Str>| own.or_else(|| global.clone()).map(|s| s.0);
        let mut spec = FunctionSpec {
            logical_id: id.to_string(),
            binary,
            runtime: string(own.runtime, &globals.runtime),
            architectures: (own.architectures.or_else(|| globals.architectures.clone()))
                .map_or_else(Vec::new, |list| list.into_iter().map(|a| a.0).collect()),
            timeout_seconds: own
                .timeout
                .or(globals.timeout)
                .map_or(DEFAULT_TIMEOUT_SECONDS, |t| t.0),
            memory_mb: own
                .memory_size
                .or(globals.memory_size)
                .map_or(DEFAULT_MEMORY_MB, |m| m.0),
            environment: (globals.environment.variables.clone().into_iter())
                .chain(own.environment.variables)
                .collect(),
            sqs_events: Vec::new(),
            schedules: Vec::new(),
            http_routes: Vec::new(),
            other_events: Vec::new(),
            role: (own
                .role
                .map(|ArnOf(role)| self.of_type(&role, "AWS::IAM::Role", &format!("{at}.Role"))))
            .transpose()?,
            log_group: (log_group
                .map(|(group, lat)| self.of_type(&group, "AWS::Logs::LogGroup", &lat)))
            .transpose()?,
            tracing: string(own.tracing, &globals.tracing),
            sam_policies: own.policies.is_some(),
        };
        for (name, event) in &own.events {
            let name = name
                .as_str()
                .ok_or_else(|| invalid(format!("{at}.Events"), "a key is not a string"))?;
            let event: EventProps = typed(event, &format!("{at}.Events.{name}"))?;
            let eat = format!("{at}.Events.{name}.Properties");
            let props = &event.properties;
            match event.event_type.as_str() {
                "SQS" => {
                    let p: SqsEventProps = typed(props, &eat)?;
                    spec.sqs_events.push(SqsEventSpec {
                        name: name.to_string(),
                        queue: self.of_type(
                            &p.queue.0,
                            "AWS::SQS::Queue",
                            &format!("{eat}.Queue"),
                        )?,
                        batch_size: p.batch_size.map_or(DEFAULT_SQS_BATCH_SIZE, |b| b.0),
                        batching_window_seconds: (p.maximum_batching_window_in_seconds)
                            .map_or(DEFAULT_SQS_BATCHING_WINDOW_SECONDS, |w| w.0),
                        report_batch_item_failures: !p.function_response_types.is_empty(),
                        maximum_concurrency: (p.scaling_config.and_then(|s| s.maximum_concurrency))
                            .map(|c| c.0),
                        enabled: p.enabled.is_none_or(|e| e.0),
                    });
                }
                ty @ ("Schedule" | "ScheduleV2") => {
                    let p: ScheduleProps = typed(props, &eat)?;
                    let (key, expression) = match ty {
                        "ScheduleV2" => ("ScheduleExpression", p.schedule_expression),
                        _ => ("Schedule", p.schedule),
                    };
                    let sat = format!("{eat}.{key}");
                    let Str(expression) = expression.ok_or_else(|| invalid(&sat, "missing"))?;
                    spec.schedules.push(ScheduleSpec {
                        name: name.to_string(),
                        every: parse_rate(&expression).map_err(|m| invalid(&sat, m))?,
                        expression,
                        enabled: match (p.enabled, p.state) {
                            (Some(enabled), _) => enabled.0,
                            (None, state) => !matches!(state, Some(ScheduleState::DISABLED)),
                        },
                    });
                }
                ty @ ("HttpApi" | "Api") => {
                    let p: HttpEventProps = typed(props, &eat)?;
                    let (method, path) = match (p.method, p.path) {
                        (Some(Str(method)), Some(Str(path))) => (method.to_ascii_uppercase(), path),
                        // An HttpApi event without Method/Path is the catch-all route.
                        (None, None) if ty == "HttpApi" => ("ANY".into(), "$default".into()),
                        _ => return Err(invalid(eat, "needs both Method and Path")),
                    };
                    let api_at = format!("{eat}.ApiId");
                    let api = (p.api_id)
                        .map(|RefTo(api)| self.of_type(&api, "AWS::Serverless::HttpApi", &api_at))
                        .transpose()?;
                    let auth = match p.auth.authorizer {
                        None => RouteAuth::ApiDefault,
                        Some(Str(name)) if name == "NONE" => RouteAuth::Public,
                        Some(Str(name)) => RouteAuth::Named(name),
                    };
                    spec.http_routes.push(HttpRouteSpec {
                        method,
                        path,
                        api,
                        auth,
                    });
                }
                other => spec
                    .other_events
                    .push((name.to_string(), other.to_string())),
            }
        }
        Ok(spec)
    }

    fn role_spec(&self, id: &str, p: RoleProps, at: &str) -> Result<RoleSpec, TemplateError> {
        let mut statements = Vec::new();
        for (i, policy) in p.policies.into_iter().enumerate() {
            let pat = format!("{at}.Policies[{i}].PolicyDocument");
            statements.extend(self.statements(
                &policy.policy_name,
                policy.policy_document,
                &pat,
            )?);
        }
        Ok(RoleSpec {
            logical_id: id.to_string(),
            statements,
            managed_policy_arns: (p.managed_policy_arns.iter())
                .map(|arn| match arn {
                    Val::Lit(arn) => arn.clone(),
                    other => other.to_string(),
                })
                .collect(),
            assumed_by: (p.assume_role_policy_document.into_iter())
                .flat_map(|d| d.statement)
                .flat_map(|s| s.principal.map_or_else(Vec::new, |p| p.service.0))
                .map(|s| s.0)
                .collect(),
        })
    }

    /// The statements of a policy document, every resource ARN one of the template's.
    fn statements(
        &self,
        policy: &str,
        document: PolicyDocument,
        at: &str,
    ) -> Result<Vec<PolicyStatement>, TemplateError> {
        let mut out = Vec::new();
        for (i, s) in document.statement.into_iter().enumerate() {
            for r in &s.resource.0 {
                if let ResourceRef::Arn { logical_id, .. } = r {
                    if !self.resource_types.contains_key(logical_id) {
                        let message = format!("{logical_id} names no resource of the template");
                        return Err(invalid(format!("{at}.Statement[{i}].Resource"), message));
                    }
                }
            }
            out.push(PolicyStatement {
                policy_name: policy.to_string(),
                sid: s.sid,
                effect: s.effect,
                actions: s.action.0.into_iter().map(|a| a.0).collect(),
                resources: s.resource.0,
            });
        }
        Ok(out)
    }
}

fn table(id: &str, p: TableProps, at: &str) -> Result<TableSpec, TemplateError> {
    let types: BTreeMap<&str, AttributeType> = (p.attribute_definitions.iter())
        .map(|d| (d.attribute_name.as_str(), d.attribute_type))
        .collect();
    let keys = |schema: &[KeyElement], at: String| {
        let (mut hash, mut range) = (None, None);
        for element in schema {
            let name = &element.attribute_name;
            let attr_type = types.get(name.as_str()).ok_or_else(|| {
                invalid(
                    &at,
                    format!("key attribute {name} is not in AttributeDefinitions"),
                )
            })?;
            let key = KeyAttr {
                name: name.clone(),
                attr_type: format!("{attr_type:?}"),
            };
            let slot = match element.key_type {
                KeyType::HASH => &mut hash,
                KeyType::RANGE => &mut range,
            };
            if slot.replace(key).is_some() {
                let message = format!("repeated KeyType {:?} for {name}", element.key_type);
                return Err(invalid(&at, message));
            }
        }
        Ok((hash.ok_or_else(|| invalid(&at, "no HASH key"))?, range))
    };
    let (hash_key, range_key) = keys(&p.key_schema, format!("{at}.KeySchema"))?;
    let mut gsis = Vec::new();
    for (i, index) in p.global_secondary_indexes.into_iter().enumerate() {
        let (hash_key, range_key) = keys(
            &index.key_schema,
            format!("{at}.GlobalSecondaryIndexes[{i}].KeySchema"),
        )?;
        gsis.push(GsiSpec {
            name: index.index_name,
            hash_key,
            range_key,
            projection: format!("{:?}", index.projection.projection_type),
            non_key_attributes: index.projection.non_key_attributes,
        });
    }
    let ttl_attribute = match p.time_to_live_specification {
        Some(TtlProps {
            enabled: Parsed(true),
            attribute_name,
        }) => Some(attribute_name.ok_or_else(|| {
            invalid(
                format!("{at}.TimeToLiveSpecification.AttributeName"),
                "missing",
            )
        })?),
        _ => None,
    };
    Ok(TableSpec {
        logical_id: id.to_string(),
        hash_key,
        range_key,
        gsis,
        ttl_attribute,
    })
}

fn user_pool(id: &str, p: UserPoolProps) -> UserPoolSpec {
    let defaults = PasswordPolicySpec::default();
    let policy = p.policies.and_then(|p| p.password_policy);
    let password_policy = match policy {
        None => defaults,
        Some(p) => PasswordPolicySpec {
            minimum_length: p.minimum_length.map_or(defaults.minimum_length, |m| m.0),
            require_lowercase: p
                .require_lowercase
                .map_or(defaults.require_lowercase, |b| b.0),
            require_uppercase: p
                .require_uppercase
                .map_or(defaults.require_uppercase, |b| b.0),
            require_numbers: p.require_numbers.map_or(defaults.require_numbers, |b| b.0),
            require_symbols: p.require_symbols.map_or(defaults.require_symbols, |b| b.0),
        },
    };
    UserPoolSpec {
        logical_id: id.to_string(),
        password_policy,
        admin_create_user_only: (p.admin_create_user_config)
            .and_then(|c| c.allow_admin_create_user_only)
            .is_some_and(|b| b.0),
        case_sensitive_usernames: (p.username_configuration)
            .and_then(|u| u.case_sensitive)
            .map(|b| b.0),
    }
}

fn http_api(id: &str, p: HttpApiProps, at: &str) -> Result<HttpApiSpec, TemplateError> {
    let mut spec = HttpApiSpec {
        logical_id: id.to_string(),
        default_authorizer: None,
        authorizers: BTreeMap::new(),
    };
    let Some(auth) = p.auth else {
        return Ok(spec);
    };
    for (name, authorizer) in auth.authorizers {
        let jwt = authorizer.jwt_configuration.ok_or_else(|| {
            invalid(
                format!("{at}.Auth.Authorizers.{name}"),
                "only JWT authorizers (JwtConfiguration) are served by the local runner",
            )
        })?;
        let identity_source = (authorizer.identity_source)
            .map_or_else(|| "$request.header.Authorization".to_string(), |s| s.0);
        spec.authorizers.insert(
            name,
            JwtAuthorizerSpec {
                identity_source,
                issuer: jwt.issuer,
                audience: jwt.audience,
            },
        );
    }
    if let Some(Str(default)) = auth.default_authorizer {
        if !spec.authorizers.contains_key(&default) {
            let message = format!("{default} is not one of Auth.Authorizers");
            return Err(invalid(format!("{at}.Auth.DefaultAuthorizer"), message));
        }
        spec.default_authorizer = Some(default);
    }
    Ok(spec)
}

/// The call of an intrinsic function or condition (`!Equals [..]`, `{"Fn::If": [..]}`,
/// `{Condition: X}`): its name without `!`/`Fn::`, and its argument.
fn call_of(value: &Value) -> Option<(String, &Value)> {
    match value {
        Value::Tagged(t) => Some((
            t.tag.to_string().trim_start_matches('!').to_string(),
            &t.value,
        )),
        Value::Mapping(m) if m.len() == 1 => {
            let (key, argument) = m.iter().next()?;
            let key = key.as_str()?;
            let name = key
                .strip_prefix("Fn::")
                .or((key == "Condition").then_some(key))?;
            Some((name.to_string(), argument))
        }
        _ => None,
    }
}

/// Every condition of `Conditions` (parameters already substituted), evaluated.
fn evaluate_conditions(
    conditions: &BTreeMap<String, Value>,
) -> Result<BTreeMap<String, bool>, TemplateError> {
    let mut done = BTreeMap::new();
    for name in conditions.keys() {
        condition(name, conditions, &mut done, &mut Vec::new())?;
    }
    Ok(done)
}

fn condition(
    name: &str,
    all: &BTreeMap<String, Value>,
    done: &mut BTreeMap<String, bool>,
    visiting: &mut Vec<String>,
) -> Result<bool, TemplateError> {
    if let Some(value) = done.get(name) {
        return Ok(*value);
    }
    let at = format!("Conditions.{name}");
    if visiting.iter().any(|v| v == name) {
        return Err(invalid(
            at,
            format!("refers to itself through {}", visiting.join(" -> ")),
        ));
    }
    let value = all
        .get(name)
        .ok_or_else(|| invalid(&at, format!("{name} names no condition of the template")))?;
    visiting.push(name.to_string());
    let result = condition_value(value, all, done, visiting, &at)?;
    visiting.pop();
    done.insert(name.to_string(), result);
    Ok(result)
}

fn condition_value(
    value: &Value,
    all: &BTreeMap<String, Value>,
    done: &mut BTreeMap<String, bool>,
    visiting: &mut Vec<String>,
    at: &str,
) -> Result<bool, TemplateError> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let list = |v: &Value| match v {
        Value::Sequence(items) => Ok(items.clone()),
        _ => Err(invalid(at, "expected a list of conditions")),
    };
    let Some((function, argument)) = call_of(value) else {
        return Err(invalid(
            at,
            "not a condition function (!Equals, !Not, !And, !Or, !Condition)",
        ));
    };
    match function.as_str() {
        "Equals" => match argument {
            Value::Sequence(pair) if pair.len() == 2 => {
                match (scalar(&pair[0]), scalar(&pair[1])) {
                    (Some(a), Some(b)) => Ok(a == b),
                    _ => Err(invalid(
                        at,
                        "!Equals of a value the local runner cannot know (only parameters and literals)",
                    )),
                }
            }
            _ => Err(invalid(at, "!Equals takes two values")),
        },
        "Not" => match list(argument)?.as_slice() {
            [one] => Ok(!condition_value(one, all, done, visiting, at)?),
            _ => Err(invalid(at, "!Not takes one condition")),
        },
        "And" | "Or" => {
            let mut results = Vec::new();
            for item in list(argument)? {
                results.push(condition_value(&item, all, done, visiting, at)?);
            }
            Ok(if function == "And" {
                results.iter().all(|r| *r)
            } else {
                results.iter().any(|r| *r)
            })
        }
        "Condition" => match argument.as_str() {
            Some(name) => condition(name, all, done, visiting),
            None => Err(invalid(at, "!Condition takes a condition's name")),
        },
        other => Err(invalid(at, format!("!{other} is not a condition function"))),
    }
}

/// `value` with every `!If [Condition, a, b]` replaced by the branch its condition picks.
fn decide(
    value: &mut Value,
    conditions: &BTreeMap<String, bool>,
    at: &str,
) -> Result<(), TemplateError> {
    if let Some((function, argument)) = call_of(value) {
        if function == "If" {
            let chosen = match argument {
                Value::Sequence(items) if items.len() == 3 => {
                    let name = items[0]
                        .as_str()
                        .ok_or_else(|| invalid(at, "!If takes a condition's name first"))?;
                    let holds = *conditions.get(name).ok_or_else(|| {
                        invalid(
                            at,
                            format!("!If names {name}, no condition of the template"),
                        )
                    })?;
                    items[if holds { 1 } else { 2 }].clone()
                }
                _ => {
                    return Err(invalid(
                        at,
                        "!If takes [Condition, value if true, value if false]",
                    ));
                }
            };
            *value = chosen;
            return decide(value, conditions, at);
        }
    }
    match value {
        Value::Sequence(items) => {
            for item in items {
                decide(item, conditions, at)?;
            }
        }
        Value::Mapping(m) => {
            for (key, item) in m.iter_mut() {
                let at = format!("{at}.{}", key.as_str().unwrap_or("?"));
                decide(item, conditions, &at)?;
            }
        }
        Value::Tagged(t) => decide(&mut t.value, conditions, at)?,
        _ => {}
    }
    Ok(())
}

fn simple_table(id: &str, p: SimpleTableProps) -> TableSpec {
    let (name, attr_type) = match p.primary_key {
        None => ("id".to_string(), "S"),
        Some(PrimaryKey { name, key_type }) => match key_type {
            SimpleKeyType::String => (name, "S"),
            SimpleKeyType::Number => (name, "N"),
            SimpleKeyType::Binary => (name, "B"),
        },
    };
    TableSpec {
        logical_id: id.to_string(),
        hash_key: KeyAttr {
            name,
            attr_type: attr_type.to_string(),
        },
        range_key: None,
        gsis: Vec::new(),
        ttl_attribute: None,
    }
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
        if target == "AWS::Region" {
            if let Some(region) = &self.names.region {
                return Ok(region.clone());
            }
        }
        if target.starts_with("AWS::") {
            return Err(format!("pseudo parameter {target} has no local value"));
        }
        if let Some(pool) = self.names.user_pools.get(target) {
            return Ok(pool.clone());
        }
        if let Some(client) = self.names.user_pool_clients.get(target) {
            return Ok(client.clone());
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
                "StockMovementsTable",
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
        let created = KeyAttr {
            name: "createdAtMs".into(),
            attr_type: "N".into(),
        };
        assert_eq!(
            orders.gsis,
            vec![
                GsiSpec {
                    name: "CustomerOrdersIndex".into(),
                    hash_key: s("customerId"),
                    range_key: Some(created.clone()),
                    projection: "ALL".into(),
                    non_key_attributes: vec![],
                },
                GsiSpec {
                    name: "PendingOrdersIndex".into(),
                    hash_key: s("pendingSweep"),
                    range_key: Some(created),
                    projection: "KEYS_ONLY".into(),
                    non_key_attributes: vec![],
                }
            ]
        );
        assert_eq!(orders.key_attributes().len(), 4);
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
        let mut routes: Vec<(String, RouteAuth)> = (api.http_routes.iter())
            .map(|r| (r.route_key(), r.auth.clone()))
            .collect();
        routes.sort();
        let expected: Vec<(String, RouteAuth)> = [
            ("GET /orders", RouteAuth::ApiDefault),
            ("GET /orders/{orderId}", RouteAuth::ApiDefault),
            ("GET /products/{productId}", RouteAuth::Public),
            ("POST /orders", RouteAuth::ApiDefault),
            ("POST /orders/{orderId}/cancel", RouteAuth::ApiDefault),
            (
                "POST /products/{productId}/stock-adjustments",
                RouteAuth::ApiDefault,
            ),
            ("PUT /products/{productId}", RouteAuth::ApiDefault),
        ]
        .iter()
        .map(|(key, auth)| (key.to_string(), auth.clone()))
        .collect();
        assert_eq!(routes, expected);
        assert!(
            api.http_routes
                .iter()
                .all(|r| r.api.as_deref() == Some("HttpApi"))
        );
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
        assert_eq!(api["STOCK_MOVEMENTS_TABLE"], table("StockMovementsTable"));
        assert_eq!(api["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(api["STOCK_QUEUE_URL"], url("StockQueue"));
        assert_eq!(api["PAYMENT_QUEUE_URL"], url("PaymentQueue"));
        assert_eq!(api["RUST_LOG"], "info");
        assert_eq!(api["ORDERS_CUSTOMER_INDEX"], "CustomerOrdersIndex");
        assert_eq!(api["GROUPS_CLAIM"], "cognito:groups");
        assert_eq!(api["OPERATORS_GROUP"], "operators");
        assert_eq!(api.len(), 10);

        let stock = env("StockFunction");
        assert_eq!(stock["PRODUCTS_TABLE"], table("ProductsTable"));
        assert_eq!(stock["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(stock["COORDINATOR_QUEUE_URL"], url("CoordinatorQueue"));
        assert_eq!(stock.len(), 4);

        let payment = env("PaymentFunction");
        assert_eq!(payment["IDEMPOTENCY_TABLE"], table("IdempotencyTable"));
        assert_eq!(payment["PAYMENT_LEDGER_TABLE"], table("PaymentLedgerTable"));
        assert_eq!(payment["COORDINATOR_QUEUE_URL"], url("CoordinatorQueue"));
        assert_eq!(payment["PAYMENT_FAILURE_RATE"], "0");
        assert_eq!(payment.len(), 5);
        // A `!Ref` to a parameter reads as the parameter's value (its default: no random
        // declines in a deployed stack).
        assert_eq!(
            t.function("PaymentFunction").unwrap().environment["PAYMENT_FAILURE_RATE"],
            EnvValue::Literal("0".into())
        );

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
        assert!(
            orders
                .gsis
                .iter()
                .any(|g| g.name == sweeper["ORDERS_PENDING_INDEX"])
        );
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
            ("PaymentFailureRate".to_string(), "0.25".to_string()),
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
        assert_eq!(payment["PAYMENT_FAILURE_RATE"], "0.25");
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
        Everything:
          Type: HttpApi
        Get:
          Type: Api
          Properties: {Method: get, Path: /x}
  Simple:
    Type: AWS::Serverless::SimpleTable
  SimpleNumbered:
    Type: AWS::Serverless::SimpleTable
    Properties:
      PrimaryKey: {Name: n, Type: Number}
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
        let routes: Vec<String> = f.http_routes.iter().map(HttpRouteSpec::route_key).collect();
        assert_eq!(routes, ["$default", "GET /x"]);
        for (id, name, attr_type) in [("Simple", "id", "S"), ("SimpleNumbered", "n", "N")] {
            let key = &t.table(id).unwrap().hash_key;
            assert_eq!(
                (key.name.as_str(), key.attr_type.as_str()),
                (name, attr_type)
            );
        }

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
        let err = Template::from_str(&text).unwrap_err().to_string();
        assert!(err.contains("ReportBatchItemFailure"), "{err}");
        let at = "Resources.Fn.Properties.Events.Q.Properties.FunctionResponseTypes";
        assert!(err.contains(at), "{err}");
    }

    #[test]
    fn when_a_redrive_names_an_unknown_queue_should_refuse_the_template() {
        let text = SMALL.replace("[Dlq, Arn]", "[Elsewhere, Arn]");
        let err = Template::from_str(&text).unwrap_err().to_string();
        assert!(err.contains("Elsewhere"), "{err}");
        let at = "Resources.Work.Properties.RedrivePolicy.deadLetterTargetArn";
        assert!(err.contains(at), "{err}");
    }

    /// Conditions, `!If`, conditional resources, Cognito resources and an HTTP API's JWT
    /// authorizer with a public route.
    const WITH_CONDITIONS: &str = r#"
Parameters:
  Issuer: {Type: String, Default: ""}
Conditions:
  OwnPool: !Equals [!Ref Issuer, ""]
  External: !Not [!Condition OwnPool]
  Both: !And [!Condition OwnPool, {"Fn::Equals": ["x", "x"]}]
  Either: {"Fn::Or": [!Condition External, !Equals ["a", "b"]]}
Resources:
  Pool:
    Type: AWS::Cognito::UserPool
    Condition: OwnPool
    Properties:
      Policies: {PasswordPolicy: {MinimumLength: 14, RequireSymbols: false}}
      AdminCreateUserConfig: {AllowAdminCreateUserOnly: true}
  Client:
    Type: AWS::Cognito::UserPoolClient
    Condition: OwnPool
    Properties:
      UserPoolId: !Ref Pool
      ClientName: web
      ExplicitAuthFlows: [ALLOW_USER_PASSWORD_AUTH]
  Admins:
    Type: AWS::Cognito::UserPoolGroup
    Condition: OwnPool
    Properties: {UserPoolId: !Ref Pool, GroupName: admins}
  Api:
    Type: AWS::Serverless::HttpApi
    Properties:
      Auth:
        DefaultAuthorizer: Jwt
        Authorizers:
          Jwt:
            JwtConfiguration:
              issuer: !If [OwnPool, !Sub "https://cognito-idp.${AWS::Region}.amazonaws.com/${Pool}", !Ref Issuer]
              audience: [!If [OwnPool, !Ref Client, web-app]]
  Fn:
    Type: AWS::Serverless::Function
    Metadata: {BuildProperties: {Binary: fn-bin}}
    Properties:
      Environment:
        Variables:
          MODE: !If [OwnPool, own, external]
          LONG: {"Fn::If": [Either, yes, no]}
      Events:
        Private: {Type: HttpApi, Properties: {ApiId: !Ref Api, Method: POST, Path: /things}}
        Public:
          Type: HttpApi
          Properties: {ApiId: !Ref Api, Method: GET, Path: /things, Auth: {Authorizer: NONE}}
"#;

    #[test]
    fn when_conditions_decide_should_create_only_their_resources_and_pick_their_branches() {
        let t = Template::from_str(WITH_CONDITIONS).unwrap();
        let expected = [
            ("Both", true),
            ("Either", false),
            ("External", false),
            ("OwnPool", true),
        ];
        let expected = expected.map(|(k, v)| (k.to_string(), v)).into();
        assert_eq!(t.conditions, expected);
        assert_eq!(t.user_pools.len(), 1);
        let policy = &t.user_pools[0].password_policy;
        assert_eq!((policy.minimum_length, policy.require_symbols), (14, false));
        assert!(t.user_pools[0].admin_create_user_only);
        assert_eq!(t.user_pool_clients[0].user_pool, "Pool");
        assert_eq!(t.user_pool_clients[0].client_name.as_deref(), Some("web"));
        assert_eq!(t.user_pool_groups[0].group_name, "admins");
        let f = t.function("Fn").unwrap();
        assert_eq!(f.environment["MODE"], EnvValue::Literal("own".into()));
        assert_eq!(f.environment["LONG"], EnvValue::Literal("no".into()));

        let (private, public) = (&f.http_routes[0], &f.http_routes[1]);
        assert_eq!(t.route_authorizer(public).unwrap(), None);
        let jwt = t.route_authorizer(private).unwrap().unwrap();
        assert_eq!(jwt.identity_source, "$request.header.Authorization");
        let mut names = LocalNames {
            region: Some("eu-west-1".into()),
            ..LocalNames::default()
        };
        names
            .user_pools
            .insert("Pool".into(), "eu-west-1_abc".into());
        names
            .user_pool_clients
            .insert("Client".into(), "client-1".into());
        assert_eq!(
            t.resolve_authorizer(jwt, &names).unwrap(),
            (
                "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_abc".to_string(),
                vec!["client-1".to_string()]
            )
        );

        // Another issuer: no pool, client or group, and the other branches.
        let overrides = [("Issuer".to_string(), "https://id.example.com/".to_string())];
        let t = t.with_parameter_overrides(overrides.into()).unwrap();
        assert!(t.user_pools.is_empty() && t.user_pool_clients.is_empty());
        assert!(t.user_pool_groups.is_empty() && !t.resource_types.contains_key("Pool"));
        let f = t.function("Fn").unwrap();
        assert_eq!(f.environment["MODE"], EnvValue::Literal("external".into()));
        assert_eq!(f.environment["LONG"], EnvValue::Literal("yes".into()));
        let jwt = t.route_authorizer(&f.http_routes[0]).unwrap().unwrap();
        assert_eq!(
            t.resolve_authorizer(jwt, &LocalNames::default()).unwrap(),
            (
                "https://id.example.com/".to_string(),
                vec!["web-app".to_string()]
            )
        );
    }

    #[test]
    fn when_a_condition_cannot_be_decided_should_refuse_the_template_naming_it() {
        for (find, replace, says) in [
            (
                "OwnPool: !Equals [!Ref Issuer, \"\"]",
                "OwnPool: !Condition Both",
                "refers to itself",
            ),
            (
                "!If [OwnPool, own, external]",
                "!If [Nowhere, own, external]",
                "Nowhere",
            ),
            (
                "    Condition: OwnPool\n    Properties:\n      Policies",
                "    Condition: Elsewhere\n    Properties:\n      Policies",
                "Elsewhere names no condition",
            ),
            (
                "OwnPool: !Equals [!Ref Issuer, \"\"]",
                "OwnPool: !Equals [!Ref AWS::Region, \"\"]",
                "cannot know",
            ),
            (
                "DefaultAuthorizer: Jwt",
                "DefaultAuthorizer: Other",
                "Other is not one of Auth.Authorizers",
            ),
        ] {
            assert!(WITH_CONDITIONS.contains(find), "{find}");
            let err = Template::from_str(&WITH_CONDITIONS.replace(find, replace))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{replace}: {err}");
        }
    }

    /// Each break of SMALL (find, replace), the path its error names (`Events.` stands for
    /// the function's), and what the error says.
    #[rustfmt::skip]
    const BREAKS: &[(&str, &str, &str, &str)] = &[
        ("VisibilityTimeout: \"45\"", "VisibilityTimeout: soon", "Resources.Work.Properties.VisibilityTimeout", "\"soon\" is not a valid i32"),
        ("VisibilityTimeout: \"45\"", "VisibilityTimeout: {a: 1}", "Resources.Work.Properties.VisibilityTimeout", "not a value"),
        ("maxReceiveCount: 3", "maxReceiveCount: many", "Resources.Work.Properties.RedrivePolicy.maxReceiveCount", "not a valid i32"),
        ("      RedrivePolicy:\n", "      RedrivePolicy: '{}'\n      Was:\n", "Resources.Work.Properties.RedrivePolicy", "the mapping form"),
        ("    Timeout: 7", "    Timeout: [7]", "Globals.Function.Timeout", "a list of 1 is not a literal"),
        ("AttributeType: N", "AttributeType: X", "Resources.Table.Properties.AttributeDefinitions[1].AttributeType", "unknown variant `X`"),
        ("KeyType: RANGE", "KeyType: HASH", "Resources.Table.Properties.KeySchema", "repeated KeyType HASH for sk"),
        ("{AttributeName: sk, KeyType: RANGE}", "{AttributeName: zz, KeyType: RANGE}", "Resources.Table.Properties.KeySchema", "zz is not in AttributeDefinitions"),
        ("{AttributeName: ttl, Enabled: false}", "{Enabled: true}", "Resources.Table.Properties.TimeToLiveSpecification.AttributeName", "missing"),
        ("      TimeToLiveSpecification:", "      LocalSecondaryIndexes: []\n      TimeToLiveSpecification:", "Resources.Table.Properties.LocalSecondaryIndexes", "not supported"),
        ("  Dlq:\n    Type: AWS::SQS::Queue", "  Dlq:\n    Typ: AWS::SQS::Queue", "Resources.Dlq", "missing field `Type`"),
        ("Binary: fn-bin", "Bin: fn-bin", "Resources.Fn.Metadata.BuildProperties.Binary", "missing"),
        ("MemorySize: 256", "MemorySize: !GetAtt Work.Arn", "Resources.Fn.Properties.MemorySize", "!GetAtt Work.Arn is not a literal"),
        ("NUMBER: 5", "NUMBER: [5]", "Resources.Fn.Properties.Environment.Variables.NUMBER", "a list is not a value"),
        ("[Work, QueueUrl]", "[Work]", "Resources.Fn.Properties.Environment.Variables.LONG_ATT", "[Resource, Attribute]"),
        ("Queue: !GetAtt Work.Arn", "Queue: !GetAtt Table.Arn", "Events.Q.Properties.Queue", "Table is not an AWS::SQS::Queue"),
        ("Queue: !GetAtt Work.Arn", "Queue: !GetAtt Work.QueueUrl", "Events.Q.Properties.Queue", "is not !GetAtt X.Arn"),
        ("Queue: !GetAtt Work.Arn", "Queue: !GetAtt Work.Arn\n            BatchSize: 0", "Events.Q.Properties.BatchSize", "0 is outside 1..=10000"),
        ("MaximumBatchingWindowInSeconds: !Ref Window", "MaximumBatchingWindowInSeconds: 301", "Events.Q.Properties.MaximumBatchingWindowInSeconds", "301 is outside 0..=300"),
        ("MaximumBatchingWindowInSeconds: !Ref Window", "MaximumBatchingWindowInSeconds: !Ref Rate", "Events.Q.Properties.MaximumBatchingWindowInSeconds", "\"rate(5 minutes)\" is not a valid u32"),
        ("Queue: !GetAtt Work.Arn", "Queue: !GetAtt Work.Arn\n            ScalingConfig: {MaximumConcurrency: 1}", "Events.Q.Properties.ScalingConfig.MaximumConcurrency", "1 is outside 2..=1000"),
        ("State: DISABLED", "State: OFF", "Events.Tick.Properties.State", "unknown variant `OFF`"),
        ("Schedule: !Ref Rate", "Schedule: rate(5 fortnights)", "Events.Poll.Properties.Schedule", "unknown unit \"fortnights\""),
        ("ScheduleExpression: cron(0 12 * * ? *)", "Expression: cron(0 12 * * ? *)", "Events.Tick.Properties.ScheduleExpression", "missing"),
        ("{Method: get, Path: /x}", "{Method: get}", "Events.Get.Properties", "needs both Method and Path"),
    ];

    #[test]
    fn when_a_property_does_not_fit_should_name_its_path() {
        let cases = BREAKS.iter().copied();
        for (find, replace, at, message) in cases {
            assert!(SMALL.contains(find), "SMALL no longer contains {find:?}");
            let err = Template::from_str(&SMALL.replacen(find, replace, 1))
                .map(|_| "no error".to_string())
                .unwrap_or_else(|e| e.to_string());
            let at = match at.strip_prefix("Events.") {
                Some(event) => format!("Resources.Fn.Properties.Events.{event}"),
                None => at.to_string(),
            };
            assert!(
                err.contains(&format!("template {at}: ")),
                "{replace}: {err}"
            );
            assert!(err.contains(message), "{replace}: {err}");
        }
        assert!(matches!(
            Template::from_str("Resources: ["),
            Err(TemplateError::Yaml(_))
        ));
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
          - Effect: Allow
            Principal: {Service: [lambda.amazonaws.com, edgelambda.amazonaws.com]}
            Action: sts:AssumeRole
      ManagedPolicyArns:
        - arn:aws:iam::aws:policy/ReadOnlyAccess
      Policies:
        - PolicyName: inline
          PolicyDocument:
            Statement:
              - Effect: Deny
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
