//! The order API (API Gateway HTTP API, payload format 2.0).
//!
//! - `POST /orders`: validate, price from the products (one `BatchGetItem`), write the order
//!   as PENDING, send ReserveStock and ChargePayment at once (the parallel saga), answer 202.
//!   With an `Idempotency-Key` header the key's claim is written in the same transaction as
//!   the order (see [`ApiHandler::place_order`]).
//! - `GET /orders/{orderId}`, `PUT /products/{productId}`, `GET /products/{productId}`.
//!
//! Every client mistake is a 4xx with `{"error": {"code", "message"}}` and writes nothing.

use lambda_http::http::{header, HeaderMap, Method, StatusCode};
use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{json, Value};

use crate::adapters::dynamo::StoreError;
use crate::adapters::orders::{CreateError, OrderStore};
use crate::adapters::products::ProductStore;
use crate::adapters::sqs::Publisher;
use crate::aws::AwsClients;
use crate::config::OrderApiConfig;
use crate::domain::{self, Order, PlaceOrderRequest, Product, PutProductRequest};
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::{self, ClaimRequest, Existing, IdempotencyStore};
use crate::messages::{PaymentCommand, StockCommand};

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// An error answer: status, machine-readable code, human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    fn unavailable(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "dependency failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
            "a dependency is unavailable; retry later (with the same Idempotency-Key to be safe)",
        )
    }

    pub fn into_response(self) -> Response<Body> {
        json_response(
            self.status,
            &json!({"error": {"code": self.code, "message": self.message}}),
            &[],
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::unavailable(e)
    }
}

impl From<crate::adapters::sqs::PublishError> for ApiError {
    fn from(e: crate::adapters::sqs::PublishError) -> Self {
        ApiError::unavailable(e)
    }
}

impl From<crate::faults::Crash> for ApiError {
    fn from(c: crate::faults::Crash) -> Self {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INJECTED_CRASH",
            c.to_string(),
        )
    }
}

fn json_response(status: StatusCode, body: &Value, headers: &[(&str, String)]) -> Response<Body> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    builder
        .body(Body::Text(body.to_string()))
        .expect("status and headers are valid")
}

/// Which route a request is for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    PlaceOrder,
    GetOrder(String),
    PutProduct(String),
    GetProduct(String),
}

pub struct ApiHandler {
    orders: OrderStore,
    products: ProductStore,
    idempotency: IdempotencyStore,
    publisher: Publisher,
    stock_queue_url: String,
    payment_queue_url: String,
    faults: Faults,
}

impl ApiHandler {
    pub fn new(clients: &AwsClients, config: OrderApiConfig, faults: Faults) -> Self {
        Self {
            orders: OrderStore::new(clients.dynamodb.clone(), config.orders_table),
            products: ProductStore::new(clients.dynamodb.clone(), config.products_table),
            idempotency: IdempotencyStore::new(clients.dynamodb.clone(), config.idempotency_table),
            publisher: Publisher::new(clients.sqs.clone()),
            stock_queue_url: config.stock_queue_url,
            payment_queue_url: config.payment_queue_url,
            faults,
        }
    }

