//! What API Gateway's HTTP API does, for the local runner: match a request against the
//! template's routes, turn it into an API Gateway HTTP API (payload format 2.0) event, and
//! give it to the order API handler, exactly as Lambda would.

use crate::pacing::FunctionTimeout;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{json, Map, Value};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// API Gateway's payload limit.
const MAX_PAYLOAD: usize = 10 * 1024 * 1024;

pub type HttpFunction = Arc<
    dyn Fn(
            Request,
        )
            -> Pin<Box<dyn Future<Output = Result<Response<Body>, lambda_http::Error>> + Send>>
        + Send
        + Sync,
>;

/// A route of the HTTP API: method and path template such as `/orders/{orderId}`.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub method: String,
    pub path: String,
}

impl RouteSpec {
    /// The path parameters if this route matches.
    fn matches(&self, method: &str, path: &str) -> Option<Map<String, Value>> {
        if !self.method.eq_ignore_ascii_case(method) && self.method != "ANY" {
            return None;
        }
        let want = self.path.trim_matches('/').split('/').collect::<Vec<_>>();
        let got = path.trim_matches('/').split('/').collect::<Vec<_>>();
        if want.len() != got.len() {
            return None;
        }
        let mut params = Map::new();
        for (w, g) in want.iter().zip(&got) {
            if let Some(name) = w.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
                if g.is_empty() {
                    return None;
                }
                params.insert(name.to_string(), Value::String(percent_decode(g)));
            } else if w != g {
                return None;
            }
        }
        Some(params)
    }

    pub fn route_key(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The API Gateway HTTP API event for a request.
pub fn api_gateway_event(
    route: Option<(&RouteSpec, Map<String, Value>)>,
    method: &str,
    path: &str,
    query: &str,
    headers: &hyper::HeaderMap,
    body: &[u8],
) -> Value {
    let mut header_map = Map::new();
    let mut cookies = Vec::new();
    for name in headers.keys() {
        let values = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>();
        if name == hyper::header::COOKIE {
            cookies.extend(
                values
                    .iter()
                    .flat_map(|v| v.split("; ").map(str::to_string)),
            );
            continue;
        }
        header_map.insert(name.as_str().to_string(), Value::String(values.join(",")));
    }
    let mut query_params = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        query_params.insert(percent_decode(k), Value::String(percent_decode(v)));
    }
    let now = chrono::Utc::now();
    let route_key = route
        .as_ref()
        .map(|(r, _)| r.route_key())
        .unwrap_or_else(|| "$default".into());
    let (body_value, base64) = match std::str::from_utf8(body) {
        Ok(text) => (Value::String(text.to_string()), false),
        Err(_) => {
            use base64::Engine;
            (
                Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
                true,
            )
        }
    };
    let mut event = json!({
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": path,
        "rawQueryString": query,
        "headers": header_map,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "local",
            "domainName": "127.0.0.1",
            "domainPrefix": "local",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": header_map.get("user-agent").cloned().unwrap_or(Value::String(String::new())),
            },
            "requestId": uuid::Uuid::new_v4().to_string(),
            "routeKey": route_key,
            "stage": "$default",
            "time": now.format("%d/%b/%Y:%H:%M:%S %z").to_string(),
            "timeEpoch": now.timestamp_millis(),
        },
        "isBase64Encoded": base64,
    });
    if !cookies.is_empty() {
        event["cookies"] = json!(cookies);
    }
    if !query_params.is_empty() {
        event["queryStringParameters"] = Value::Object(query_params);
    }
    if let Some((_, params)) = route {
        if !params.is_empty() {
            event["pathParameters"] = Value::Object(params);
        }
    }
    if !body.is_empty() {
        event["body"] = body_value;
    }
    event
}

/// Serves the HTTP API until `shutdown` turns true. Returns the bound address at once.
pub async fn serve(
    addr: SocketAddr,
    routes: Vec<RouteSpec>,
    function: HttpFunction,
    function_timeout: Arc<FunctionTimeout>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let routes = Arc::new(routes);
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let routes = routes.clone();
            let function = function.clone();
            let function_timeout = function_timeout.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let routes = routes.clone();
                    let function = function.clone();
                    let function_timeout = function_timeout.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(req, &routes, &function, &function_timeout).await,
                        )
                    }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    });
    Ok((bound, task))
}

fn plain(status: u16, body: Value) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

async fn handle(
    req: hyper::Request<Incoming>,
    routes: &[RouteSpec],
    function: &HttpFunction,
    function_timeout: &FunctionTimeout,
) -> hyper::Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let headers = req.headers().clone();
    let body = match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(413, json!({"message": "Request Entity Too Large"})),
    };
    // API Gateway answers unknown routes itself.
    let Some(route) = routes
        .iter()
        .find_map(|r| r.matches(&method, &path).map(|p| (r, p)))
    else {
        return plain(404, json!({"message": "Not Found"}));
    };
    let event = api_gateway_event(Some(route), &method, &path, &query, &headers, &body);
    let request = match lambda_http::request::from_str(&event.to_string()) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                500,
                json!({"message": format!("runner could not build the event: {e}")}),
            )
        }
    };
    let timeout = function_timeout.current();
    let mut ctx = lambda_runtime::Context::default();
    ctx.request_id = uuid::Uuid::new_v4().to_string();
    ctx.deadline = (saga_core::time::now_ms() + timeout.as_millis() as i64) as u64;
    let request = request.with_lambda_context(ctx);
    let started = std::time::Instant::now();
    let response = match tokio::time::timeout(timeout, function(request)).await {
        Ok(Ok(r)) => {
            function_timeout.observe(started.elapsed());
            r
        }
        Ok(Err(e)) => {
            function_timeout.observe(started.elapsed());
            tracing::error!(error = %e, "order API function failed");
            return plain(500, json!({"message": "Internal Server Error"}));
        }
        Err(_) => {
            function_timeout.timed_out(timeout);
            tracing::error!(?timeout, "order API function timed out");
            return plain(503, json!({"message": "Service Unavailable"}));
        }
    };
    let (parts, body) = response.into_parts();
    tracing::info!(
        method,
        path,
        status = parts.status.as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "http"
    );
    let bytes = match body {
        Body::Empty => Bytes::new(),
        Body::Text(t) => Bytes::from(t),
        Body::Binary(b) => Bytes::from(b),
        _ => Bytes::new(),
    };
    let mut out = hyper::Response::from_parts(parts, Full::new(bytes));
    out.headers_mut().remove(hyper::header::CONTENT_LENGTH);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_a_path_matches_a_template_route_should_extract_its_parameters() {
        let r = RouteSpec {
            method: "GET".into(),
            path: "/orders/{orderId}".into(),
        };
        let p = r.matches("GET", "/orders/o%2D1").unwrap();
        assert_eq!(p["orderId"], "o-1");
        assert!(r.matches("POST", "/orders/o-1").is_none());
        assert!(r.matches("GET", "/orders").is_none());
        assert!(r.matches("GET", "/orders/").is_none());
    }

    #[test]
    fn when_building_an_event_lambda_http_should_accept_it() {
        let r = RouteSpec {
            method: "POST".into(),
            path: "/orders".into(),
        };
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        let event = api_gateway_event(
            Some((&r, Map::new())),
            "POST",
            "/orders",
            "",
            &headers,
            b"{}",
        );
        let req = lambda_http::request::from_str(&event.to_string()).unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(req.body().as_ref(), b"{}");
        assert_eq!(event["routeKey"], "POST /orders");
    }
}
