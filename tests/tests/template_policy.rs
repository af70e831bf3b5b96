//! Checks of `template.yaml` that cfn-lint and `sam validate --lint` do not make, on the
//! runner's typed reading of it (`local_runner::template`):
//!
//! - every SQS event source reports batch item failures (`FunctionResponseTypes`);
//! - every work queue has a dead-letter queue after at least 5 receives, the DLQ keeps a
//!   message at least as long as its source, and an alarm watches the DLQ;
//! - every queue's visibility timeout is at least 6 x its consumer's timeout (+ the batching
//!   window);
//! - each function's environment sets every variable its code reads (and nothing the code
//!   never reads). What the code reads is found by running it: the configuration loader of the
//!   function's binary (the one the local runner builds the handler from) and the log-level
//!   lookup of `telemetry::init`, each given a lookup that records every name asked for.
//!
//! Whether each function's role grants exactly what the function uses is checked from its
//! behaviour, in `least_privilege.rs`: the calls each function makes while the saga runs are
//! recorded and compared with its role.
//!
//! Mutation tests break the real template in memory (one break each) and assert the checker
//! reports it, so these checks demonstrably can fail. cfn-lint and `sam validate --lint` run
//! too, from the tools venv (`make setup-tools`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use local_runner::stack::FunctionConfig;
use local_runner::template::{DimensionValue, EnvValue, FunctionSpec, JwtAuthorizerSpec, Template};
use saga_core::config::{
    ConfigError, CoordinatorConfig, Lookup, OrderApiConfig, PaymentConfig, StockConfig,
    SweeperConfig,
};
use saga_tests::templates::{mutated, real_template_text, report};

fn repo() -> PathBuf {
    saga_tests::repo_root()
}

/// Variables Lambda sets itself (the "Defined runtime environment variables" of the Lambda
/// developer guide): code may read them, and a template must not set them.
const LAMBDA_RESERVED: &[&str] = &[
    "_HANDLER",
    "_X_AMZN_TRACE_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "AWS_LAMBDA_LOG_GROUP_NAME",
    "AWS_LAMBDA_LOG_STREAM_NAME",
    // Set from LoggingConfig (ApplicationLogLevel, LogFormat).
    "AWS_LAMBDA_LOG_LEVEL",
    "AWS_LAMBDA_LOG_FORMAT",
    "AWS_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API",
    "LAMBDA_TASK_ROOT",
    "LAMBDA_RUNTIME_DIR",
];

// ==========================================================================================
// What the code reads from its environment
// ==========================================================================================

/// A lookup that records every variable asked for and answers `"1"`, a valid value for every
/// setting there is (a name, a URL, a rate from 0 to 1, a number of seconds).
#[derive(Default)]
struct Asked(RefCell<BTreeSet<String>>);

impl Lookup for Asked {
    fn get(&self, name: &str) -> Option<String> {
        self.0.borrow_mut().insert(name.to_string());
        Some("1".to_string())
    }
}

/// The variables `load` asks for.
fn asked_by<T>(
    load: impl FnOnce(&Asked) -> Result<T, ConfigError>,
) -> Result<BTreeSet<String>, String> {
    let asked = Asked::default();
    load(&asked).map_err(|e| format!("it refuses the value \"1\": {e}"))?;
    Ok(asked.0.into_inner())
}

