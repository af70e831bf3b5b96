//! `saga-local`: the local runner's command line (`saga-local --help` describes it).
//!
//! ```text
//! saga-local [run] [--port 3000] [--no-seed]   the whole saga on 127.0.0.1 (what `make run` starts)
//! saga-local services up|down                   start or stop DynamoDB Local and moto only
//! saga-local stop                               stop the services a previous run left running
//! saga-local token [--user alice] [--operator]  sign a local user in; print an access token
//! saga-local redrive --queue NAME [--max N]     DLQ -> source queue (local names), or
//! saga-local redrive --dlq-url URL --target-url URL [--max N]
//! saga-local redrive --dlq-url URL --move-task --dlq-arn ARN
//! saga-local audit [--prefix P]                 check the stores' invariants (local stack), or
//! saga-local audit --orders-table T --products-table T --movements-table T
//!                  --idempotency-table T --ledger-table T   (a deployed stack)
//! saga-local opening-balances [--apply] [...]   first movements of products from before movements
//!                                               (the same table options as audit)
//! saga-local sam-env [--prefix P]                .local/sam/{env.json,template.yaml} for `sam local`
//! saga-local sam-relay --listen A:P --to A:P     a TCP relay (moto to the Docker bridge)
//! ```
//! Every setting of `run` can also come from the environment (`PAYMENT_FAILURE_RATE`,
//! `SAGA_FAULTS`, ...), as `run --help` lists.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use local_runner::services::{self, ServiceOptions};
use local_runner::stack::{Stack, StackOptions, local_clients};
use local_runner::template::Template;
use saga_core::faults::Faults;

/// The order saga on 127.0.0.1: DynamoDB Local, moto's SQS, the HTTP API and every function
/// on its queue, as `template.yaml` declares them.
#[derive(Parser, Debug)]
#[command(
    name = "saga-local",
    version,
    after_help = "With no command, saga-local runs `run`. RUST_LOG sets the log level \
                  (error, warn, info, debug, trace; default info)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the whole saga on 127.0.0.1 until Ctrl-C (what `make run` starts)
    ///
    /// Starts (or reuses) DynamoDB Local on 127.0.0.1:8000, with its data in .local/dynamodb,
    /// and moto's SQS on 127.0.0.1:9324; creates the tables and queues of template.yaml; seeds
    /// three demo products; serves the HTTP API; and runs every function on its queue as
    /// Lambda's event source mapping does. Ctrl-C stops it and the services it started.
    Run(RunArgs),
    /// Start or stop DynamoDB Local and moto only
    Services {
        #[command(subcommand)]
        action: Option<ServicesAction>,
    },
    /// Stop the services a previous run left running (what `make stop` does)
    Stop,
    /// Sign a user of the local user pool in and print an access token
    ///
    /// Creates the user in template.yaml's user pool (in moto) if absent: a customer, or with
    /// --operator a member of the operators group (without --operator the user is taken out
    /// of it). Sets a fresh random password, signs in with USER_PASSWORD_AUTH and prints the
    /// access token (valid for an hour) for `Authorization: Bearer ...`. Starts DynamoDB Local
    /// and moto, and creates the pool, if needed.
    Token(TokenArgs),
    /// Move the messages of a dead-letter queue back to its source queue
    ///
    /// Locally, by logical id: `--queue StockDeadLetterQueue` (or `StockQueue`) receives from
    /// the DLQ, sends to its source queue, then deletes. Against real AWS (or any endpoint,
    /// with credentials and region from the environment): `--dlq-url` with `--target-url`
    /// does the same, and `--move-task` lets SQS move the messages instead.
    Redrive(RedriveArgs),
    /// Check the stores' invariants and list every broken one (exit 0 clean, 1 findings, 2
    /// usage or connection errors)
    ///
    /// Reads the orders, products, stock movements, idempotency and payment ledger tables
    /// (one full scan of the five tables, with parallel segments) and checks: 1. no product's
    /// quantity or reserved below zero; 2. per product, reserved = the units held by live
    /// reservations; 3. per product, quantity + reserved (+ units held by reservations of the
    /// previous version) = the sum of its stock movements; 4. every CONFIRMED order holds its
    /// reservation and has exactly one approved charge and no refund; 5. every CANCELLED order
    /// holds no reservation and has no unrefunded charge; 6. no order PENDING past the
    /// timeout; 7. the ledger's charges minus refunds = the totals of the CONFIRMED orders.
    /// Each finding is one line naming the invariant and the ids; a summary gives the items
    /// read per table and the read capacity consumed (as DynamoDB reports it, or estimated
    /// from item sizes where it reports none, as DynamoDB Local does).
    ///
    /// Cost: one full scan of the five tables: about one read capacity unit per 8 KB stored
    /// (eventually consistent), twice that with --consistent. The scans are not a snapshot:
    /// on a busy system a finding may be a step in flight; audit again to confirm it.
    ///
    /// With no table names, it audits the local stack of `make run` (names from template.yaml
    /// and --prefix, DynamoDB Local at --dynamodb-endpoint); it starts and stops nothing.
    /// With the five --*-table names it audits a deployed stack (region, credentials and
    /// endpoint from the standard AWS environment).
    Audit(AuditArgs),
    /// Write the first stock movement of products created before movements were recorded
    /// (exit 0 when each is written or, read only, could be; 1 when one changed while read
    /// or is refused; 2 when it could not run)
    ///
    /// After an upgrade from a version without stock movements, the audit's invariant 3 flags
    /// every product created before it. For each product with no first movement (no `initial
    /// stock`, no opening balance) whose movements do not explain its stock, this writes one
    /// movement, reason `opening balance`: quantity + reserved + units held by live
    /// reservations of the previous version - the movements it already has. The stores are
    /// read twice (two full scans, as the audit's), and a product is written only if both
    /// reads agree, in one transaction conditioned on its quantity and reserved being
    /// unchanged, under a fixed movement id (a second run writes nothing). A negative balance
    /// is never written. Without --apply it only reads. Table options as for `audit`.
    OpeningBalances(OpeningArgs),
    /// Write what `sam local` needs to run the built functions against the local stack
    ///
    /// Starts (or reuses) the local services, creates (or reuses) the template's tables and
    /// queues as `run` does, and writes into --out-dir: `env.json`, the `--env-vars` file
    /// (every function's environment from template.yaml, resolved to the local resources and
    /// to addresses a container reaches), and `template.yaml`, SAM's built template that
    /// also declares the endpoint variables (SAM passes only declared ones). `make
    /// sam-invoke` runs it; see docs/deploy.md.
    SamEnv(SamEnvArgs),
    /// Forward TCP connections from --listen to --to (for `sam local`: moto listens on
    /// 127.0.0.1 only, and a container reaches this machine at the Docker bridge's address)
    SamRelay {
        /// Where to listen, e.g. the bridge's gateway 172.17.0.1:9324
        #[arg(long, value_name = "ADDR:PORT")]
        listen: SocketAddr,
        /// Where to connect, e.g. 127.0.0.1:9324
        #[arg(long, value_name = "ADDR:PORT")]
        to: SocketAddr,
    },
}