    /// Handles one request. Never fails: every error is an HTTP answer.
    pub async fn handle(&self, req: Request) -> Result<Response<Body>, lambda_http::Error> {
        let response = match self.dispatch(&req).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        };
        Ok(response)
    }

    async fn dispatch(&self, req: &Request) -> Result<Response<Body>, ApiError> {
        match route(req)? {
            Route::PlaceOrder => {
                let deadline = req
                    .lambda_context_ref()
                    .map(|c| super::batch::deadline_ms(c, 10_000))
                    .unwrap_or_else(|| crate::time::now_ms() + 10_000);
                let body = json_body(req)?;
                let key = idempotency_key(req.headers())?;
                self.place_order(body, key.as_deref(), deadline).await
            }
            Route::GetOrder(id) => {
                let order = self
                    .orders
                    .get(&id)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("order {id} does not exist")))?;
                Ok(json_response(StatusCode::OK, &order.view(), &[]))
            }
            Route::PutProduct(id) => {
                let body: PutProductRequest = parse_json(json_body(req)?)?;
                body.validate()
                    .map_err(|e| ApiError::bad_request("INVALID_REQUEST", e.to_string()))?;
                let product = Product {
                    product_id: id,
                    name: body.name,
                    price_cents: body.price_cents,
                    quantity: body.quantity,
                };
                self.products.put(&product).await?;
                Ok(json_response(StatusCode::OK, &json!(product), &[]))
            }
            Route::GetProduct(id) => {
                let product =
                    self.products.get(&id).await?.ok_or_else(|| {
                        ApiError::not_found(format!("product {id} does not exist"))
                    })?;
                Ok(json_response(StatusCode::OK, &json!(product), &[]))
            }
        }
    }

    /// Places an order.
    ///
    /// Without an `Idempotency-Key` every call creates a new order. With one, the key's claim
    /// (`api#{key}`, `IN_PROGRESS`, holding the new order's id and the request's hash) is put in
    /// the same transaction as the order, so a key never exists without its order nor an
    /// order without its key. After the two messages are sent the claim becomes `COMPLETED`
    /// with the response, which later calls with the same key and body replay. A call whose
    /// key is held by a request still running gets 409; a different body, 422. If the request
    /// holding the key died between the write and the sends, its deadline passes and the next
    /// call takes the key over and finishes the same order.
    async fn place_order(
        &self,
        body: &[u8],
        key: Option<&str>,
        deadline: i64,
    ) -> Result<Response<Body>, ApiError> {
        let request: PlaceOrderRequest = parse_json(body)?;
        request
            .validate()
            .map_err(|e| ApiError::bad_request("INVALID_REQUEST", e.to_string()))?;
        let ids = request
            .items
            .iter()
            .map(|i| i.product_id.as_str())
            .collect::<Vec<_>>();
        let prices = self.products.prices(&ids).await?;
        let now = crate::time::now_ms();
        let order = domain::price_order(
            uuid::Uuid::new_v4().to_string(),
            &request,
            |id| prices.get(id).copied(),
            now,
        )
        .map_err(|e| ApiError::bad_request("UNKNOWN_PRODUCT", e.to_string()))?;

        let Some(key) = key else {
            self.orders.create(&order).await?;
            self.faults.hit(FaultPoint::AfterWrite)?;
            self.start_saga(&order).await?;
            self.faults.hit(FaultPoint::AfterPublish)?;
            return Ok(accepted(&order));
        };

        let record_key = format!("api#{key}");
        let hash = idempotency::payload_hash(&request);
        let claim = self.idempotency.claim_put(
            &ClaimRequest {
                key: &record_key,
                payload_hash: &hash,
                in_progress_until_ms: deadline,
                ttl: idempotency::API_KEY_TTL,
                take_over_expired: false,
                order_id: Some(&order.order_id),
            },
            now,
        );
        match self.orders.create_with(&order, claim).await {
            Ok(()) => self.finish(&record_key, &order).await,
            Err(CreateError::Store(e)) => Err(e.into()),
            // A concurrent request with the same key is writing right now.
            Err(CreateError::Conflict) => Err(in_progress()),
            Err(CreateError::OtherRecordExists(reason)) => {
                let existing = idempotency::existing_from_reason(&reason)?;
                match existing.classify(&hash, now) {
                    Existing::Completed(stored) => replay(&stored),
                    Existing::PayloadMismatch => Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "IDEMPOTENCY_KEY_REUSED",
                        "this Idempotency-Key was already used with a different request body",
                    )),
                    Existing::InProgress => Err(in_progress()),
                    Existing::InProgressExpired => {
                        let seen = existing.in_progress_until_ms.unwrap_or_default();
                        if !self
                            .idempotency
                            .take_over(&record_key, seen, deadline)
                            .await?
                        {
                            return Err(in_progress());
                        }
                        let order_id = existing.order_id.ok_or(StoreError::Corrupt(
                            "idempotency record without its order id".into(),
                        ))?;
                        let order =
                            self.orders
                                .get(&order_id)
                                .await?
                                .ok_or(StoreError::Corrupt(format!(
                                    "order {order_id} of an idempotency record is missing"
                                )))?;
                        if order.status != domain::OrderStatus::Pending {
                            // The sweeper already finished this order: answering is all that is left.
                            tracing::warn!(order_id, status = ?order.status, "abandoned request's order is already final; not starting its saga");
                            return self.complete_key(&record_key, &order).await;
                        }
                        tracing::warn!(
                            order_id,
                            "taking over an abandoned request; sending its messages again"
                        );
                        self.finish(&record_key, &order).await
                    }
                }
            }
        }
    }

    /// Sends the saga's first messages and completes the key with the response to replay.
    async fn finish(&self, record_key: &str, order: &Order) -> Result<Response<Body>, ApiError> {
        self.faults.hit(FaultPoint::AfterWrite)?;
        if let Err(e) = self.start_saga(order).await {
            // Let the next call with this key take over at once and finish this same order.
            self.idempotency.expire_claim(record_key).await?;
            return Err(e);
        }
        self.faults.hit(FaultPoint::AfterPublish)?;
        self.complete_key(record_key, order).await
    }

    /// Completes the key with the response that later calls replay, and answers it.
    async fn complete_key(
        &self,
        record_key: &str,
        order: &Order,
    ) -> Result<Response<Body>, ApiError> {
        let stored = json!({
            "statusCode": StatusCode::ACCEPTED.as_u16(),
            "orderId": order.order_id,
            "body": order.view(),
        });
        self.idempotency
            .complete(record_key, &stored.to_string())
            .await?;
        Ok(accepted(order))
    }

    /// ReserveStock and ChargePayment, sent at once: stock and payment run in parallel.
    async fn start_saga(&self, order: &Order) -> Result<(), ApiError> {
        let reserve = StockCommand::ReserveStock {
            order_id: order.order_id.clone(),
            items: order.stock_lines(),
        };
        let charge = PaymentCommand::ChargePayment {
            order_id: order.order_id.clone(),
            customer_id: order.customer_id.clone(),
            amount_cents: order.total_cents,
            payment_method: order.payment_method.clone(),
        };
        let (a, b) = tokio::join!(
            self.publisher.send(&self.stock_queue_url, &reserve),
            self.publisher.send(&self.payment_queue_url, &charge)
        );
        a?;
        b?;
        tracing::info!(order_id = %order.order_id, total_cents = order.total_cents, "order placed");
        Ok(())
    }
}