/// The variables each configuration type declares it reads, and what its `load` asks for.
#[allow(clippy::type_complexity)]
#[rustfmt::skip]
fn configurations() -> Vec<(&'static str, &'static [&'static str], Result<BTreeSet<String>, String>)> {
    vec![
        ("OrderApiConfig", OrderApiConfig::VARIABLES, asked_by(OrderApiConfig::load)),
        ("StockConfig", StockConfig::VARIABLES, asked_by(StockConfig::load)),
        ("PaymentConfig", PaymentConfig::VARIABLES, asked_by(PaymentConfig::load)),
        ("CoordinatorConfig", CoordinatorConfig::VARIABLES, asked_by(CoordinatorConfig::load)),
        ("SweeperConfig", SweeperConfig::VARIABLES, asked_by(SweeperConfig::load)),
    ]
}

/// What a function whose binary is `binary` reads at cold start: its configuration (as the
/// runner loads it for that binary) and its log level (`telemetry::init`).
fn variables_read(binary: &str) -> Result<BTreeSet<String>, String> {
    let mut known = true;
    let mut read = asked_by(|env| FunctionConfig::load(binary, env).map(|c| known = c.is_some()))?;
    if !known {
        return Err(format!("binary {binary} is not one the local runner knows"));
    }
    let asked = Asked::default();
    saga_core::telemetry::level_from(&asked);
    read.extend(asked.0.into_inner());
    Ok(read)
}

// ==========================================================================================
// The checks
// ==========================================================================================

/// One problem found, as a sentence naming what and where.
type Problems = Vec<String>;

/// Runs every check on a template text; returns the problems found.
fn check(text: &str) -> Problems {
    let mut problems = Problems::new();
    let template = match Template::from_str(text) {
        Ok(t) => t,
        Err(e) => return vec![format!("the local runner refuses the template: {e}")],
    };
    check_event_sources(&template, &mut problems);
    check_routes(&template, &mut problems);
    check_auth(&template, &readme_text(), &mut problems);
    check_queues(&template, &mut problems);
    check_timeout(&template, &readme_text(), &mut problems);
    check_configurations(&mut problems);
    for f in &template.functions {
        check_environment(f, &mut problems);
    }
    problems
}

/// The gateway routes the order API's events declare are exactly the route keys its handler
/// serves (`saga_core::handlers::api::ROUTES`): the handler routes on the key the gateway
/// matched, so a route on one side only is a request nobody answers.
fn check_routes(template: &Template, problems: &mut Problems) {
    let served: BTreeSet<String> = saga_core::handlers::api::ROUTES
        .iter()
        .map(|r| r.to_string())
        .collect();
    for f in template
        .functions
        .iter()
        .filter(|f| f.binary == "order-api")
    {
        let declared: BTreeSet<String> = f.http_routes.iter().map(|r| r.route_key()).collect();
        for route in declared.difference(&served) {
            problems.push(format!(
                "{}: route {route} reaches the function, whose handler does not serve it",
                f.logical_id
            ));
        }
        for route in served.difference(&declared) {
            problems.push(format!(
                "{}: the handler serves {route}, but no event of the function routes it",
                f.logical_id
            ));
        }
    }
}

fn readme_text() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The routes the README's "public route" table names, as route keys.
fn readme_public_routes(readme: &str) -> BTreeSet<String> {
    readme
        .lines()
        .skip_while(|l| !l.starts_with("| public route |"))
        .skip(2) // the header and its separator
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('`').nth(1).map(str::to_string))
        .collect()
}

/// Who may call what:
/// - every route of the order API has the JWT authorizer, except the public ones; the public
///   ones are exactly those the README names (with its reasons) and those the handler serves
///   without a caller (`PUBLIC_ROUTES`);
/// - each authorizer's issuer and audiences come from the template itself: its own user pool
///   and app client (`!Sub ...${Pool}`, `!Ref Client`), or a parameter's value.
fn check_auth(template: &Template, readme: &str, problems: &mut Problems) {
    let named = readme_public_routes(readme);
    let handler_public: BTreeSet<String> = (saga_core::handlers::api::PUBLIC_ROUTES.iter())
        .map(|r| r.to_string())
        .collect();
    if named.is_empty() {
        problems.push("the README's \"public route\" table is missing or empty".into());
    }
    for f in (template.functions.iter()).filter(|f| f.binary == "order-api") {
        let mut public = BTreeSet::new();
        for route in &f.http_routes {
            let key = route.route_key();
            match template.route_authorizer(route) {
                Err(e) => problems.push(format!("{}: {e}", f.logical_id)),
                Ok(None) => {
                    public.insert(key);
                }
                Ok(Some(authorizer)) => check_issuer(template, &key, authorizer, problems),
            }
        }
        for route in public.difference(&named) {
            problems.push(format!(
                "{}: route {route} has no authorizer, but the README does not name it public",
                f.logical_id
            ));
        }
        for route in named.difference(&public) {
            problems.push(format!(
                "{}: the README names {route} public, but the template gives it an authorizer",
                f.logical_id
            ));
        }
        if public != handler_public {
            problems.push(format!(
                "{}: the template's public routes {public:?} are not the handler's PUBLIC_ROUTES {handler_public:?}",
                f.logical_id
            ));
        }
    }
}