/// The settings of `sam-env`.
#[derive(Args, Debug)]
struct SamEnvArgs {
    /// Where to write env.json and template.yaml
    #[arg(long, value_name = "DIR", default_value = ".local/sam")]
    out_dir: PathBuf,

    /// SAM's build directory (what `sam build` wrote)
    #[arg(long, value_name = "DIR", default_value = ".aws-sam/build")]
    build_dir: PathBuf,

    /// The local resources' name prefix, as `run` was given it (none when unset)
    #[arg(long, env = "SAGA_PREFIX", value_parser = blank_means(String::new()))]
    prefix: Option<String>,
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum ServicesAction {
    /// Start them (or reuse them if they answer) and leave them running
    Up,
    /// Stop the ones recorded in .local/pids (the default)
    Down,
}

/// The default `PAYMENT_FAILURE_RATE` of `run`.
const PAYMENT_FAILURE_RATE: f64 = 0.1;

/// The settings of `run` (a [`Parser`] too, for `saga-local` with no command).
#[derive(Parser, Debug)]
struct RunArgs {
    /// The HTTP API's port on 127.0.0.1
    #[arg(long, default_value_t = 3000)]
    port: u16,

    /// Do not create the demo products (p-mug, p-tee, p-poster; created only if absent)
    #[arg(long)]
    no_seed: bool,

    /// Share of charges the payment simulator declines at random, 0.0 to 1.0
    #[arg(
        long,
        env = "PAYMENT_FAILURE_RATE",
        value_name = "RATE",
        default_value_t = PAYMENT_FAILURE_RATE,
        value_parser = blank_means(PAYMENT_FAILURE_RATE),
    )]
    payment_failure_rate: f64,

    /// How long an order may stay pending before the sweeper cancels it; given to the
    /// functions as it is (they take 300 when it is unset)
    #[arg(long, env = "ORDER_TIMEOUT_SECONDS", value_name = "SECONDS")]
    order_timeout_seconds: Option<String>,

    /// Crash injection, e.g. after_write=0.05,after_publish=0.05,in_payment=0.05 (none when
    /// unset)
    #[arg(long, env = "SAGA_FAULTS", value_name = "POINT=RATE,...", value_parser = parse_faults)]
    faults: Option<Faults>,

    /// Share of processed messages delivered a second time
    #[arg(
        long,
        env = "SAGA_DUPLICATE_RATE",
        value_name = "RATE",
        default_value_t = 0.0,
        value_parser = blank_means(0.0),
    )]
    duplicate_rate: f64,

    /// Shorten every queue's visibility timeout, and every function's timeout to match unless
    /// --function-timeout says otherwise. A floor: the runner lengthens it as invocations get
    /// slower, never beyond the template's (the template's when unset)
    #[arg(long, env = "SAGA_VISIBILITY_TIMEOUT", value_name = "SECONDS")]
    visibility_timeout: Option<u64>,

    /// Shorten every function's timeout; a floor, as above (the template's when unset)
    #[arg(long, env = "SAGA_FUNCTION_TIMEOUT", value_name = "SECONDS")]
    function_timeout: Option<u64>,

    /// How often the sweeper runs (the template's schedule when unset)
    #[arg(long, env = "SAGA_SWEEP_SECONDS", value_name = "SECONDS")]
    sweep_seconds: Option<u64>,

    /// Prepended to every table and queue name (none when unset)
    #[arg(long, env = "SAGA_PREFIX", value_parser = blank_means(String::new()))]
    prefix: Option<String>,
}

