//! A fake Lambda Runtime API (the `2018-06-01` interface every runtime's loop speaks), for
//! measuring one function process: when it first asks for work (`GET .../invocation/next`),
//! and how long each invocation takes from the moment the event is handed out to the moment
//! its response (or error) arrives. One event at a time, as Lambda does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// What the function answered for one event.
#[derive(Clone, Debug)]
pub struct Completion {
    pub request_id: String,
    /// `true` for `/response`, `false` for `/error` (and for `/init/error`).
    pub ok: bool,
    pub body: String,
    /// Event handed out -> answer received.
    pub duration: Duration,
}

struct Event {
    request_id: String,
    body: String,
}

struct Shared {
    first_next: Mutex<Option<oneshot::Sender<Instant>>>,
    events: tokio::sync::Mutex<mpsc::Receiver<Event>>,
    dispatched: Mutex<HashMap<String, Instant>>,
    completions: mpsc::UnboundedSender<Completion>,
}

/// The server; dropping it stops it.
pub struct FakeRuntimeApi {
    pub addr: SocketAddr,
    events: mpsc::Sender<Event>,
    first_next: Option<oneshot::Receiver<Instant>>,
    completions: mpsc::UnboundedReceiver<Completion>,
    task: tokio::task::JoinHandle<()>,
    sequence: u64,
}

impl Drop for FakeRuntimeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeRuntimeApi {
    /// Listens on 127.0.0.1 (a free port).
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (first_tx, first_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::channel(1);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            first_next: Mutex::new(Some(first_tx)),
            events: tokio::sync::Mutex::new(events_rx),
            dispatched: Mutex::new(HashMap::new()),
            completions: done_tx,
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, &shared).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            events: events_tx,
            first_next: Some(first_rx),
            completions: done_rx,
            task,
            sequence: 0,
        })
    }

    /// When the process first asked for an event. Returns `None` if the process reported an
    /// init error instead (its completion is returned by the next [`Self::invoke`]).
    pub async fn first_next(&mut self) -> Option<Instant> {
        let first = self.first_next.take()?;
        tokio::select! {
            at = first => at.ok(),
            _ = wait_init_error(&mut self.completions) => None,
        }
    }

    /// Hands out one event and waits for its answer.
    pub async fn invoke(&mut self, body: String) -> Option<Completion> {
        self.sequence += 1;
        let request_id = format!("bench-{:08}", self.sequence);
        self.events
            .send(Event {
                request_id: request_id.clone(),
                body,
            })
            .await
            .ok()?;
        loop {
            let done = self.completions.recv().await?;
            if done.request_id == request_id || done.request_id == "init" {
                return Some(done);
            }
        }
    }
}

async fn wait_init_error(completions: &mut mpsc::UnboundedReceiver<Completion>) {
    while let Some(c) = completions.recv().await {
        if c.request_id == "init" {
            return;
        }
    }
    std::future::pending::<()>().await
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let arrived = Instant::now();
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return reply(StatusCode::NOT_FOUND, "not a runtime API path");
    };
    if req.method() == Method::GET && rest == "invocation/next" {
        if let Some(tx) = shared.first_next.lock().expect("not poisoned").take() {
            let _ = tx.send(arrived);
        }
        let Some(event) = shared.events.lock().await.recv().await else {
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "benchmark over");
        };
        let deadline = chrono::Utc::now().timestamp_millis() + 30_000;
        let mut r = reply(StatusCode::OK, event.body);
        let h = r.headers_mut();
        h.insert("content-type", "application/json".parse().expect("valid"));
        h.insert(
            "lambda-runtime-aws-request-id",
            event.request_id.parse().expect("valid"),
        );
        h.insert(
            "lambda-runtime-deadline-ms",
            deadline.to_string().parse().expect("valid"),
        );
        h.insert(
            "lambda-runtime-invoked-function-arn",
            "arn:aws:lambda:us-east-1:123456789012:function:stock-bench"
                .parse()
                .expect("valid"),
        );
        h.insert(
            "lambda-runtime-trace-id",
            "Root=1-6773c400-0123456789abcdef01234567;Parent=0123456789abcdef;Sampled=0"
                .parse()
                .expect("valid"),
        );
        shared
            .dispatched
            .lock()
            .expect("not poisoned")
            .insert(event.request_id, Instant::now());
        return r;
    }
    if req.method() != Method::POST {
        return reply(StatusCode::NOT_FOUND, "unknown route");
    }
    let (request_id, ok) = if rest == "init/error" {
        ("init".to_string(), false)
    } else if let Some(id) = rest
        .strip_prefix("invocation/")
        .and_then(|r| r.strip_suffix("/response"))
    {
        (id.to_string(), true)
    } else if let Some(id) = rest
        .strip_prefix("invocation/")
        .and_then(|r| r.strip_suffix("/error"))
    {
        (id.to_string(), false)
    } else {
        return reply(StatusCode::NOT_FOUND, "unknown route");
    };
    let started = shared
        .dispatched
        .lock()
        .expect("not poisoned")
        .remove(&request_id)
        .unwrap_or(arrived);
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(e) => format!("(body unreadable: {e})"),
    };
    let _ = shared.completions.send(Completion {
        request_id,
        ok,
        body,
        duration: arrived.saturating_duration_since(started),
    });
    reply(StatusCode::ACCEPTED, r#"{"status":"OK"}"#)
}