fn check_issuer(
    template: &Template,
    route: &str,
    authorizer: &JwtAuthorizerSpec,
    problems: &mut Problems,
) {
    let is_parameter_value = |value: &str| {
        !value.is_empty()
            && (template.parameters.keys()).any(|p| template.parameter_value(p) == Some(value))
    };
    let pools: BTreeSet<&str> = (template.user_pools.iter())
        .map(|p| p.logical_id.as_str())
        .collect();
    let issuer_pool = match &authorizer.issuer {
        EnvValue::Sub(text) => pools.iter().copied().find(|pool| {
            *text == format!("https://cognito-idp.${{AWS::Region}}.amazonaws.com/${{{pool}}}")
        }),
        _ => None,
    };
    let issuer_ok = issuer_pool.is_some()
        || matches!(&authorizer.issuer, EnvValue::Literal(v) if is_parameter_value(v));
    if !issuer_ok {
        problems.push(format!(
            "route {route}: the issuer {:?} is neither the template's own user pool nor a parameter's value",
            authorizer.issuer
        ));
    }
    if authorizer.audience.is_empty() {
        problems.push(format!("route {route}: the authorizer accepts no audience"));
    }
    for audience in &authorizer.audience {
        let ok = match audience {
            EnvValue::Ref(client) => (template.user_pool_clients.iter())
                .any(|c| &c.logical_id == client && Some(c.user_pool.as_str()) == issuer_pool),
            EnvValue::Literal(v) => issuer_pool.is_none() && is_parameter_value(v),
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "route {route}: the audience {audience:?} is neither an app client of the issuer's user pool nor a parameter's value"
            ));
        }
    }
}

fn check_event_sources(template: &Template, problems: &mut Problems) {
    for f in &template.functions {
        for e in &f.sqs_events {
            if !e.report_batch_item_failures {
                problems.push(format!(
                    "{}: SQS event {} lacks FunctionResponseTypes: [ReportBatchItemFailures], so \
                     Lambda ignores the handler's batchItemFailures and retries whole batches",
                    f.logical_id, e.name
                ));
            }
        }
    }
}

