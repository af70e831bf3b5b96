//! The order API (API Gateway HTTP API, payload format 2.0).
//!
//! - `POST /orders`: validate, price from the products (one `BatchGetItem`), write the order
//!   as PENDING, send ReserveStock and ChargePayment at once (the parallel saga), answer 202.
//!   With an `Idempotency-Key` header the key's claim is written in the same transaction as
//!   the order (see [`ApiHandler::place_order`]).
//! - `GET /orders/{orderId}`, `PUT /products/{productId}`, `GET /products/{productId}`.
//!
//! Every client mistake is a 4xx with `{"error": {"code", "message"}}` and writes nothing.

use lambda_http::http::{HeaderMap, StatusCode, header};
use lambda_http::request::RequestContext;
use lambda_http::{Body, Request, RequestExt, Response};
use serde_json::{Value, json};

use super::Function;
use crate::adapters::dynamo::StoreError;
use crate::adapters::orders::DynamoOrders;
use crate::adapters::products::DynamoProducts;
use crate::adapters::sqs::SqsPublisher;
use crate::aws::AwsClients;
use crate::config::{ConfigError, Lookup, OrderApiConfig};
use crate::domain::{self, Order, PlaceOrderRequest, Product, PutProductRequest};
use crate::faults::{FaultPoint, Faults};
use crate::idempotency::dynamo::DynamoIdempotency;
use crate::idempotency::{self, Claim, ClaimRequest, Existing, Idempotency, StepKey};
use crate::messages::{PaymentCommand, StockCommand};
use crate::ports::{CreateError, Orders, Products, Publish};

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
    fn from(crash: crate::faults::Crash) -> Self {
        #[cfg(feature = "fault-injection")]
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INJECTED_CRASH",
            crash.to_string(),
        );
        #[cfg(not(feature = "fault-injection"))]
        match crash {}
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

pub struct ApiHandler<O = DynamoOrders, R = DynamoProducts, I = DynamoIdempotency, P = SqsPublisher>
{
    orders: O,
    products: R,
    idempotency: I,
    publisher: P,
    stock_queue_url: String,
    payment_queue_url: String,
    faults: Faults,
}

impl ApiHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: OrderApiConfig, faults: Faults) -> Self {
        let idempotency =
            DynamoIdempotency::new(clients.dynamodb.clone(), config.idempotency_table);
        Self::with_ports(
            DynamoOrders::new(clients.dynamodb.clone(), config.orders_table)
                .with_idempotency(idempotency.clone()),
            DynamoProducts::new(clients.dynamodb.clone(), config.products_table),
            idempotency,
            SqsPublisher::new(clients.sqs.clone()),
            config.stock_queue_url,
            config.payment_queue_url,
            faults,
        )
    }
}

impl Function for ApiHandler {
    fn from_env(
        clients: &AwsClients,
        env: &impl Lookup,
        faults: Faults,
    ) -> Result<Self, ConfigError> {
        Ok(Self::new(clients, OrderApiConfig::load(env)?, faults))
    }
}