fn in_progress() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "IDEMPOTENCY_KEY_IN_PROGRESS",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
}

fn accepted(order: &Order) -> Response<Body> {
    crate::metrics::order_placed();
    json_response(
        StatusCode::ACCEPTED,
        &order.view(),
        &[(
            header::LOCATION.as_str(),
            format!("/orders/{}", order.order_id),
        )],
    )
}

fn replay(stored: &str) -> Result<Response<Body>, ApiError> {
    crate::metrics::idempotent_replay();
    let stored: Value = serde_json::from_str(stored)
        .map_err(|e| StoreError::Corrupt(format!("stored response is unreadable: {e}")))?;
    let status = stored["statusCode"]
        .as_u64()
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::ACCEPTED);
    let order_id = stored["orderId"].as_str().unwrap_or_default();
    Ok(json_response(
        status,
        &stored["body"],
        &[
            (header::LOCATION.as_str(), format!("/orders/{order_id}")),
            ("idempotent-replayed", "true".into()),
        ],
    ))
}

/// The route of a request: from API Gateway's route key and path parameters when present,
/// else from the path itself (tolerating a stage prefix such as `/dev`).
fn route(req: &Request) -> Result<Route, ApiError> {
    let path = req.raw_http_path();
    let path = if path.is_empty() {
        req.uri().path()
    } else {
        path
    };
    let segments = path.trim_matches('/').split('/').collect::<Vec<_>>();
    let params = req.path_parameters();
    let param = |name: &str, raw: &str| -> Result<String, ApiError> {
        let value = params.first(name).unwrap_or(raw).to_string();
        domain::validate_id(name, &value)
            .map_err(|e| ApiError::bad_request("INVALID_ID", e.to_string()))?;
        Ok(value)
    };
    let method = req.method();
    let (allowed, route) = match segments.as_slice() {
        [.., "products", id] => (
            "GET, PUT",
            match *method {
                Method::GET => Some(param("productId", id).map(Route::GetProduct)),
                Method::PUT => Some(param("productId", id).map(Route::PutProduct)),
                _ => None,
            },
        ),
        [.., "orders", id] => (
            "GET",
            (method == Method::GET).then(|| param("orderId", id).map(Route::GetOrder)),
        ),
        [.., "orders"] => (
            "POST",
            (method == Method::POST).then_some(Ok(Route::PlaceOrder)),
        ),
        _ => {
            let route_key = match req.request_context_ref() {
                Some(RequestContext::ApiGatewayV2(ctx)) => {
                    ctx.route_key.clone().unwrap_or_default()
                }
                _ => String::new(),
            };
            return Err(ApiError::not_found(
                format!("no route for {method} {path} {route_key}")
                    .trim_end()
                    .to_string(),
            ));
        }
    };
    route.unwrap_or_else(|| {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!("{method} is not allowed here; allowed: {allowed}"),
        ))
    })
}