fn check_queues(template: &Template, problems: &mut Problems) {
    let dlqs = template.dead_letter_queues();
    let consumed: BTreeSet<&str> = template
        .functions
        .iter()
        .flat_map(|f| f.sqs_events.iter().map(|e| e.queue.as_str()))
        .collect();
    for q in &template.queues {
        let id = q.logical_id.as_str();
        let is_dlq = dlqs.contains(id);
        if !is_dlq && !consumed.contains(id) {
            problems.push(format!(
                "queue {id} is neither consumed by a function nor any queue's dead-letter queue"
            ));
        }
        if consumed.contains(id) {
            match &q.redrive {
                None => problems.push(format!(
                    "queue {id} has no dead-letter queue (RedrivePolicy): a poison message \
                     would be retried until it expires, unseen"
                )),
                Some(r) => {
                    if r.max_receive_count < 5 {
                        problems.push(format!(
                            "queue {id}: maxReceiveCount {} is under 5 (Lambda's advice), so a \
                             throttled or transiently failing message lands in the DLQ",
                            r.max_receive_count
                        ));
                    }
                    let source_retention = q.message_retention_period.unwrap_or(345_600);
                    let dlq_retention = template
                        .queue(&r.dead_letter_queue)
                        .and_then(|d| d.message_retention_period)
                        .unwrap_or(345_600);
                    if dlq_retention < source_retention {
                        problems.push(format!(
                            "DLQ {} keeps messages {dlq_retention} s, less than its source {id} \
                             ({source_retention} s): a message's age carries over, so it could \
                             expire on arrival",
                            r.dead_letter_queue
                        ));
                    }
                }
            }
            // The visibility timeout must cover six attempts of the slowest consumer.
            for f in &template.functions {
                for e in f.sqs_events.iter().filter(|e| e.queue == id) {
                    let needed = 6 * f.timeout_seconds as i64 + e.batching_window_seconds as i64;
                    let visibility = q.visibility_timeout.unwrap_or(30) as i64;
                    if visibility < needed {
                        problems.push(format!(
                            "queue {id}: VisibilityTimeout {visibility} s is under 6 x the \
                             Timeout of {} ({} s) + its batching window ({} s) = {needed} s",
                            f.logical_id, f.timeout_seconds, e.batching_window_seconds
                        ));
                    }
                }
            }
        }
        if is_dlq && !has_dlq_alarm(template, id) {
            problems.push(format!(
                "DLQ {id} has no CloudWatch alarm on ApproximateNumberOfMessagesVisible with an \
                 alarm action: messages would sit there unseen"
            ));
        }
    }
}

/// The README section that says why an order may time out while its commands are still
/// being retried.
const TIMEOUT_SECTION: &str = "Timeouts and retries";

/// `OrderTimeoutSeconds` against the longest time a message of a work queue can still be
/// retried (`maxReceiveCount` x `VisibilityTimeout`): an order may time out while its
/// ReserveStock or ChargePayment is still being retried. That is harmless only because a
/// cancellation fences the steps that have not run (a late command then holds or charges
/// nothing), and the README must say so, in its "Timeouts and retries" section.
fn check_timeout(template: &Template, readme: &str, problems: &mut Problems) {
    let Some(timeout) = template
        .parameter_value("OrderTimeoutSeconds")
        .and_then(|v| v.parse::<i64>().ok())
    else {
        problems.push("OrderTimeoutSeconds has no numeric default".into());
        return;
    };
    let longest = template
        .queues
        .iter()
        .filter_map(|q| {
            let r = q.redrive.as_ref()?;
            Some((
                q.logical_id.clone(),
                r.max_receive_count as i64 * q.visibility_timeout.unwrap_or(30) as i64,
            ))
        })
        .max_by_key(|(_, span)| *span);
    let Some((queue, span)) = longest else { return };
    if timeout >= span {
        return;
    }
    let lines: Vec<&str> = readme.lines().collect();
    let explained = lines
        .iter()
        .position(|l| l.starts_with('#') && l.contains(TIMEOUT_SECTION))
        .is_some_and(|at| {
            lines[at + 1..]
                .iter()
                .take_while(|l| !l.starts_with('#'))
                .any(|l| l.contains("fence"))
        });
    if !explained {
        problems.push(format!(
            "OrderTimeoutSeconds ({timeout} s) is shorter than {queue}'s retry span ({span} s = \
             maxReceiveCount x VisibilityTimeout), and the README has no \"{TIMEOUT_SECTION}\" \
             section saying why a command retried after its order timed out is harmless (the \
             fence)"
        ));
    }
}

