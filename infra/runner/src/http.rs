//! What API Gateway's HTTP API does, for the local runner: match a request against the
//! template's routes, turn it into an API Gateway HTTP API (payload format 2.0) event, and
//! give it to the order API handler, exactly as Lambda would.

use crate::authorizer::JwtAuthorizer;
use crate::pacing::FunctionTimeout;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
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

/// A route of the HTTP API: method (or `ANY`) and path template such as `/orders/{orderId}`
/// or `/files/{proxy+}`; path `$default` is the catch-all route. With an authorizer, only a
/// request with a token it accepts reaches the function.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub method: String,
    pub path: String,
    pub authorizer: Option<Arc<JwtAuthorizer>>,
}

impl RouteSpec {
    /// The event's `routeKey`: `GET /orders/{orderId}`, or `$default`.
    pub fn route_key(&self) -> String {
        if self.path == DEFAULT_ROUTE {
            DEFAULT_ROUTE.to_string()
        } else {
            format!("{} {}", self.method, self.path)
        }
    }
}

/// The route key of the catch-all route.
const DEFAULT_ROUTE: &str = "$default";

/// Two routes of the template that cannot both be served.
#[derive(Debug, thiserror::Error)]
#[error("route {route}: {source}")]
pub struct RouteError {
    route: String,
    #[source]
    source: matchit::InsertError,
}

/// The HTTP API's routes, matched as API Gateway matches them: a route for the request's
/// method before an `ANY` route, a literal segment before a `{parameter}`, and `$default`
/// when nothing else matches.
#[derive(Debug, Default)]
pub struct Routes {
    specs: Vec<RouteSpec>,
    /// Per method (upper case, `ANY` too): path template -> index in `specs`.
    by_method: HashMap<String, matchit::Router<usize>>,
    default: Option<usize>,
}

impl Routes {
    pub fn new(specs: Vec<RouteSpec>) -> Result<Self, RouteError> {
        let mut routes = Routes::default();
        for (i, spec) in specs.iter().enumerate() {
            if spec.path == DEFAULT_ROUTE {
                routes.default = Some(i);
                continue;
            }
            routes
                .by_method
                .entry(spec.method.to_ascii_uppercase())
                .or_default()
                .insert(matchit_path(&spec.path), i)
                .map_err(|source| RouteError {
                    route: spec.route_key(),
                    source,
                })?;
        }
        routes.specs = specs;
        Ok(routes)
    }

    /// The route a request goes to, with its path parameters (percent-decoded).
    pub fn find(&self, method: &str, path: &str) -> Option<(&RouteSpec, Map<String, Value>)> {
        // Leading and trailing slashes do not count: `/orders/` is `/orders`.
        let path = format!("/{}", path.trim_matches('/'));
        let method = method.to_ascii_uppercase();
        let found = [method.as_str(), "ANY"]
            .iter()
            .filter_map(|m| self.by_method.get(*m))
            .find_map(|router| router.at(&path).ok());
        let Some(found) = found else {
            return self.default.map(|i| (&self.specs[i], Map::new()));
        };
        let params = found
            .params
            .iter()
            .map(|(name, value)| (name.to_string(), Value::String(percent_decode(value))))
            .collect();
        Some((&self.specs[*found.value], params))
    }
}