impl<O: Orders, R: Products, I: Idempotency, P: Publish> ApiHandler<O, R, I, P> {
    pub fn with_ports(
        orders: O,
        products: R,
        idempotency: I,
        publisher: P,
        stock_queue_url: String,
        payment_queue_url: String,
        faults: Faults,
    ) -> Self {
        Self {
            orders,
            products,
            idempotency,
            publisher,
            stock_queue_url,
            payment_queue_url,
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
                let deadline = crate::time::deadline_ms(
                    req.lambda_context_ref().map_or(0, |c| c.deadline),
                    10_000,
                );
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

        let record_key = StepKey::Api(key);
        let hash = idempotency::payload_hash(&request);
        let claim = ClaimRequest {
            key: record_key,
            payload_hash: &hash,
            in_progress_until_ms: deadline,
            ttl: idempotency::API_KEY_TTL,
            take_over_expired: false,
            order_id: Some(&order.order_id),
        };
        let existing = match self.orders.create_claimed(&order, &claim, now).await {
            Ok(Claim::Acquired) => return self.finish(record_key, &order).await,
            Ok(Claim::Existing(existing)) => existing,
            Err(CreateError::Store(e)) => return Err(e.into()),
            // A concurrent request with the same key is writing right now.
            Err(CreateError::Conflict) => return Err(in_progress()),
        };
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
                    .take_over(record_key, seen, deadline)
                    .await?
                {
                    return Err(in_progress());
                }
                let order_id = existing.order_id.ok_or(StoreError::Corrupt(
                    "idempotency record without its order id".into(),
                ))?;
                let order = self
                    .orders
                    .get(&order_id)
                    .await?
                    .ok_or(StoreError::Corrupt(format!(
                        "order {order_id} of an idempotency record is missing"
                    )))?;
                if order.status != domain::OrderStatus::Pending {
                    // The sweeper already finished this order: answering is all that is left.
                    tracing::warn!(order_id, status = ?order.status, "abandoned request's order is already final; not starting its saga");
                    return self.complete_key(record_key, &order).await;
                }
                tracing::warn!(
                    order_id,
                    "taking over an abandoned request; sending its messages again"
                );
                self.finish(record_key, &order).await
            }
        }
    }

    /// Sends the saga's first messages and completes the key with the response to replay.
    async fn finish(
        &self,
        record_key: StepKey<'_>,
        order: &Order,
    ) -> Result<Response<Body>, ApiError> {
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
        record_key: StepKey<'_>,
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

/// The routes this function serves, as API Gateway route keys (`template.yaml` declares the
/// same ones on the function's `HttpApi` events).
pub const ROUTES: [&str; 4] = [
    "POST /orders",
    "GET /orders/{orderId}",
    "PUT /products/{productId}",
    "GET /products/{productId}",
];

/// The route of a request, from the route key API Gateway matched and the path parameters it
/// extracted: the gateway routes, the handler does not parse paths again.
fn route(req: &Request) -> Result<Route, ApiError> {
    let route_key = match req.request_context_ref() {
        Some(RequestContext::ApiGatewayV2(ctx)) => ctx.route_key.as_deref().unwrap_or_default(),
        _ => "",
    };
    let params = req.path_parameters();
    let id = |name: &str| -> Result<String, ApiError> {
        let value = params.first(name).unwrap_or_default().to_string();
        domain::validate_id(name, &value)
            .map_err(|e| ApiError::bad_request("INVALID_ID", e.to_string()))?;
        Ok(value)
    };
    match ROUTES.iter().position(|r| *r == route_key) {
        Some(0) => Ok(Route::PlaceOrder),
        Some(1) => id("orderId").map(Route::GetOrder),
        Some(2) => id("productId").map(Route::PutProduct),
        Some(3) => id("productId").map(Route::GetProduct),
        _ => Err(ApiError::not_found(
            format!(
                "no route for {} {} {route_key}",
                req.method(),
                req.uri().path()
            )
            .trim_end()
            .to_string(),
        )),
    }
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

    /// A request as API Gateway hands it over: the matched route key and path parameters.
    fn request(route_key: &str, params: &[(&str, &str)]) -> Request {
        let (method, path) = route_key.split_once(' ').unwrap();
        let mut ctx = aws_lambda_events::apigw::ApiGatewayV2httpRequestContext::default();
        ctx.route_key = Some(route_key.to_string());
        lambda_http::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::Empty)
            .unwrap()
            .with_request_context(RequestContext::ApiGatewayV2(ctx))
            .with_path_parameters(
                params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::HashMap<_, _>>(),
            )
    }

    #[test]
    fn when_routing_should_follow_the_gateways_route_key_and_refuse_bad_ids() {
        assert_eq!(
            route(&request("POST /orders", &[])).unwrap(),
            Route::PlaceOrder
        );
        assert_eq!(
            route(&request("GET /orders/{orderId}", &[("orderId", "o-1")])).unwrap(),
            Route::GetOrder("o-1".into())
        );
        assert_eq!(
            route(&request(
                "PUT /products/{productId}",
                &[("productId", "p-1")]
            ))
            .unwrap(),
            Route::PutProduct("p-1".into())
        );
        assert_eq!(
            route(&request(
                "GET /products/{productId}",
                &[("productId", "p-1")]
            ))
            .unwrap(),
            Route::GetProduct("p-1".into())
        );
        assert_eq!(
            route(&request(
                "DELETE /products/{productId}",
                &[("productId", "p-1")]
            ))
            .unwrap_err()
            .status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&request("GET /nope", &[])).unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&request("GET /orders/{orderId}", &[("orderId", "a\u{1}b")]))
                .unwrap_err()
                .code,
            "INVALID_ID"
        );
        assert_eq!(
            route(&request("GET /orders/{orderId}", &[]))
                .unwrap_err()
                .code,
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

    mod with_memory_ports {
        use super::*;
        use crate::adapters::memory::{MemoryQueues, MemoryStore};

        type Handler = ApiHandler<MemoryStore, MemoryStore, MemoryStore, MemoryQueues>;

        fn handler() -> (Handler, MemoryStore, MemoryQueues) {
            let store = MemoryStore::default();
            let queues = MemoryQueues::default();
            store.add_product("p-1", 250, 5);
            let h = ApiHandler::with_ports(
                store.clone(),
                store.clone(),
                store.clone(),
                queues.clone(),
                "stock".into(),
                "payment".into(),
                Faults::none(),
            );
            (h, store, queues)
        }

        fn place(body: Value, key: Option<&str>) -> Request {
            let mut req = request("POST /orders", &[]);
            *req.body_mut() = Body::Text(body.to_string());
            req.headers_mut()
                .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            if let Some(key) = key {
                req.headers_mut()
                    .insert(IDEMPOTENCY_KEY_HEADER, key.parse().unwrap());
            }
            req
        }

        fn order_body(quantity: u64) -> Value {
            json!({"customerId": "c-1", "items": [{"productId": "p-1", "quantity": quantity}]})
        }

        async fn call(h: &Handler, req: Request) -> (StatusCode, Value, HeaderMap) {
            let response = h.handle(req).await.unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let body = serde_json::from_slice(response.body().as_ref()).unwrap();
            (status, body, headers)
        }

        #[tokio::test]
        async fn when_placing_an_order_should_write_it_and_start_both_steps() {
            let (h, store, queues) = handler();
            let (status, body, headers) = call(&h, place(order_body(2), None)).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            assert_eq!(body["totalCents"], 500);
            assert_eq!(body["status"], "PENDING");
            let id = body["orderId"].as_str().unwrap();
            assert_eq!(headers[header::LOCATION], format!("/orders/{id}").as_str());
            assert_eq!(store.order(id).unwrap().total_cents, 500);
            assert_eq!(queues.sent("stock")[0]["type"], "ReserveStock");
            assert_eq!(queues.sent("payment")[0]["amountCents"], 500);
            let (status, got, _) =
                call(&h, request("GET /orders/{orderId}", &[("orderId", id)])).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got, body);
        }

        #[tokio::test]
        async fn when_a_key_is_reused_should_replay_the_same_body_and_refuse_another() {
            let (h, store, queues) = handler();
            let (_, first, _) = call(&h, place(order_body(1), Some("k-1"))).await;
            let (status, again, headers) = call(&h, place(order_body(1), Some("k-1"))).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            assert_eq!(again, first);
            assert_eq!(headers["idempotent-replayed"], "true");
            let (status, body, _) = call(&h, place(order_body(2), Some("k-1"))).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(body["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
            assert_eq!(store.orders().len(), 1);
            assert_eq!(queues.sent("stock").len(), 1);
        }

        #[tokio::test]
        async fn when_the_sends_fail_should_let_the_retry_finish_the_same_order() {
            let (h, store, queues) = handler();
            queues.refuse_next(1);
            let (status, body, _) = call(&h, place(order_body(1), Some("k-2"))).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(body["error"]["code"], "SERVICE_UNAVAILABLE");
            let (status, body, _) = call(&h, place(order_body(1), Some("k-2"))).await;
            assert_eq!(status, StatusCode::ACCEPTED);
            let orders = store.orders();
            assert_eq!(orders.len(), 1, "the retry finished the first order");
            assert_eq!(body["orderId"], orders[0].order_id.as_str());
            // One of the first two sends may have gone out; the downstream steps are keyed on
            // the order, so a second copy of the same command is harmless.
            for queue in ["stock", "payment"] {
                let sent = queues.sent(queue);
                assert!(!sent.is_empty());
                assert!(sent.iter().all(|m| m["orderId"] == body["orderId"]));
            }
        }

        #[tokio::test]
        async fn when_the_request_is_wrong_should_answer_4xx_and_write_nothing() {
            let (h, store, queues) = handler();
            let unknown =
                json!({"customerId": "c-1", "items": [{"productId": "p-9", "quantity": 1}]});
            let (status, body, _) = call(&h, place(unknown, None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["code"], "UNKNOWN_PRODUCT");
            let (status, body, _) = call(&h, place(order_body(0), None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["code"], "INVALID_REQUEST");
            let (status, _, _) = call(
                &h,
                request("GET /orders/{orderId}", &[("orderId", "o-404")]),
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(store.orders().is_empty());
            assert!(queues.sent("stock").is_empty());
        }

        #[tokio::test]
        async fn when_an_operator_puts_a_product_should_store_it() {
            let (h, store, _) = handler();
            let mut req = request("PUT /products/{productId}", &[("productId", "p-2")]);
            *req.body_mut() =
                Body::Text(json!({"name": "Mug", "priceCents": 900, "quantity": 7}).to_string());
            let (status, body, _) = call(&h, req).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["productId"], "p-2");
            assert_eq!(store.quantity("p-2"), Some(7));
            let (_, got, _) = call(
                &h,
                request("GET /products/{productId}", &[("productId", "p-2")]),
            )
            .await;
            assert_eq!(got, body);
        }
    }
}
