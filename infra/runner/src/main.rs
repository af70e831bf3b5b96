//! `saga-local`: the local runner's command line.
//!
//! ```text
//! saga-local run [--port 3000] [--no-seed]   the whole saga on 127.0.0.1 (what `make run` starts)
//! saga-local services up|down                 start or stop DynamoDB Local and moto only
//! saga-local stop                             stop the services a previous run left running
//! saga-local redrive --queue NAME [--max N]   DLQ -> source queue (local names), or
//! saga-local redrive --dlq-url URL --target-url URL [--max N] [--move-task --dlq-arn ARN]
//! ```
//! Environment: PAYMENT_FAILURE_RATE (default 0.1 for `run`), ORDER_TIMEOUT_SECONDS,
//! SAGA_FAULTS (crash injection, e.g. `after_write=0.05`), SAGA_DUPLICATE_RATE,
//! SAGA_VISIBILITY_TIMEOUT (also shortens function timeouts to match), SAGA_FUNCTION_TIMEOUT,
//! SAGA_SWEEP_SECONDS, SAGA_PREFIX, RUST_LOG.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use local_runner::services::{self, ServiceOptions};
use local_runner::stack::{local_clients, Stack, StackOptions};
use local_runner::template::Template;
use saga_core::faults::Faults;

fn repo_root() -> PathBuf {
    // The binary is run from the repository (the Makefile does); fall back to the source tree.
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join("template.yaml").exists() {
        cwd
    } else {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not valid")),
        _ => Ok(default),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    saga_core::telemetry::init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None | Some("run") => run(&args).await,
        Some("services") => match args.get(1).map(String::as_str) {
            Some("up") => services_up().await,
            Some("down") | None => {
                let n = services::stop_from_pid_files(&repo_root());
                println!("stopped {n} local service(s)");
                Ok(())
            }
            Some(other) => Err(format!(
                "unknown services command {other:?}; use up or down"
            )),
        },
        Some("stop") => {
            let n = services::stop_from_pid_files(&repo_root());
            println!("stopped {n} local service(s)");
            Ok(())
        }
        Some("redrive") => redrive(&args).await,
        Some("-h") | Some("--help") | Some("help") => {
            println!(
                "{}",
                include_str!("main.rs")
                    .lines()
                    .skip(2)
                    .take(12)
                    .map(|l| l.trim_start_matches("//! ").trim_start_matches("//!"))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}; try --help")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saga-local: {e}");
            ExitCode::FAILURE
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

async fn run(args: &[String]) -> Result<(), String> {
    let root = repo_root();
    let mut service_opts = ServiceOptions::new(root.clone());
    service_opts.dynamodb_data_dir = Some(root.join(".local/dynamodb"));
    let services = services::ensure_services(&service_opts)
        .await
        .map_err(|e| e.to_string())?;

    let mut opts = StackOptions::new(&root);
    opts.dynamodb_endpoint = services.dynamodb_endpoint();
    opts.sqs_endpoint = services.sqs_endpoint();
    let port: u16 = flag(args, "--port")
        .map(|p| p.parse().map_err(|_| format!("bad --port {p}")))
        .transpose()?
        .unwrap_or(3000);
    opts.http_addr = ([127, 0, 0, 1], port).into();
    opts.prefix = env_or("SAGA_PREFIX", String::new())?;
    let rate: f64 = env_or("PAYMENT_FAILURE_RATE", 0.1)?;
    opts.env_overrides
        .insert("PAYMENT_FAILURE_RATE".into(), rate.to_string());
    if let Ok(t) = std::env::var("ORDER_TIMEOUT_SECONDS") {
        opts.env_overrides.insert("ORDER_TIMEOUT_SECONDS".into(), t);
    }
    opts.faults = Faults::parse(&env_or("SAGA_FAULTS", String::new())?)?;
    opts.duplicate_rate = env_or("SAGA_DUPLICATE_RATE", 0.0)?;
    if let Ok(v) = std::env::var("SAGA_VISIBILITY_TIMEOUT") {
        let secs: u64 = v
            .parse()
            .map_err(|_| "SAGA_VISIBILITY_TIMEOUT must be whole seconds")?;
        opts.visibility_timeout = Some(secs as i32);
        // A function must not outlive its message's visibility, or a redelivery would find its
        // claim still held: unless SAGA_FUNCTION_TIMEOUT says otherwise, shorten it to match.
        // Both are floors: they grow with the invocations' durations up to the template's.
        opts.function_timeout = Some(Duration::from_secs(secs.max(1)));
    }
    if let Ok(v) = std::env::var("SAGA_FUNCTION_TIMEOUT") {
        opts.function_timeout =
            Some(Duration::from_secs(v.parse().map_err(|_| {
                "SAGA_FUNCTION_TIMEOUT must be whole seconds"
            })?));
    }
    if let Ok(v) = std::env::var("SAGA_SWEEP_SECONDS") {
        opts.sweep_every = Some(Duration::from_secs(
            v.parse()
                .map_err(|_| "SAGA_SWEEP_SECONDS must be whole seconds")?,
        ));
    }
    let stack = Stack::start(opts).await.map_err(|e| e.to_string())?;
    if !args.iter().any(|a| a == "--no-seed") {
        seed(&stack).await?;
    }
    print_banner(
        &stack,
        rate,
        &services.dynamodb_endpoint(),
        &services.sqs_endpoint(),
    );

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

/// Demo products, created only if absent so a restart keeps their stock.
async fn seed(stack: &Stack) -> Result<(), String> {
    let products = [
        ("p-mug", "Mug", 1250, 10),
        ("p-tee", "T-shirt", 2000, 5),
        ("p-poster", "Poster", 800, 3),
    ];
    for (id, name, price, quantity) in products {
        let result = stack
            .clients
            .dynamodb
            .put_item()
            .table_name(stack.table("ProductsTable"))
            .item(
                "productId",
                aws_sdk_dynamodb::types::AttributeValue::S(id.into()),
            )
            .item(
                "name",
                aws_sdk_dynamodb::types::AttributeValue::S(name.into()),
            )
            .item(
                "priceCents",
                aws_sdk_dynamodb::types::AttributeValue::N(price.to_string()),
            )
            .item(
                "quantity",
                aws_sdk_dynamodb::types::AttributeValue::N(quantity.to_string()),
            )
            .condition_expression("attribute_not_exists(productId)")
            .send()
            .await;
        if let Err(e) = result {
            let e = e.into_service_error();
            if !e.is_conditional_check_failed_exception() {
                return Err(format!(
                    "seeding {id}: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(e)
                ));
            }
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
    println!("Try:");
    println!("  curl -s -X POST {api}/orders -H 'content-type: application/json' \\");
    println!("       -d '{{\"customerId\":\"c-1\",\"items\":[{{\"productId\":\"p-mug\",\"quantity\":2}}]}}'");
    println!("  curl -s {api}/orders/<orderId>");
    println!("  curl -s {api}/products/p-mug\n");
}

async fn redrive(args: &[String]) -> Result<(), String> {
    let max = flag(args, "--max")
        .map(|m| m.parse::<usize>().map_err(|_| "bad --max"))
        .transpose()?;
    if let Some(dlq_url) = flag(args, "--dlq-url") {
        // Against real AWS (or any endpoint): credentials and region from the environment.
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(saga_core::aws::http_client())
            .load()
            .await;
        let sqs = aws_sdk_sqs::Client::new(&config);
        if args.iter().any(|a| a == "--move-task") {
            let arn = flag(args, "--dlq-arn").ok_or("--move-task needs --dlq-arn")?;
            let handle = local_runner::redrive::start_move_task(&sqs, &arn)
                .await
                .map_err(|e| e.to_string())?;
            println!("started message move task {handle}");
            return Ok(());
        }
        let target = flag(args, "--target-url").ok_or("--dlq-url needs --target-url")?;
        let moved = local_runner::redrive::redrive(&sqs, &dlq_url, &target, max)
            .await
            .map_err(|e| e.to_string())?;
        println!("moved {moved} message(s) from {dlq_url} to {target}");
        return Ok(());
    }
    let queue = flag(args, "--queue")
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
    let prefix = env_or("SAGA_PREFIX", String::new())?;
    let clients = local_clients(
        "http://127.0.0.1:8000",
        &std::env::var("SAGA_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into()),
        "us-east-1",
    )
    .await;
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