fn has_dlq_alarm(template: &Template, dlq: &str) -> bool {
    let watched = DimensionValue::GetAtt {
        logical_id: dlq.to_string(),
        attribute: "QueueName".to_string(),
    };
    template.alarms.iter().any(|a| {
        a.namespace.as_deref() == Some("AWS/SQS")
            && a.metric_name.as_deref() == Some("ApproximateNumberOfMessagesVisible")
            && !a.alarm_actions.is_empty()
            && a.dimensions
                .iter()
                .any(|(name, value)| name == "QueueName" && *value == watched)
    })
}

/// Each configuration type's `VARIABLES` is what its `load` reads.
fn check_configurations(problems: &mut Problems) {
    for (ty, declared, read) in configurations() {
        let declared: BTreeSet<String> = declared.iter().map(|v| v.to_string()).collect();
        match read {
            Err(e) => problems.push(format!("{ty}::load: {e}")),
            Ok(read) if read != declared => problems.push(format!(
                "{ty}::VARIABLES is {declared:?} but {ty}::load reads {read:?}"
            )),
            Ok(_) => {}
        }
    }
}

fn check_environment(f: &FunctionSpec, problems: &mut Problems) {
    let reads: BTreeSet<String> = match variables_read(&f.binary) {
        Ok(r) => r
            .into_iter()
            .filter(|v| !LAMBDA_RESERVED.contains(&v.as_str()))
            .collect(),
        Err(e) => {
            problems.push(format!("{}: {e}", f.logical_id));
            return;
        }
    };
    let set: BTreeSet<&String> = f.environment.keys().collect();
    for v in &reads {
        if !set.contains(v) {
            problems.push(format!(
                "{}: its code reads {v} but its Environment (with Globals) does not set it",
                f.logical_id
            ));
        }
    }
    for v in set {
        if LAMBDA_RESERVED.contains(&v.as_str()) {
            problems.push(format!(
                "{}: sets {v}, which Lambda reserves and sets itself",
                f.logical_id
            ));
        } else if !reads.contains(v) {
            problems.push(format!(
                "{}: sets {v}, which its code never reads",
                f.logical_id
            ));
        }
    }
}

// ==========================================================================================
// Tests
// ==========================================================================================

#[test]
fn when_checking_the_real_template_should_find_no_problem() {
    let problems = check(&real_template_text());
    assert!(
        problems.is_empty(),
        "template.yaml has {} problem(s):\n{}",
        problems.len(),
        report(&problems)
    );
}

/// What running the code finds it reads: a guard against the lookup silently seeing nothing.
#[test]
fn when_running_the_configuration_loaders_should_find_what_each_function_reads() {
    let read = |binary: &str| variables_read(binary).unwrap();
    assert_eq!(
        read("stock"),
        BTreeSet::from(
            [
                "PRODUCTS_TABLE",
                "IDEMPOTENCY_TABLE",
                "COORDINATOR_QUEUE_URL",
                "AWS_LAMBDA_LOG_LEVEL",
                "RUST_LOG"
            ]
            .map(String::from)
        )
    );
    assert!(read("sweeper").contains("ORDERS_PENDING_INDEX"));
    assert!(read("payment").contains("PAYMENT_FAILURE_RATE"));
    assert!(
        variables_read("no-such-binary")
            .unwrap_err()
            .contains("not one the local runner knows")
    );
}

fn assert_reported(text: &str, expected: &[&str]) {
    let problems = check(text);
    assert!(
        problems
            .iter()
            .any(|p| expected.iter().all(|e| p.contains(e))),
        "expected a problem mentioning {expected:?}; got:\n{}",
        report(&problems)
    );
}

#[test]
fn when_an_sqs_event_lacks_report_batch_item_failures_should_report_it() {
    let text = mutated(
        "            FunctionResponseTypes:\n              - ReportBatchItemFailures\n",
        "",
        Some("  StockFunction:"),
    );
    assert_reported(&text, &["StockFunction", "ReportBatchItemFailures"]);
}