/// The request body, checked for size and content type.
fn json_body(req: &Request) -> Result<&[u8], ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or_default().trim();
        if mime != "application/json" && !mime.ends_with("+json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                format!("Content-Type must be application/json, not {mime:?}"),
            ));
        }
    }
    let body: &[u8] = req.body().as_ref();
    if body.len() > domain::MAX_BODY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!(
                "request body must be at most {} bytes",
                domain::MAX_BODY_BYTES
            ),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "MALFORMED_JSON",
            "request body is empty; a JSON object is expected",
        ));
    }
    Ok(body)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<domain::ObjectOnly<T>>(body)
        .map(|o| o.0)
        .map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
                    "MALFORMED_JSON",
                    format!("request body is not valid JSON: {e}"),
                ),
                Category::Data => ApiError::bad_request("INVALID_REQUEST", e.to_string()),
            }
        })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default();
    // The draft's sf-string may be quoted; the quotes are not part of the key.
    let key = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .unwrap_or(key);
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY_LEN
        || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(ApiError::bad_request(
            "INVALID_IDEMPOTENCY_KEY",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters"
            ),
        ));
    }
    Ok(Some(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str) -> Request {
        lambda_http::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::Empty)
            .unwrap()
    }

    #[test]
    fn when_routing_should_tolerate_a_stage_prefix_and_refuse_bad_ids() {
        assert_eq!(
            route(&request("POST", "/orders")).unwrap(),
            Route::PlaceOrder
        );
        assert_eq!(
            route(&request("GET", "/dev/orders/o-1")).unwrap(),
            Route::GetOrder("o-1".into())
        );
        assert_eq!(
            route(&request("PUT", "/products/p-1")).unwrap(),
            Route::PutProduct("p-1".into())
        );
        assert_eq!(
            route(&request("DELETE", "/products/p-1"))
                .unwrap_err()
                .status,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&request("GET", "/nope")).unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&request("GET", "/orders/a%01b")).unwrap_err().code,
            "INVALID_ID"
        );
    }

    #[test]
    fn when_idempotency_key_is_malformed_should_refuse_it() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(&h).unwrap(), None);
        h.insert(IDEMPOTENCY_KEY_HEADER, "\"abc-1\"".parse().unwrap());
        assert_eq!(idempotency_key(&h).unwrap().as_deref(), Some("abc-1"));
        h.insert(IDEMPOTENCY_KEY_HEADER, "a b".parse().unwrap());
        assert!(idempotency_key(&h).is_err());
        h.insert(IDEMPOTENCY_KEY_HEADER, "x".repeat(256).parse().unwrap());
        assert!(idempotency_key(&h).is_err());
    }

    #[test]
    fn when_body_is_not_json_should_say_which_kind_of_error() {
        assert_eq!(
            parse_json::<PlaceOrderRequest>(b"{").unwrap_err().code,
            "MALFORMED_JSON"
        );
        let err =
            parse_json::<PlaceOrderRequest>(br#"{"customerId": 1, "items": []}"#).unwrap_err();
        assert_eq!(err.code, "INVALID_REQUEST");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err = parse_json::<PlaceOrderRequest>(br#"{"customerId":"c","items":[],"extra":1}"#)
            .unwrap_err();
        assert!(err.message.contains("unknown field"), "{}", err.message);
    }
}
