//! Counting what the stack logs while a test runs: crashes injected, failures, redeliveries,
//! time-outs and back-offs, for the test's report.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use saga_core::faults::FaultPoint;
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// What the handlers and the runner reported while the test ran, counted from their logs.
#[derive(Default, Debug)]
pub struct LogCounts {
    /// Injected crashes, per fault point (in the order of `FaultPoint::ALL`).
    pub crashes: [AtomicUsize; 3],
    pub transient: AtomicUsize,
    pub permanent: AtomicUsize,
    /// Messages the event source mappings delivered a second time.
    pub redelivered: AtomicUsize,
    pub api_takeovers: AtomicUsize,
    pub timed_out_invocations: AtomicUsize,
    /// Times a mapping stood pollers down (an error, a time-out or a slow SQS call).
    pub congested: AtomicUsize,
    /// SQS calls slower than the runner's threshold.
    pub slow_sqs: AtomicUsize,
    pub receive_failures: AtomicUsize,
}

#[derive(Default)]
struct EventFields {
    message: String,
    fault: String,
    count: u64,
}

impl Visit for EventFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "fault" => self.fault = value.to_string(),
            "message" => self.message = value.to_string(),
            _ => {}
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "count" {
            self.count = value;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

struct CountingLayer(Arc<LogCounts>);

impl<S: tracing::Subscriber> Layer<S> for CountingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut f = EventFields::default();
        event.record(&mut f);
        let c = &self.0;
        let m = f.message.as_str();
        if m == "injected crash" {
            if let Some(i) = FaultPoint::ALL.iter().position(|p| p.name() == f.fault) {
                c.crashes[i].fetch_add(1, Ordering::Relaxed);
            }
        } else if m.starts_with("transient failure") {
            c.transient.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("message cannot be processed") {
            c.permanent.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("delivering messages a second time") {
            c.redelivered.fetch_add(f.count as usize, Ordering::Relaxed);
        } else if m.starts_with("taking over an abandoned request") {
            c.api_takeovers.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("function timed out") {
            c.timed_out_invocations.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("fewer pollers") {
            c.congested.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("SQS is slow") {
            c.slow_sqs.fetch_add(1, Ordering::Relaxed);
        } else if m.starts_with("receive failed") {
            c.receive_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Installs the test binary's only subscriber, which counts what the stack logs and writes it
/// (INFO and up) to `target/test-logs/<test binary>.log`, so that a failure can point at what
/// the handlers and the event source mappings said. Call once per test binary.
pub fn count_logs() -> Arc<LogCounts> {
    let counts = Arc::new(LogCounts::default());
    let filter = || {
        tracing_subscriber::filter::Targets::new()
            .with_target("saga_core", tracing::Level::INFO)
            .with_target("local_runner", tracing::Level::INFO)
    };
    let path = log_path();
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("create target/test-logs");
    let file =
        std::fs::File::create(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    tracing_subscriber::registry()
        .with(CountingLayer(counts.clone()).with_filter(filter()))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .with_filter(filter()),
        )
        .try_init()
        .expect("this test binary installs the only subscriber");
    counts
}

/// Where [`count_logs`] writes: `target/test-logs/<test binary's name>.log` (the binary is
/// `<target>/debug/deps/<name>-<hash>`).
pub fn log_path() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let name = exe
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit_once('-').map(|(name, _)| name.to_string()))
        .unwrap_or_else(|| "test".into());
    let target = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("<target>/debug/deps");
    target.join("test-logs").join(format!("{name}.log"))
}

/// The last `lines` lines [`count_logs`] wrote.
pub fn log_tail(lines: usize) -> String {
    let text = std::fs::read_to_string(log_path()).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