/// The settings of `token`.
#[derive(Args, Debug)]
struct TokenArgs {
    /// The user's name in the pool
    #[arg(long, default_value = "alice")]
    user: String,

    /// Make the user an operator (a member of the operators group)
    #[arg(long)]
    operator: bool,

    /// Print the ID token instead of the access token
    #[arg(long)]
    id_token: bool,

    /// The local resources' name prefix, as `run` was given it (none when unset)
    #[arg(long, env = "SAGA_PREFIX", value_parser = blank_means(String::new()))]
    prefix: Option<String>,
}

/// The settings of `redrive`: where from (`--queue` or `--dlq-url`) and where to.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("from").required(true).args(["queue", "dlq_url"])))]
struct RedriveArgs {
    /// The DLQ or its source queue, by logical id in template.yaml (e.g.
    /// StockDeadLetterQueue or StockQueue)
    #[arg(long, value_name = "NAME")]
    queue: Option<String>,

    /// The DLQ's URL
    #[arg(long, value_name = "URL")]
    dlq_url: Option<String>,

    /// The queue --dlq-url's messages go back to
    #[arg(long, value_name = "URL", conflicts_with = "queue")]
    target_url: Option<String>,

    /// Start an SQS message move task from --dlq-arn instead (not on moto)
    #[arg(long, requires = "dlq_arn", conflicts_with_all = ["queue", "target_url"])]
    move_task: bool,

    /// The DLQ's ARN, for --move-task
    #[arg(long, value_name = "ARN", conflicts_with = "queue")]
    dlq_arn: Option<String>,

    /// Move at most this many messages (all when unset)
    #[arg(long, value_name = "N")]
    max: Option<usize>,

    /// The local resources' name prefix, as `run` was given it (none when unset)
    #[arg(long, env = "SAGA_PREFIX", value_parser = blank_means(String::new()))]
    prefix: Option<String>,

    /// The local SQS endpoint, for --queue
    #[arg(
        long,
        env = "SAGA_SQS_ENDPOINT",
        value_name = "URL",
        default_value = "http://127.0.0.1:9324"
    )]
    sqs_endpoint: String,
}

/// Which stores `audit` and `opening-balances` read, and how.
#[derive(Args, Debug)]
struct StoreArgs {
    /// The local resources' name prefix, as `run` was given it (none when unset; ignored with
    /// the --*-table names)
    #[arg(long, env = "SAGA_PREFIX", value_parser = blank_means(String::new()))]
    prefix: Option<String>,

    /// DynamoDB Local's endpoint, for the local stack
    #[arg(
        long,
        env = "SAGA_DYNAMODB_ENDPOINT",
        value_name = "URL",
        default_value = "http://127.0.0.1:8000"
    )]
    dynamodb_endpoint: String,

    /// A deployed stack's orders table (give all five table names, or none)
    #[arg(long, value_name = "NAME", requires_all = ["products_table", "movements_table", "idempotency_table", "ledger_table"])]
    orders_table: Option<String>,
    /// A deployed stack's products table
    #[arg(long, value_name = "NAME", requires_all = ["orders_table", "movements_table", "idempotency_table", "ledger_table"])]
    products_table: Option<String>,
    /// A deployed stack's stock movements table
    #[arg(long, value_name = "NAME", requires_all = ["orders_table", "products_table", "idempotency_table", "ledger_table"])]
    movements_table: Option<String>,
    /// A deployed stack's idempotency table
    #[arg(long, value_name = "NAME", requires_all = ["orders_table", "products_table", "movements_table", "ledger_table"])]
    idempotency_table: Option<String>,
    /// A deployed stack's payment ledger table
    #[arg(long, value_name = "NAME", requires_all = ["orders_table", "products_table", "movements_table", "idempotency_table"])]
    ledger_table: Option<String>,

    /// Parallel scan segments per table (TotalSegments); more is faster on large tables and
    /// costs the same
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    segments: u32,

    /// Strongly consistent reads (twice the read capacity of the default eventually
    /// consistent ones)
    #[arg(long)]
    consistent: bool,

    /// Report the items read so far on stderr every 2 s (the default when stderr is a
    /// terminal)
    #[arg(long)]
    progress: bool,
}

