//! The whole saga on 127.0.0.1, started from `template.yaml`: tables and queues are created
//! from it, each function gets the environment it declares (resolved to the local names),
//! SQS functions get event source mappings with its batch sizes, windows, concurrency and
//! visibility timeouts, the sweeper runs on its schedule, and the order API is served over
//! HTTP. The handlers are the very ones the Lambda binaries run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aws_smithy_runtime_api::client::interceptors::SharedInterceptor;
use futures::FutureExt;
use saga_core::aws::AwsClients;
use saga_core::config::{
    ConfigError, CoordinatorConfig, Lookup, OrderApiConfig, PaymentConfig, StockConfig,
    SweeperConfig,
};
use saga_core::faults::Faults;
use saga_core::handlers::batch::SqsHandler;
use saga_core::handlers::{
    api::ApiHandler, coordinator::CoordinatorHandler, payment::PaymentHandler, stock::StockHandler,
    sweeper::SweeperHandler,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access::AccessRecorder;
use crate::authorizer::{JwtAuthorizer, local_jwks_url};
use crate::cognito::SignIn;
use crate::counting::CallCounter;
use crate::esm::{self, Mapping, SqsFunction};
use crate::http::{self, HttpFunction, RouteSpec};
use crate::pacing::FunctionTimeout;
use crate::provision;
use crate::template::{FunctionSpec, HttpRouteSpec, LocalNames, Template};
use crate::timing::{Probe, ProbeInterceptor};

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("template: {0}")]
    Template(#[from] crate::template::TemplateError),
    #[error("provisioning: {0}")]
    Provision(#[from] provision::ProvisionError),
    #[error("provisioning the user pools: {0}")]
    Cognito(#[from] crate::cognito::CognitoError),
    #[error("the HTTP API's authorizer: {0}")]
    Authorizer(String),
    #[error("function {function}: {source}")]
    Config {
        function: String,
        source: ConfigError,
    },
    #[error("function {0} in the template has a binary the runner does not know")]
    UnknownFunction(String),
    #[error("cannot serve the HTTP API on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// How to run the stack. [`StackOptions::new`] gives what `make run` uses.
#[derive(Clone, Debug)]
pub struct StackOptions {
    pub template_path: PathBuf,
    /// Prepended to every table and queue name (tests use a unique one each).
    pub prefix: String,
    pub http_addr: SocketAddr,
    pub dynamodb_endpoint: String,
    pub sqs_endpoint: String,
    pub region: String,
    /// Environment variables set for every function on top of the template's
    /// (e.g. `PAYMENT_FAILURE_RATE`, `ORDER_TIMEOUT_SECONDS`).
    pub env_overrides: BTreeMap<String, String>,
    pub faults: Faults,
    /// Share of processed messages the event source mappings deliver a second time.
    pub duplicate_rate: f64,
    /// Shortens every queue's visibility timeout (tests use a short one so that retries are
    /// fast). It is a floor: each receive asks for enough to cover the batching window and the
    /// function timeout in force, and never more than the queue's own setting.
    pub visibility_timeout: Option<i32>,
    /// Shortens every function's timeout. It is a floor too: the timeout in force follows the
    /// function's recent invocation durations ([`crate::pacing::FunctionTimeout`]), up to the
    /// template's `Timeout`. Without it every function has the template's timeout, fixed, as
    /// on Lambda (a `visibility_timeout` alone only lowers the visibility floor).
    pub function_timeout: Option<Duration>,
    /// Long-poll wait of the event source mappings.
    pub poll_wait_seconds: i32,
    /// Overrides the sweeper's schedule; `Some(Duration::ZERO)` turns the schedule off.
    pub sweep_every: Option<Duration>,
    /// Functions (logical ids) whose event source mappings start paused.
    pub paused: Vec<String>,
    /// Records every AWS call the stack makes (the budget benchmark).
    pub call_counter: Option<CallCounter>,
    /// Records what each function does with AWS, by function (the least-privilege test).
    pub access_recorder: Option<AccessRecorder>,
    /// Records where the time goes: queue waits, invocations, each function's AWS calls and
    /// when orders reach their final state (the load benchmark).
    pub probe: Option<Probe>,
    /// Overrides every SQS event source's `MaximumBatchingWindowInSeconds` (the load
    /// benchmark compares settings); `None` keeps the template's.
    pub batching_window: Option<Duration>,
    /// Whether batches gather until their window ends, as Lambda's do (the load benchmark);
    /// by default a batch is handed over at the first empty receive (see `esm::receive`).
    pub fill_batching_window: bool,
}

impl StackOptions {
    pub fn new(repo_root: impl Into<PathBuf>) -> Self {
        let root = repo_root.into();
        Self {
            template_path: root.join("template.yaml"),
            prefix: String::new(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
            dynamodb_endpoint: "http://127.0.0.1:8000".into(),
            sqs_endpoint: "http://127.0.0.1:9324".into(),
            region: "us-east-1".into(),
            env_overrides: BTreeMap::new(),
            faults: Faults::none(),
            duplicate_rate: 0.0,
            visibility_timeout: None,
            function_timeout: None,
            poll_wait_seconds: 20,
            sweep_every: None,
            paused: Vec::new(),
            call_counter: None,
            access_recorder: None,
            probe: None,
            batching_window: None,
            fill_batching_window: false,
        }
    }
}

/// SDK clients for the local endpoints, with static dummy credentials (never a real account).
pub async fn local_clients(
    dynamodb_endpoint: &str,
    sqs_endpoint: &str,
    region: &str,
) -> AwsClients {
    local_clients_counted(dynamodb_endpoint, sqs_endpoint, region, None).await
}

/// [`local_clients`], recording every call in `counter` when one is given.
pub async fn local_clients_counted(
    dynamodb_endpoint: &str,
    sqs_endpoint: &str,
    region: &str,
    counter: Option<CallCounter>,
) -> AwsClients {
    LocalEndpoints::new(dynamodb_endpoint, sqs_endpoint, region).clients(counter, None, None)
}

/// A cognito-idp client of the local stand-in at `endpoint` (moto), with dummy credentials.
pub fn local_cognito(endpoint: &str, region: &str) -> aws_sdk_cognitoidentityprovider::Client {
    LocalEndpoints::new("http://127.0.0.1:8000", endpoint, region).cognito()
}

/// What every client of a stack shares: one SDK configuration (one HTTP client, the region,
/// static dummy credentials) and the two endpoints. Clients built from it are cheap.
#[derive(Clone, Debug)]
struct LocalEndpoints {
    config: aws_config::SdkConfig,
    dynamodb: String,
    sqs: String,
}

impl LocalEndpoints {
    fn new(dynamodb_endpoint: &str, sqs_endpoint: &str, region: &str) -> Self {
        let credentials = aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_sdk_dynamodb::config::Credentials::new("local", "local", None, None, "saga-local"),
        );
        Self {
            config: AwsClients::sdk_config(region.to_string(), credentials),
            dynamodb: dynamodb_endpoint.to_string(),
            sqs: sqs_endpoint.to_string(),
        }
    }

    /// A cognito-idp client of the local stand-in (moto, on the SQS endpoint).
    fn cognito(&self) -> aws_sdk_cognitoidentityprovider::Client {
        let config = aws_sdk_cognitoidentityprovider::config::Builder::from(&self.config)
            .endpoint_url(&self.sqs)
            .build();
        aws_sdk_cognitoidentityprovider::Client::from_conf(config)
    }

    /// Clients that count every call in `counter`, record a function's accesses with
    /// `access` and time its calls with `probe`, when given.
    fn clients(
        &self,
        counter: Option<CallCounter>,
        access: Option<crate::access::Interceptor>,
        probe: Option<ProbeInterceptor>,
    ) -> AwsClients {
        let mut interceptors = Vec::new();
        interceptors.extend(counter.map(SharedInterceptor::new));
        interceptors.extend(access.map(SharedInterceptor::new));
        interceptors.extend(probe.map(SharedInterceptor::new));
        AwsClients::build(
            &self.config,
            Some(self.dynamodb.clone()),
            Some(self.sqs.clone()),
            &interceptors,
        )
    }
}

/// The configuration a function's binary loads at cold start, by the binary's name: what its
/// handler's `Function::from_env` loads in Lambda (`saga_core::lambda`), and what the runner
/// builds the same handler from with `new`.
#[derive(Clone, Debug)]
pub enum FunctionConfig {
    OrderApi(OrderApiConfig),
    Stock(StockConfig),
    Payment(PaymentConfig),
    Coordinator(CoordinatorConfig),
    Sweeper(SweeperConfig),
}

impl FunctionConfig {
    /// Loads the configuration of `binary` from `env`; `Ok(None)` for a binary the runner
    /// does not know.
    pub fn load(binary: &str, env: &impl Lookup) -> Result<Option<Self>, ConfigError> {
        Ok(Some(match binary {
            "order-api" => Self::OrderApi(OrderApiConfig::load(env)?),
            "stock" => Self::Stock(StockConfig::load(env)?),
            "payment" => Self::Payment(PaymentConfig::load(env)?),
            "coordinator" => Self::Coordinator(CoordinatorConfig::load(env)?),
            "sweeper" => Self::Sweeper(SweeperConfig::load(env)?),
            _ => return Ok(None),
        }))
    }
}

/// An SQS function's handler, as the event source mappings call it.
fn sqs_function<H: SqsHandler + 'static>(handler: H) -> SqsFunction {
    let handler = Arc::new(handler);
    Arc::new(move |event| {
        let handler = handler.clone();
        async move { Ok(handler.handle(event).await?) }.boxed()
    })
}

/// A running stack.
pub struct Stack {
    pub template: Template,
    pub names: LocalNames,
    /// Clients for the stack's own work (provisioning) and for tests; no function's.
    pub clients: AwsClients,
    /// The cognito-idp client of the local user pools (moto).
    pub cognito: aws_sdk_cognitoidentityprovider::Client,
    /// Each function's clients, by logical id: its handler and its event source mappings
    /// call AWS through them (as on AWS, where both act with the function's role).
    pub function_clients: BTreeMap<String, AwsClients>,
    pub http_addr: SocketAddr,
    /// Each function's resolved environment, by logical id.
    pub environments: BTreeMap<String, BTreeMap<String, String>>,
    sweeper: Option<Arc<SweeperHandler>>,
    pause: BTreeMap<String, watch::Sender<bool>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Result<Stack, StackError> {
        let template = Template::from_file(&opts.template_path)?;
        let endpoints =
            LocalEndpoints::new(&opts.dynamodb_endpoint, &opts.sqs_endpoint, &opts.region);
        let clients = endpoints.clients(opts.call_counter.clone(), None, None);
        let cognito = endpoints.cognito();
        let mut names =
            provision::provision(&template, &opts.prefix, &clients.dynamodb, &clients.sqs).await?;
        names.region = Some(opts.region.clone());
        crate::cognito::provision(&template, &opts.prefix, &cognito, &mut names).await?;
        let function_clients = template
            .functions
            .iter()
            .map(|f| {
                let access = opts
                    .access_recorder
                    .as_ref()
                    .map(|r| r.interceptor(&f.logical_id, &names));
                let probe = opts.probe.as_ref().map(|p| p.interceptor(&f.logical_id));
                let clients = endpoints.clients(opts.call_counter.clone(), access, probe);
                (f.logical_id.clone(), clients)
            })
            .collect();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut stack = Stack {
            template: template.clone(),
            names,
            clients,
            cognito,
            function_clients,
            http_addr: opts.http_addr,
            environments: BTreeMap::new(),
            sweeper: None,
            pause: BTreeMap::new(),
            shutdown,
            tasks: Vec::new(),
        };
        for function in &template.functions {
            let mut env = function.resolve_environment(&stack.names, &template)?;
            env.extend(opts.env_overrides.clone());
            stack
                .environments
                .insert(function.logical_id.clone(), env.clone());
            stack
                .start_function(function, env, &opts, shutdown_rx.clone())
                .await?;
        }
        tracing::info!(
            http = %stack.http_addr,
            prefix = %opts.prefix,
            tables = ?stack.names.tables,
            queues = ?stack.names.queue_urls,
            "local stack running"
        );
        Ok(stack)
    }

    async fn start_function(
        &mut self,
        function: &FunctionSpec,
        env: BTreeMap<String, String>,
        opts: &StackOptions,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), StackError> {
        let lookup = move |name: &str| env.get(name).cloned();
        let id = function.logical_id.clone();
        let config_error = |source| StackError::Config {
            function: id.clone(),
            source,
        };
        let template_timeout = Duration::from_secs(function.timeout_seconds.into());
        let timeout = Arc::new(match opts.function_timeout {
            Some(floor) => FunctionTimeout::scaled(floor, template_timeout),
            None => FunctionTimeout::fixed(template_timeout),
        });
        let clients = self.function_clients[&function.logical_id].clone();
        let clients = &clients;
        let config = FunctionConfig::load(&function.binary, &lookup)
            .map_err(config_error)?
            .ok_or_else(|| StackError::UnknownFunction(function.logical_id.clone()))?;
        let sqs_function: Option<SqsFunction> = match config {
            FunctionConfig::OrderApi(config) => {
                let handler = Arc::new(ApiHandler::new(clients, config, opts.faults.clone()));
                let probe = opts.probe.clone();
                let name = function.logical_id.clone();
                let f: HttpFunction = Arc::new(move |req| {
                    let handler = handler.clone();
                    let (probe, name) = (probe.clone(), name.clone());
                    async move {
                        let started = std::time::Instant::now();
                        let response = handler.handle(req).await;
                        if let Some(p) = probe {
                            p.invoked(&name, 1, started.elapsed());
                        }
                        response
                    }
                    .boxed()
                });
                let mut routes = Vec::new();
                for route in &function.http_routes {
                    routes.push(RouteSpec {
                        method: route.method.clone(),
                        path: route.path.clone(),
                        authorizer: self.authorizer(route, opts).await?,
                    });
                }
                let (addr, task) =
                    http::serve(opts.http_addr, routes, f, timeout.clone(), shutdown.clone())
                        .await
                        .map_err(|source| StackError::Bind {
                            addr: opts.http_addr,
                            source,
                        })?;
                self.http_addr = addr;
                self.tasks.push(task);
                None
            }
            FunctionConfig::Stock(config) => Some(sqs_function(StockHandler::new(
                clients,
                config,
                opts.faults.clone(),
            ))),
            FunctionConfig::Payment(config) => Some(sqs_function(PaymentHandler::new(
                clients,
                config,
                opts.faults.clone(),
            ))),
            FunctionConfig::Coordinator(config) => Some(sqs_function(CoordinatorHandler::new(
                clients,
                config,
                opts.faults.clone(),
            ))),
            FunctionConfig::Sweeper(config) => {
                let h = Arc::new(SweeperHandler::new(clients, config));
                self.sweeper = Some(h.clone());
                let every = opts.sweep_every.or_else(|| {
                    function
                        .schedules
                        .iter()
                        .find(|s| s.enabled)
                        .and_then(|s| s.every)
                });
                if let Some(every) = every.filter(|d| !d.is_zero()) {
                    let mut stop = shutdown.clone();
                    self.tasks.push(tokio::spawn(async move {
                        let mut tick = tokio::time::interval(every);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        loop {
                            tokio::select! {
                                _ = tick.tick() => {
                                    if let Err(e) = h.sweep().await {
                                        tracing::error!(error = %e, "sweep failed; the next run tries again");
                                    }
                                }
                                _ = stop.changed() => return,
                            }
                        }
                    }));
                }
                None
            }
        };
        if let Some(f) = sqs_function {
            let (pause_tx, pause_rx) = watch::channel(opts.paused.contains(&function.logical_id));
            self.pause.insert(function.logical_id.clone(), pause_tx);
            for event in function.sqs_events.iter().filter(|e| e.enabled) {
                let queue = self.template.queue(&event.queue);
                // SQS's default when the template sets none.
                let queue_visibility = queue.and_then(|q| q.visibility_timeout).unwrap_or(30);
                let mapping = Mapping {
                    function: function.logical_id.clone(),
                    queue_url: self
                        .names
                        .queue_urls
                        .get(&event.queue)
                        .cloned()
                        .unwrap_or_default(),
                    queue_arn: self
                        .names
                        .queue_arns
                        .get(&event.queue)
                        .cloned()
                        .unwrap_or_default(),
                    batch_size: event.batch_size.clamp(1, 10) as i32,
                    batching_window: opts
                        .batching_window
                        .unwrap_or(Duration::from_secs(event.batching_window_seconds.into())),
                    fill_window: opts.fill_batching_window,
                    visibility_floor: opts.visibility_timeout.unwrap_or(queue_visibility),
                    visibility_ceiling: queue_visibility,
                    concurrency: event.maximum_concurrency.unwrap_or(2) as usize,
                    function_timeout: timeout.clone(),
                    duplicate_rate: opts.duplicate_rate,
                    wait_seconds: opts.poll_wait_seconds,
                    region: opts.region.clone(),
                    probe: opts.probe.clone(),
                };
                self.tasks.extend(esm::spawn(
                    mapping,
                    clients.sqs.clone(),
                    f.clone(),
                    pause_rx.clone(),
                    shutdown.clone(),
                ));
            }
        }
        Ok(())
    }

    /// The authorizer of a route, as API Gateway would run it: its issuer and audiences
    /// resolved to the local pool and client, its keys fetched from the pool's JWKS in moto.
    async fn authorizer(
        &self,
        route: &HttpRouteSpec,
        opts: &StackOptions,
    ) -> Result<Option<Arc<JwtAuthorizer>>, StackError> {
        let error = |e: String| StackError::Authorizer(format!("route {}: {e}", route.route_key()));
        let Some(spec) = self
            .template
            .route_authorizer(route)
            .map_err(|e| error(e.to_string()))?
        else {
            return Ok(None);
        };
        let (issuer, audiences) = self
            .template
            .resolve_authorizer(spec, &self.names)
            .map_err(error)?;
        let pools: Vec<&str> = self.names.user_pools.values().map(String::as_str).collect();
        let url = local_jwks_url(&issuer, &pools, &opts.sqs_endpoint)
            .map_err(|e| error(e.to_string()))?;
        let authorizer = JwtAuthorizer::fetch(issuer, audiences, &spec.identity_source, &url)
            .await
            .map_err(|e| error(e.to_string()))?;
        Ok(Some(Arc::new(authorizer)))
    }

    /// Where the template's users sign in locally (its one user pool and app client).
    pub fn sign_in(&self) -> Result<SignIn, String> {
        SignIn::of_template(&self.template, &self.names, self.cognito.clone())
    }

    /// Pauses or resumes a function's event source mappings (a consumer held back).
    pub fn set_paused(&self, function: &str, paused: bool) {
        if let Some(tx) = self.pause.get(function) {
            let _ = tx.send(paused);
        }
    }

    /// Runs the sweeper once, now.
    pub async fn sweep_now(&self) -> Option<serde_json::Value> {
        match &self.sweeper {
            Some(s) => match s.sweep().await {
                Ok(summary) => Some(summary),
                Err(e) => {
                    tracing::error!(error = %e, "sweep failed");
                    None
                }
            },
            None => None,
        }
    }

    pub fn table(&self, logical_id: &str) -> &str {
        self.names
            .tables
            .get(logical_id)
            .map(String::as_str)
            .unwrap_or_default()
    }

    pub fn queue_url(&self, logical_id: &str) -> &str {
        self.names
            .queue_urls
            .get(logical_id)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Stops every poller, the schedule and the HTTP server, and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(25), task).await;
        }
    }
}