#[test]
fn when_a_queue_has_no_dead_letter_queue_should_report_it() {
    let text = mutated(
        "      RedrivePolicy:\n        deadLetterTargetArn: !GetAtt PaymentDeadLetterQueue.Arn\n        maxReceiveCount: 5\n",
        "",
        None,
    );
    assert_reported(&text, &["queue PaymentQueue", "no dead-letter queue"]);
    let once = mutated(
        "maxReceiveCount: 5",
        "maxReceiveCount: 1",
        Some("  CoordinatorQueue:"),
    );
    assert_reported(&once, &["CoordinatorQueue", "maxReceiveCount 1"]);
}

#[test]
fn when_a_visibility_timeout_is_under_six_times_the_consumer_timeout_should_report_it() {
    // PaymentFunction's Timeout is 15: 6 x 15 + 1 = 91 > 60.
    let text = mutated(
        "VisibilityTimeout: 100",
        "VisibilityTimeout: 60",
        Some("  PaymentQueue:"),
    );
    assert_reported(
        &text,
        &["PaymentQueue", "VisibilityTimeout 60", "PaymentFunction"],
    );
}

#[test]
fn when_a_function_environment_lacks_a_variable_its_code_reads_should_report_it() {
    let text = mutated(
        "          PRODUCTS_TABLE: !Ref ProductsTable\n",
        "",
        Some("  StockFunction:"),
    );
    assert_reported(
        &text,
        &["StockFunction", "reads PRODUCTS_TABLE", "does not set it"],
    );
    let text = mutated(
        "          ORDERS_TABLE: !Ref OrdersTable\n",
        "          ORDERS_TABLE: !Ref OrdersTable\n          PRODUCTS_TABLE: !Ref ProductsTable\n",
        Some("  CoordinatorFunction:"),
    );
    assert_reported(
        &text,
        &["CoordinatorFunction", "sets PRODUCTS_TABLE", "never reads"],
    );
}

#[test]
fn when_a_gateway_route_and_the_handlers_routes_differ_should_report_it() {
    let text = mutated("Path: /orders/{orderId}", "Path: /order/{orderId}", None);
    assert_reported(
        &text,
        &[
            "OrderApiFunction",
            "route GET /order/{orderId}",
            "does not serve it",
        ],
    );
    assert_reported(
        &text,
        &[
            "OrderApiFunction",
            "serves GET /orders/{orderId}",
            "no event",
        ],
    );
}