/// The settings of `audit`.
#[derive(Args, Debug)]
struct AuditArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// The sweeper's ORDER_TIMEOUT_SECONDS (template.yaml's OrderTimeoutSeconds default when
    /// unset)
    #[arg(long, value_name = "SECONDS")]
    order_timeout_seconds: Option<u64>,

    /// Added to the timeout before a PENDING order is a finding: the sweeper's schedule (one
    /// minute) plus its work, so that a running system is not flagged while the sweeper is
    /// about to act
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    grace_seconds: u64,

    /// Print the report as JSON on stdout (findings, items and capacity per table)
    #[arg(long)]
    json: bool,
}

/// The settings of `opening-balances`.
#[derive(Args, Debug)]
struct OpeningArgs {
    #[command(flatten)]
    store: StoreArgs,

    /// Write the opening balances (without it, the stores are only read and the command says
    /// what it would write)
    #[arg(long)]
    apply: bool,

    /// Print the results as JSON on stdout
    #[arg(long)]
    json: bool,
}

/// A value parser that ignores surrounding blanks and takes a blank value as `default`: how
/// the runner has always read PAYMENT_FAILURE_RATE, SAGA_DUPLICATE_RATE and SAGA_PREFIX.
fn blank_means<T>(default: T) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr + Clone + Send + Sync + 'static,
    T::Err: std::fmt::Display,
{
    move |raw: &str| match raw.trim() {
        "" => Ok(default.clone()),
        value => value.parse().map_err(|e: T::Err| e.to_string()),
    }
}

fn parse_faults(raw: &str) -> Result<Faults, String> {
    Faults::parse(raw.trim())
}