/// API Gateway's path template in matchit's syntax: `{name}` stays, the greedy `{name+}`
/// becomes `{*name}`.
fn matchit_path(path: &str) -> String {
    let path = format!("/{}", path.trim_matches('/'));
    path.split('/')
        .map(
            |segment| match segment.strip_prefix('{').and_then(|s| s.strip_suffix("+}")) {
                Some(name) => format!("{{*{name}}}"),
                None => segment.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join("/")
}

/// `%XX` decoded; what is not valid UTF-8 afterwards becomes U+FFFD, and a `%` without
/// two hex digits stays as it is.
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
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
/// Routes that conflict (the same method and path twice, or `{a}` and `{b}` in the same
/// place) are an `InvalidInput` error.
pub async fn serve(
    addr: SocketAddr,
    routes: Vec<RouteSpec>,
    function: HttpFunction,
    function_timeout: Arc<FunctionTimeout>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let routes = Arc::new(
        Routes::new(routes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
    );
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
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

fn plain(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

async fn handle(
    req: hyper::Request<Incoming>,
    routes: &Routes,
    function: &HttpFunction,
    function_timeout: &FunctionTimeout,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let headers = req.headers().clone();
    let body = match Limited::new(req.into_body(), MAX_PAYLOAD).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(413, json!({"message": "Request Entity Too Large"})),
    };
    // API Gateway answers unknown routes itself, then refuses a bad token itself.
    let Some(route) = routes.find(&method, &path) else {
        return plain(404, json!({"message": "Not Found"}));
    };
    let authorizer = match &route.0.authorizer {
        None => None,
        Some(jwt) => match jwt.authorize(&headers) {
            Ok(context) => Some(context),
            Err(refusal) => {
                tracing::info!(method, path, %refusal, "http 401");
                return plain(401, json!({"message": "Unauthorized"}));
            }
        },
    };
    let mut event = api_gateway_event(Some(route), &method, &path, &query, &headers, &body);
    if let Some(context) = authorizer {
        event["requestContext"]["authorizer"] = context;
    }
    let request = match lambda_http::request::from_str(&event.to_string()) {
        Ok(r) => r,
        Err(e) => {
            return plain(
                500,
                json!({"message": format!("runner could not build the event: {e}")}),
            );
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
    let mut out = Response::from_parts(parts, Full::new(bytes));
    out.headers_mut().remove(hyper::header::CONTENT_LENGTH);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str) -> RouteSpec {
        RouteSpec {
            method: method.into(),
            path: path.into(),
            authorizer: None,
        }
    }

    /// The route key and parameters `method path` goes to.
    fn found(routes: &Routes, method: &str, path: &str) -> Option<(String, Map<String, Value>)> {
        routes
            .find(method, path)
            .map(|(r, params)| (r.route_key(), params))
    }

    #[test]
    fn when_a_path_matches_a_template_route_should_extract_its_parameters() {
        let routes = Routes::new(vec![route("GET", "/orders/{orderId}")]).unwrap();
        let (key, p) = found(&routes, "GET", "/orders/o%2D1").unwrap();
        assert_eq!(p["orderId"], "o-1");
        assert_eq!(key, "GET /orders/{orderId}");
        assert!(found(&routes, "POST", "/orders/o-1").is_none());
        assert!(found(&routes, "GET", "/orders").is_none());
        assert!(found(&routes, "GET", "/orders/").is_none());
        assert!(found(&routes, "GET", "/orders/o-1/items").is_none());
        // Methods match whatever their case; leading and trailing slashes do not count.
        assert_eq!(
            found(&routes, "get", "/orders/o-1/").unwrap().1["orderId"],
            "o-1"
        );
    }

    #[test]
    fn when_routes_overlap_should_pick_as_api_gateway_does() {
        let routes = Routes::new(vec![
            route("GET", "/products/{productId}"),
            route("PUT", "/products/{productId}"),
            route("GET", "/products/featured"),
            route("ANY", "/orders"),
            route("POST", "/orders"),
            route("GET", "/files/{proxy+}"),
        ])
        .unwrap();
        let key = |method, path| found(&routes, method, path).map(|(k, _)| k);
        let cases = [
            ("GET", "/products/featured", Some("GET /products/featured")),
            ("GET", "/products/p-1", Some("GET /products/{productId}")),
            (
                "PUT",
                "/products/featured",
                Some("PUT /products/{productId}"),
            ),
            ("DELETE", "/products/p-1", None),
            ("POST", "/orders", Some("POST /orders")),
            ("POST", "/orders/", Some("POST /orders")),
            ("DELETE", "/orders", Some("ANY /orders")),
            ("GET", "/files/a/b%20c", Some("GET /files/{proxy+}")),
            ("GET", "/nowhere", None),
        ];
        for (method, path, want) in cases {
            assert_eq!(key(method, path).as_deref(), want, "{method} {path}");
        }
        let (_, p) = found(&routes, "GET", "/files/a/b%20c").unwrap();
        assert_eq!(p["proxy"], "a/b c");
    }

    #[test]
    fn when_nothing_else_matches_should_take_the_default_route() {
        let routes = Routes::new(vec![route("GET", "/a/{x}"), route("ANY", "$default")]).unwrap();
        assert_eq!(found(&routes, "GET", "/a/1").unwrap().0, "GET /a/{x}");
        let (key, params) = found(&routes, "POST", "/b").unwrap();
        assert_eq!(key, "$default");
        assert!(params.is_empty());
    }

    #[test]
    fn when_routes_conflict_should_refuse_them() {
        let err = Routes::new(vec![route("GET", "/a/{x}"), route("GET", "/a/{y}")]).unwrap_err();
        assert!(err.to_string().contains("GET /a/{y}"), "{err}");
        assert!(Routes::new(vec![route("GET", "/a/{x}"), route("PUT", "/a/{y}")]).is_ok());
    }

    #[test]
    fn when_decoding_percent_escapes_should_keep_what_is_not_one() {
        let cases = [
            ("o%2D1", "o-1"),
            ("%41%62", "Ab"),
            ("100%", "100%"),
            ("%zz%4", "%zz%4"),
            ("caf%C3%A9", "café"),
            ("%FF", "\u{FFFD}"),
            ("a+b", "a+b"),
        ];
        for (raw, want) in cases {
            assert_eq!(percent_decode(raw), want, "{raw}");
        }
    }

    #[test]
    fn when_building_an_event_lambda_http_should_accept_it() {
        let r = RouteSpec {
            method: "POST".into(),
            path: "/orders".into(),
            authorizer: None,
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