#[test]
fn when_the_timeout_is_shorter_than_the_retry_span_without_the_readme_saying_why_should_report_it()
{
    let template = Template::from_str(&real_template_text()).expect("template.yaml");
    let readme = readme_text();
    let mut problems = Problems::new();
    check_timeout(&template, &readme, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
    // The section gone (or saying nothing of the fence): reported.
    let without: String = readme.replace(TIMEOUT_SECTION, "Something else");
    check_timeout(&template, &without, &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("OrderTimeoutSeconds") && problems[0].contains("retry span"),
        "{problems:?}"
    );
    // A timeout longer than every retry span needs no explanation.
    let text = mutated(
        "    Default: \"300\"\n",
        "    Default: \"100000\"\n",
        Some("  OrderTimeoutSeconds:"),
    );
    let mut problems = Problems::new();
    check_timeout(&Template::from_str(&text).unwrap(), &without, &mut problems);
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn when_a_dlq_has_no_alarm_should_report_it() {
    let text = mutated(
        "Value: !GetAtt StockDeadLetterQueue.QueueName",
        "Value: !GetAtt StockQueue.QueueName",
        None,
    );
    assert_reported(&text, &["DLQ StockDeadLetterQueue", "no CloudWatch alarm"]);
}

/// The venv's tool, or a failure telling the user how to install it.
fn tool(name: &str) -> PathBuf {
    let path = repo().join(".venv/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make setup-tools` (infra/scripts/setup.sh tools) to install \
         cfn-lint and aws-sam-cli into .venv",
        path.display()
    );
    path
}

fn run_tool(mut cmd: Command, what: &str) {
    let out = cmd
        .current_dir(repo())
        .env("SAM_CLI_TELEMETRY", "0")
        // Offline checks: no credentials needed or wanted.
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn when_linting_the_template_should_pass_cfn_lint_and_sam_validate() {
    let mut lint = Command::new(tool("cfn-lint"));
    lint.arg("template.yaml");
    run_tool(lint, "cfn-lint template.yaml");
    let mut validate = Command::new(tool("sam"));
    validate.args([
        "validate",
        "--lint",
        "--region",
        "us-east-1",
        "--template-file",
        "template.yaml",
    ]);
    run_tool(validate, "sam validate --lint");
}

#[test]
fn when_another_issuer_is_given_should_trust_its_tokens_and_create_no_user_pool() {
    let overrides = [
        ("OidcIssuerUrl", "https://example.eu.auth0.com/"),
        ("OidcAudience", "https://orders.example.com"),
    ];
    let template = Template::from_str(&real_template_text())
        .unwrap()
        .with_parameter_overrides(
            overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap();
    assert!(template.user_pools.is_empty() && template.user_pool_clients.is_empty());
    assert!(template.user_pool_groups.is_empty());
    let api = template.function("OrderApiFunction").unwrap();
    let route = api
        .http_routes
        .iter()
        .find(|r| r.path == "/orders")
        .unwrap();
    let authorizer = template.route_authorizer(route).unwrap().unwrap();
    assert_eq!(
        authorizer.issuer,
        EnvValue::Literal("https://example.eu.auth0.com/".into())
    );
    assert_eq!(
        authorizer.audience,
        [EnvValue::Literal("https://orders.example.com".into())]
    );
    let mut problems = Problems::new();
    check_auth(&template, &readme_text(), &mut problems);
    assert!(problems.is_empty(), "{}", report(&problems));
    // By default: the stack's own pool and client.
    let template = Template::from_str(&real_template_text()).unwrap();
    let authorizer = template.route_authorizer(route).unwrap().unwrap();
    assert_eq!(
        authorizer.audience,
        [EnvValue::Ref("UserPoolClient".into())]
    );
    assert_eq!(template.user_pool_groups[0].group_name, "operators");
}

#[test]
fn when_an_issuer_or_audience_is_written_out_should_report_it() {
    let text = mutated(
        "- !If [CreateUserPool, !Ref UserPoolClient, !Ref OidcAudience]",
        "- !If [CreateUserPool, hard-coded-client-id, !Ref OidcAudience]",
        None,
    );
    assert_reported(&text, &["audience", "hard-coded-client-id"]);
    let text = mutated(
        "- !Sub https://cognito-idp.${AWS::Region}.amazonaws.com/${UserPool}",
        "- https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Hardcoded",
        Some("JwtConfiguration:"),
    );
    assert_reported(&text, &["issuer", "us-east-1_Hardcoded"]);
}

#[test]
fn when_a_route_is_public_without_the_readme_saying_so_should_report_it() {
    // The catalogue route loses `Authorizer: NONE`: the README still names it public.
    let text = mutated(
        "            Auth:\n              Authorizer: NONE\n",
        "",
        Some("  OrderApiFunction:"),
    );
    assert_reported(
        &text,
        &[
            "GET /products/{productId}",
            "README names",
            "gives it an authorizer",
        ],
    );
    // Changing a product becomes public.
    let text = mutated(
        "            Path: /products/{productId}\n            PayloadFormatVersion: \"2.0\"\n",
        "            Path: /products/{productId}\n            PayloadFormatVersion: \"2.0\"\n            Auth:\n              Authorizer: NONE\n",
        Some("        PutProduct:"),
    );
    assert_reported(
        &text,
        &[
            "PUT /products/{productId}",
            "no authorizer",
            "does not name it public",
        ],
    );
}