fn repo_root() -> PathBuf {
    // The binary is run from the repository (the Makefile does); fall back to the source tree.
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("template.yaml").exists() {
        cwd
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let command = Cli::parse().command.unwrap_or_else(|| {
        // No command is `run` with its defaults (and the environment).
        Cmd::Run(RunArgs::parse_from(["saga-local run"]))
    });
    if matches!(
        command,
        Cmd::Token(_) | Cmd::Audit(_) | Cmd::OpeningBalances(_)
    ) {
        // The token (`export TOKEN=$(make -s token)`) or the report is the command's output:
        // logs go to stderr, at the same level as everywhere else.
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(saga_core::telemetry::level_from(
                &saga_core::config::process_env,
            ))
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    } else {
        saga_core::telemetry::init();
    }
    let result = match command {
        Cmd::Run(args) => run(args).await,
        Cmd::Services {
            action: Some(ServicesAction::Up),
        } => services_up().await,
        Cmd::Services {
            action: None | Some(ServicesAction::Down),
        }
        | Cmd::Stop => {
            let n = services::stop_from_pid_files(&repo_root());
            println!("stopped {n} local service(s)");
            Ok(())
        }
        Cmd::Redrive(args) => redrive(args).await,
        Cmd::Token(args) => token(args).await,
        Cmd::Audit(args) => return audit(args).await,
        Cmd::OpeningBalances(args) => return opening_balances(args).await,
        Cmd::SamEnv(args) => sam_env(args).await,
        Cmd::SamRelay { listen, to } => sam_relay(listen, to).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-local: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The stores `audit` and `opening-balances` read: the client, the table names and how to
/// scan them.
async fn stores(
    args: StoreArgs,
    template: &Template,
) -> Result<
    (
        aws_sdk_dynamodb::Client,
        local_runner::audit::TableNames,
        local_runner::audit::ScanOptions,
    ),
    String,
> {
    use local_runner::audit::{ScanOptions, TableNames};
    use std::io::IsTerminal;
    let (client, tables) = match (
        args.orders_table,
        args.products_table,
        args.movements_table,
        args.idempotency_table,
        args.ledger_table,
    ) {
        (Some(orders), Some(products), Some(movements), Some(idempotency), Some(ledger)) => {
            // A deployed stack: region, credentials and endpoint from the environment.
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(saga_core::aws::http_client())
                .load()
                .await;
            let tables = TableNames {
                orders,
                products,
                movements,
                idempotency,
                ledger,
            };
            (aws_sdk_dynamodb::Client::new(&config), tables)
        }
        _ => {
            let prefix = args.prefix.unwrap_or_default();
            let tables = TableNames::local(template, &prefix).map_err(|e| e.to_string())?;
            let clients = local_clients(
                &args.dynamodb_endpoint,
                "http://127.0.0.1:9324",
                "us-east-1",
            )
            .await;
            (clients.dynamodb, tables)
        }
    };
    let opts = ScanOptions {
        segments: args.segments,
        consistent: args.consistent,
        progress: args.progress || std::io::stderr().is_terminal(),
        ..ScanOptions::default()
    };
    Ok((client, tables, opts))
}

/// Prints `value` as JSON on stdout; false (after saying why) if it cannot.
fn print_json(command: &str, value: &impl serde::Serialize) -> bool {
    match serde_json::to_string_pretty(value) {
        Ok(json) => {
            println!("{json}");
            true
        }
        Err(e) => {
            eprintln!("saga-local {command}: {e}");
            false
        }
    }
}

/// `saga-local audit`: exit 0 when every invariant holds, 1 with findings, 2 when the audit
/// could not run.
async fn audit(args: AuditArgs) -> ExitCode {
    use local_runner::audit::{self, Rules};
    let run = async {
        let template =
            Template::from_file(repo_root().join("template.yaml")).map_err(|e| e.to_string())?;
        let timeout = match args.order_timeout_seconds {
            Some(t) => t,
            None => audit::template_order_timeout(&template)
                .ok_or("template.yaml has no numeric OrderTimeoutSeconds default")?,
        };
        let (client, tables, opts) = stores(args.store, &template).await?;
        let rules = Rules {
            now_ms: saga_core::time::now_ms(),
            pending_limit: Duration::from_secs(timeout.saturating_add(args.grace_seconds)),
        };
        audit::audit(&client, &tables, &opts, &rules)
            .await
            .map_err(|e| e.to_string())
    };
    match run.await {
        Ok(report) => {
            if args.json {
                if !print_json("audit", &report) {
                    return ExitCode::from(2);
                }
            } else {
                print!("{}", report.text());
            }
            if report.clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("saga-local audit: {e}");
            ExitCode::from(2)
        }
    }
}

/// `saga-local opening-balances`: exit 0 when no product is left without its opening balance
/// (or, read only, when every one could be written), 1 when one changed while read or is
/// refused, 2 when it could not run.
async fn opening_balances(args: OpeningArgs) -> ExitCode {
    use local_runner::audit;
    use local_runner::opening::{self, Outcome};
    let apply = args.apply;
    let run = async {
        let template =
            Template::from_file(repo_root().join("template.yaml")).map_err(|e| e.to_string())?;
        let (client, tables, opts) = stores(args.store, &template).await?;
        let read = async || {
            audit::load(&client, &tables, &opts)
                .await
                .map(|loaded| opening::plan(&loaded.snapshot))
                .map_err(|e| e.to_string())
        };
        let first = read().await?;
        let second = if apply && !first.is_empty() {
            read().await?
        } else {
            first.clone()
        };
        let mut results = Vec::new();
        for (o, decided) in opening::decide(&first, &second) {
            let outcome = match decided {
                Some(outcome) => outcome,
                None if !apply => Outcome::WouldWrite,
                None => opening::write(&client, &tables, &o, saga_core::time::now_ms())
                    .await
                    .map_err(|e| e.to_string())?,
            };
            results.push((o, outcome));
        }
        Ok::<_, String>(results)
    };
    match run.await {
        Ok(results) => {
            if args.json {
                let json: Vec<_> = results
                    .iter()
                    .map(|(o, outcome)| serde_json::json!({"opening": o, "outcome": outcome}))
                    .collect();
                if !print_json("opening-balances", &json) {
                    return ExitCode::from(2);
                }
            } else {
                print!("{}", opening::text(&results));
            }
            let settled = results.iter().all(|(_, o)| {
                matches!(
                    o,
                    Outcome::WouldWrite | Outcome::Written | Outcome::AlreadyWritten
                )
            });
            if settled {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("saga-local opening-balances: {e}");
            ExitCode::from(2)
        }
    }
}

async fn services_up() -> Result<(), String> {
    let opts = ServiceOptions::new(repo_root());
    let s = services::ensure_services(&opts)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "DynamoDB Local: {}\nSQS (moto):     {}",
        s.dynamodb_endpoint(),
        s.sqs_endpoint()
    );
    // Leave them running: `saga-local services down` stops them.
    std::mem::forget(s);
    Ok(())
}

async fn sam_env(args: SamEnvArgs) -> Result<(), String> {
    let root = repo_root();
    let at_root = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            root.join(p)
        }
    };
    let (out_dir, build_dir) = (at_root(&args.out_dir), at_root(&args.build_dir));
    // The built template first: without it there is nothing to run.
    let local_template = local_runner::sam::local_template(&build_dir)?;

    let services = run_services(&root).await?;
    let host = local_runner::sam::Endpoints {
        dynamodb: services.dynamodb_endpoint(),
        sqs: services.sqs_endpoint(),
    };
    // Left running, as `services up` leaves them: `make stop` stops them.
    std::mem::forget(services);

    let template = Template::from_file(root.join("template.yaml")).map_err(|e| e.to_string())?;
    let clients = local_clients(&host.dynamodb, &host.sqs, "us-east-1").await;
    let prefix = args.prefix.unwrap_or_default();
    let names =
        local_runner::provision::provision(&template, &prefix, &clients.dynamodb, &clients.sqs)
            .await
            .map_err(|e| e.to_string())?;
    let env = local_runner::sam::env_vars_for_stack(&template, &names, &host, &BTreeMap::new())?;

    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let write = |name: &str, text: String| {
        let path = out_dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        Ok::<(), String>(())
    };
    write(
        "env.json",
        serde_json::to_string_pretty(&env).map_err(|e| e.to_string())? + "\n",
    )?;
    write("template.yaml", local_template)?;
    Ok(())
}

async fn sam_relay(listen: SocketAddr, to: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("listen on {listen}: {e}"))?;
    println!("relaying {listen} -> {to}");
    local_runner::sam::relay(listener, to).await;
    Ok(())
}

/// DynamoDB Local (its data kept in .local/dynamodb) and moto, started or reused: what `run`,
/// `token` and `sam-env` work against.
async fn run_services(root: &std::path::Path) -> Result<services::LocalServices, String> {
    let mut opts = ServiceOptions::new(root.to_path_buf());
    opts.dynamodb_data_dir = Some(root.join(".local/dynamodb"));
    services::ensure_services(&opts)
        .await
        .map_err(|e| e.to_string())
}

async fn run(args: RunArgs) -> Result<(), String> {
    let root = repo_root();
    let services = run_services(&root).await?;

    let mut opts = StackOptions::new(&root);
    opts.dynamodb_endpoint = services.dynamodb_endpoint();
    opts.sqs_endpoint = services.sqs_endpoint();
    opts.http_addr = ([127, 0, 0, 1], args.port).into();
    opts.prefix = args.prefix.unwrap_or_default();
    let rate = args.payment_failure_rate;
    opts.env_overrides
        .insert("PAYMENT_FAILURE_RATE".into(), rate.to_string());
    if let Some(t) = args.order_timeout_seconds {
        opts.env_overrides.insert("ORDER_TIMEOUT_SECONDS".into(), t);
    }
    opts.faults = args.faults.unwrap_or_default();
    opts.duplicate_rate = args.duplicate_rate;
    if let Some(secs) = args.visibility_timeout {
        opts.visibility_timeout = Some(i32::try_from(secs).map_err(|_| {
            format!("--visibility-timeout (SAGA_VISIBILITY_TIMEOUT) {secs} is too large")
        })?);
        // A function must not outlive its message's visibility, or a redelivery would find its
        // claim still held: unless --function-timeout says otherwise, shorten it to match.
        // Both are floors: they grow with the invocations' durations up to the template's.
        opts.function_timeout = Some(Duration::from_secs(secs.max(1)));
    }
    if let Some(secs) = args.function_timeout {
        opts.function_timeout = Some(Duration::from_secs(secs));
    }
    if let Some(secs) = args.sweep_seconds {
        opts.sweep_every = Some(Duration::from_secs(secs));
    }
    let stack = Stack::start(opts).await.map_err(|e| e.to_string())?;
    let sign_in = stack.sign_in()?;
    let operators = local_runner::cognito::operators_group(&stack.template);
    let customer = sign_in
        .sign_in(DEMO_CUSTOMER, &[], &[&operators])
        .await
        .map_err(|e| e.to_string())?;
    let operator = sign_in
        .sign_in(DEMO_OPERATOR, &[&operators], &[&operators])
        .await
        .map_err(|e| e.to_string())?;
    if !args.no_seed {
        seed(&stack, &operator.access_token).await?;
    }
    print_banner(
        &stack,
        rate,
        &services.dynamodb_endpoint(),
        &services.sqs_endpoint(),
    );
    println!("Signed in (tokens valid for an hour; `make token` prints a fresh one):");
    println!("  export TOKEN={}", customer.access_token);
    println!("  export OPERATOR_TOKEN={}\n", operator.access_token);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("\nstopping...");
    stack.stop().await;
    services.stop().await;
    Ok(())
}

/// The users `run` signs in: a customer and an operator of the local pool.
const DEMO_CUSTOMER: &str = "alice";
const DEMO_OPERATOR: &str = "ops";

async fn token(args: TokenArgs) -> Result<(), String> {
    let root = repo_root();
    // The services as `run` starts them, so that a `run` after this reuses them.
    let services = run_services(&root).await?;
    let template = Template::from_file(root.join("template.yaml")).map_err(|e| e.to_string())?;
    let cognito = local_runner::stack::local_cognito(&services.sqs_endpoint(), "us-east-1");
    let mut names = local_runner::template::LocalNames {
        region: Some("us-east-1".into()),
        ..Default::default()
    };
    let prefix = args.prefix.unwrap_or_default();
    local_runner::cognito::provision(&template, &prefix, &cognito, &mut names)
        .await
        .map_err(|e| e.to_string())?;
    let sign_in = local_runner::cognito::SignIn::of_template(&template, &names, cognito)?;
    let operators = local_runner::cognito::operators_group(&template);
    let groups: &[&str] = if args.operator { &[&operators] } else { &[] };
    let tokens = sign_in
        .sign_in(&args.user, groups, &[&operators])
        .await
        .map_err(|e| e.to_string())?;
    // The services stay up for the run that uses the token.
    std::mem::forget(services);
    println!(
        "{}",
        if args.id_token {
            tokens.id_token
        } else {
            tokens.access_token
        }
    );
    Ok(())
}

/// Demo products, created through the API as the operator would (`PUT` with the operator's
/// token and the initial stock), and only where absent (`GET` first; a `PUT` of an existing
/// product's stock is a 409, taken as already seeded), so a restart keeps the stock a previous
/// run left.
async fn seed(stack: &Stack, operator_token: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let products = [
        ("p-mug", "Mug", 1250, 10),
        ("p-tee", "T-shirt", 2000, 5),
        ("p-poster", "Poster", 800, 3),
    ];
    for (id, name, price, quantity) in products {
        let uri = format!("http://{}/products/{id}", stack.http_addr);
        let call = |method: &str, body: Option<serde_json::Value>| {
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(&uri)
                .header("authorization", format!("Bearer {operator_token}"));
            if body.is_some() {
                req = req.header("content-type", "application/json");
            }
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            let req = req.body(Full::new(Bytes::from(body))).expect("a request");
            let client = client.clone();
            async move {
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((
                    status,
                    String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                ))
            }
        };
        let (status, body) = call("GET", None).await?;
        match status {
            200 => continue,
            404 => {}
            _ => return Err(format!("seeding {id}: GET answered {status}: {body}")),
        }
        let product = serde_json::json!({"name": name, "priceCents": price, "quantity": quantity});
        // 201: created with its stock. 409: it exists after all (created since the GET, by
        // another runner): its stock is left as it is, since stock changes only through
        // adjustments.
        let (status, body) = call("PUT", Some(product)).await?;
        if !matches!(status, 201 | 409) {
            return Err(format!("seeding {id}: PUT answered {status}: {body}"));
        }
    }
    Ok(())
}

fn print_banner(stack: &Stack, rate: f64, dynamodb: &str, sqs: &str) {
    let api = format!("http://{}", stack.http_addr);
    println!("\nOrder saga running locally (Ctrl-C stops it)\n");
    println!("  HTTP API     {api}");
    println!(
        "  DynamoDB     {dynamodb}  tables: {}",
        stack
            .names
            .tables
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  SQS (moto)   {sqs}  queues: {}",
        stack
            .names
            .queue_urls
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  payment failure rate {rate} (PAYMENT_FAILURE_RATE=0 make run turns random declines off)"
    );
    println!("  demo products: p-mug (10 in stock), p-tee (5), p-poster (3)\n");
    println!("Try (after the two export lines below):");
    println!("  curl -s -X POST {api}/orders -H \"authorization: Bearer $TOKEN\" \\");
    println!("       -H 'content-type: application/json' \\");
    println!("       -d '{{\"items\":[{{\"productId\":\"p-mug\",\"quantity\":2}}]}}'");
    println!("  curl -s {api}/orders -H \"authorization: Bearer $TOKEN\"");
    println!("  curl -s {api}/orders/<orderId> -H \"authorization: Bearer $TOKEN\"");
    println!("  curl -s {api}/products/p-mug          (public)");
    println!(
        "  curl -s -X PUT {api}/products/p-lamp -H \"authorization: Bearer $OPERATOR_TOKEN\" \\"
    );
    println!("       -H 'content-type: application/json' \\");
    println!("       -d '{{\"name\":\"Lamp\",\"priceCents\":4500,\"quantity\":4}}'");
    println!(
        "  curl -s -X POST {api}/products/p-mug/stock-adjustments -H \"authorization: Bearer $OPERATOR_TOKEN\" \\"
    );
    println!("       -H 'content-type: application/json' \\");
    println!("       -d '{{\"delta\":5,\"reason\":\"restock\"}}'\n");
}

async fn redrive(args: RedriveArgs) -> Result<(), String> {
    let max = args.max;
    if let Some(dlq_url) = args.dlq_url {
        enum Remote {
            MoveTask { dlq_arn: String },
            To { target_url: String },
        }
        // clap has made sure that --move-task comes with --dlq-arn.
        let remote = match (args.dlq_arn.filter(|_| args.move_task), args.target_url) {
            (Some(dlq_arn), _) => Remote::MoveTask { dlq_arn },
            (None, Some(target_url)) => Remote::To { target_url },
            (None, None) => return Err("--dlq-url needs --target-url (or --move-task)".into()),
        };
        // Against real AWS (or any endpoint): credentials and region from the environment.
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(saga_core::aws::http_client())
            .load()
            .await;
        let sqs = aws_sdk_sqs::Client::new(&config);
        match remote {
            Remote::MoveTask { dlq_arn } => {
                let handle = local_runner::redrive::start_move_task(&sqs, &dlq_arn)
                    .await
                    .map_err(|e| e.to_string())?;
                println!("started message move task {handle}");
            }
            Remote::To { target_url } => {
                let moved = local_runner::redrive::redrive(&sqs, &dlq_url, &target_url, max)
                    .await
                    .map_err(|e| e.to_string())?;
                println!("moved {moved} message(s) from {dlq_url} to {target_url}");
            }
        }
        return Ok(());
    }
    let queue = args
        .queue
        .ok_or("redrive needs --queue NAME (e.g. StockDeadLetterQueue or StockQueue)")?;
    let template =
        Template::from_file(repo_root().join("template.yaml")).map_err(|e| e.to_string())?;
    // Accept the DLQ's or the source queue's logical id.
    let (source, dlq) = template
        .queues
        .iter()
        .find_map(|q| {
            let r = q.redrive.as_ref()?;
            (q.logical_id == queue || r.dead_letter_queue == queue)
                .then(|| (q.logical_id.clone(), r.dead_letter_queue.clone()))
        })
        .ok_or_else(|| {
            format!("{queue} is neither a queue with a DLQ nor a DLQ in template.yaml")
        })?;
    let prefix = args.prefix.unwrap_or_default();
    let clients = local_clients("http://127.0.0.1:8000", &args.sqs_endpoint, "us-east-1").await;
    let url = |name: String| {
        let sqs = clients.sqs.clone();
        async move {
            sqs.get_queue_url()
                .queue_name(&name)
                .send()
                .await
                .map_err(|e| {
                    format!(
                        "queue {name}: {}",
                        aws_sdk_sqs::error::DisplayErrorContext(e)
                    )
                })
                .map(|o| o.queue_url.unwrap_or_default())
        }
    };
    let dlq_url = url(format!("{prefix}{dlq}")).await?;
    let target_url = url(format!("{prefix}{source}")).await?;
    let moved = local_runner::redrive::redrive(&clients.sqs, &dlq_url, &target_url, max)
        .await
        .map_err(|e| e.to_string())?;
    println!("moved {moved} message(s) from {dlq} to {source}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        RunArgs::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("saga-local").chain(args.iter().copied()))
    }

    #[test]
    fn parses_every_command() {
        assert!(parse(&[]).unwrap().command.is_none());
        let Some(Cmd::Run(run)) = parse(&["run", "--port", "3001", "--no-seed"])
            .unwrap()
            .command
        else {
            panic!("not run");
        };
        assert_eq!((run.port, run.no_seed), (3001, true));
        assert!(parse(&["run", "--port", "x"]).is_err());
        assert!(matches!(
            parse(&["services"]).unwrap().command,
            Some(Cmd::Services { action: None })
        ));
        assert!(matches!(
            parse(&["services", "up"]).unwrap().command,
            Some(Cmd::Services {
                action: Some(ServicesAction::Up)
            })
        ));
        assert!(parse(&["services", "sideways"]).is_err());
        assert!(matches!(parse(&["stop"]).unwrap().command, Some(Cmd::Stop)));
        let Some(Cmd::Token(t)) = parse(&["token", "--user", "bob", "--operator"])
            .unwrap()
            .command
        else {
            panic!("not token");
        };
        assert_eq!(
            (t.user.as_str(), t.operator, t.id_token),
            ("bob", true, false)
        );
        assert!(parse(&["launch"]).is_err());
    }

    fn redrive_args(args: &[&str]) -> Result<RedriveArgs, clap::Error> {
        match parse(&[&["redrive"], args].concat())?.command {
            Some(Cmd::Redrive(r)) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn redrive_needs_a_source_and_a_target() {
        let r = redrive_args(&["--queue", "StockQueue", "--max", "5"]).unwrap();
        assert_eq!((r.queue.as_deref(), r.max), (Some("StockQueue"), Some(5)));
        let r = redrive_args(&["--dlq-url", "d", "--target-url", "t"]).unwrap();
        assert_eq!(
            (r.dlq_url.as_deref(), r.target_url.as_deref()),
            (Some("d"), Some("t"))
        );
        let r = redrive_args(&["--dlq-url", "d", "--move-task", "--dlq-arn", "arn"]).unwrap();
        assert!(r.move_task && r.dlq_arn.as_deref() == Some("arn"));
        for wrong in [
            &[][..],
            &["--max", "5"],
            &["--max", "x", "--queue", "Q"],
            &["--dlq-url", "d", "--move-task"],
            &["--queue", "Q", "--move-task", "--dlq-arn", "arn"],
            &["--queue", "Q", "--dlq-url", "d", "--target-url", "t"],
            &["--queue", "Q", "--target-url", "t"],
            &["--queue", "Q", "--dlq-arn", "arn"],
        ] {
            assert!(redrive_args(wrong).is_err(), "{wrong:?}");
        }
        let only_dlq = redrive_args(&["--dlq-url", "d"]).unwrap();
        let err = redrive(only_dlq).await.unwrap_err();
        assert!(err.contains("--dlq-url needs --target-url"), "{err}");
    }

    #[test]
    fn blank_settings_mean_the_default_and_blanks_around_a_value_do_not_count() {
        let rate = blank_means(0.1);
        assert_eq!(rate(""), Ok(0.1));
        assert_eq!(rate("  "), Ok(0.1));
        assert_eq!(rate(" 0.5 "), Ok(0.5));
        assert!(rate("often").is_err());
        assert_eq!(blank_means(String::new())(" t1- "), Ok("t1-".to_string()));
        assert!(parse_faults(" ").is_ok());
        assert!(parse_faults("nowhere=0.5").is_err());
    }
}
