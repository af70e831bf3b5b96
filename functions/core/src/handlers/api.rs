//! The order API (API Gateway HTTP API, payload format 2.0).
//!
//! - `POST /orders`: validate, price from the products (one `BatchGetItem`), write the order
//!   as PENDING, send ReserveStock and ChargePayment at once (the parallel saga), answer 202.
//!   With an `Idempotency-Key` header the key's claim is written in the same transaction as
//!   the order (see [`ApiHandler::place_order`]).
//! - `GET /orders`: the caller's own orders, newest first, paged (`?limit=`, `nextToken`).
//! - `GET /orders/{orderId}`: the caller's order (any order for an operator); 404 otherwise.
//! - `PUT /products/{productId}`: operators only (403 for anyone else).
//! - `GET /products/{productId}`: public (the template routes it without the authorizer).
//!
//! Who calls comes from the claims API Gateway's JWT authorizer verified
//! ([`crate::identity`]): the customer of an order is the token's `sub`, never the body.
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
use crate::identity::{AccessPolicy, Caller};
use crate::messages::{PaymentCommand, StockCommand};
use crate::ports::{CreateError, OrderCursor, Orders, Products, Publish};

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// `GET /orders` answers this many orders per page unless `?limit=` says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 20;
/// The largest `?limit=` of `GET /orders`.
pub const MAX_PAGE_SIZE: usize = 100;

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

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message)
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "FORBIDDEN", message)
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
        let challenge = [(header::WWW_AUTHENTICATE.as_str(), "Bearer".to_string())];
        let headers: &[(&str, String)] = if self.status == StatusCode::UNAUTHORIZED {
            &challenge
        } else {
            &[]
        };
        json_response(
            self.status,
            &json!({"error": {"code": self.code, "message": self.message}}),
            headers,
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
    ListOrders,
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
    access: AccessPolicy,
}

impl ApiHandler {
    /// The handler on DynamoDB and SQS.
    pub fn new(clients: &AwsClients, config: OrderApiConfig, faults: Faults) -> Self {
        let idempotency =
            DynamoIdempotency::new(clients.dynamodb.clone(), config.idempotency_table);
        Self::with_ports(
            DynamoOrders::new(clients.dynamodb.clone(), config.orders_table)
                .with_customer_index(config.customer_index)
                .with_idempotency(idempotency.clone()),
            DynamoProducts::new(clients.dynamodb.clone(), config.products_table),
            idempotency,
            SqsPublisher::new(clients.sqs.clone()),
            config.stock_queue_url,
            config.payment_queue_url,
            faults,
        )
        .with_access(config.access)
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
            access: AccessPolicy::default(),
        }
    }

    /// Which claim and group make a caller an operator (Cognito's by default).
    pub fn with_access(mut self, access: AccessPolicy) -> Self {
        self.access = access;
        self
    }

    /// The signed-in caller, from the claims the gateway's JWT authorizer verified.
    fn caller(&self, req: &Request) -> Result<Caller, ApiError> {
        let claims = match req.request_context_ref() {
            Some(RequestContext::ApiGatewayV2(ctx)) => ctx
                .authorizer
                .as_ref()
                .and_then(|a| a.jwt.as_ref())
                .map(|jwt| &jwt.claims),
            _ => None,
        };
        self.access.caller(claims).map_err(|e| {
            tracing::error!(error = %e, "request without a verified caller refused");
            ApiError::unauthorized(e.to_string())
        })
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
        let route = route(req)?;
        // The catalogue is public (`PUBLIC_ROUTES`); every other route needs a signed-in caller.
        if let Route::GetProduct(id) = &route {
            return self.get_product(id).await;
        }
        let caller = self.caller(req)?;
        match route {
            Route::PlaceOrder => {
                let deadline = crate::time::deadline_ms(
                    req.lambda_context_ref().map_or(0, |c| c.deadline),
                    10_000,
                );
                let body = json_body(req)?;
                let key = idempotency_key(req.headers())?;
                self.place_order(&caller, body, key.as_deref(), deadline)
                    .await
            }
            Route::ListOrders => self.list_orders(&caller, req).await,
            Route::GetOrder(id) => {
                // Someone else's order is answered exactly as one that does not exist, so the
                // answer never tells that it does.
                let order = (self.orders.get(&id).await?)
                    .filter(|o| caller.operator || o.customer_id == caller.subject)
                    .ok_or_else(|| ApiError::not_found(format!("order {id} does not exist")))?;
                Ok(json_response(StatusCode::OK, &order.view(), &[]))
            }
            Route::PutProduct(id) => {
                if !caller.operator {
                    return Err(ApiError::forbidden("only operators may change products"));
                }
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
            Route::GetProduct(id) => self.get_product(&id).await,
        }
    }

    async fn get_product(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let product = (self.products.get(id).await?)
            .ok_or_else(|| ApiError::not_found(format!("product {id} does not exist")))?;
        Ok(json_response(StatusCode::OK, &json!(product), &[]))
    }

    /// `GET /orders`: one page of the caller's orders, newest first.
    async fn list_orders(
        &self,
        caller: &Caller,
        req: &Request,
    ) -> Result<Response<Body>, ApiError> {
        let query = req.query_string_parameters();
        let limit = match query.first("limit") {
            None => DEFAULT_PAGE_SIZE,
            Some(raw) => raw
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "INVALID_LIMIT",
                        format!("limit must be a whole number from 1 to {MAX_PAGE_SIZE}"),
                    )
                })?,
        };
        let after = query
            .first("nextToken")
            .map(|token| PageToken::decode(token, &caller.subject))
            .transpose()?;
        let page = self
            .orders
            .customer_orders(&caller.subject, limit, after.as_ref())
            .await?;
        let mut body = json!({
            "orders": page.orders.iter().map(|o| o.view()).collect::<Vec<_>>(),
        });
        if let Some(next) = page.next {
            body["nextToken"] = json!(PageToken::encode(&caller.subject, next));
        }
        Ok(json_response(StatusCode::OK, &body, &[]))
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
        caller: &Caller,
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
            &caller.subject,
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

        let record_key = StepKey::Api {
            customer: &caller.subject,
            key,
        };
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
pub const ROUTES: [&str; 5] = [
    "POST /orders",
    "GET /orders",
    "GET /orders/{orderId}",
    "PUT /products/{productId}",
    "GET /products/{productId}",
];

/// The routes that need no token: reading the catalogue (shoppers browse before they sign
/// in). The template leaves exactly these without the JWT authorizer.
pub const PUBLIC_ROUTES: [&str; 1] = ["GET /products/{productId}"];

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
        Some(1) => Ok(Route::ListOrders),
        Some(2) => id("orderId").map(Route::GetOrder),
        Some(3) => id("productId").map(Route::PutProduct),
        Some(4) => id("productId").map(Route::GetProduct),
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

/// `nextToken` of `GET /orders`: where the next page starts, for whom. Opaque to clients
/// (base64url of JSON); a token made for another caller, or not made here, is a 400.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PageToken {
    customer_id: String,
    created_at_ms: i64,
    order_id: String,
}

impl PageToken {
    fn encode(customer_id: &str, after: OrderCursor) -> String {
        use base64::Engine;
        let token = PageToken {
            customer_id: customer_id.to_string(),
            created_at_ms: after.created_at_ms,
            order_id: after.order_id,
        };
        let json = serde_json::to_vec(&token).expect("a page token serializes");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    fn decode(token: &str, customer_id: &str) -> Result<OrderCursor, ApiError> {
        use base64::Engine;
        let invalid = || {
            ApiError::bad_request(
                "INVALID_NEXT_TOKEN",
                "nextToken is not one this API returned to this caller",
            )
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| invalid())?;
        let token: PageToken = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
        if token.customer_id != customer_id
            || domain::validate_id("orderId", &token.order_id).is_err()
        {
            return Err(invalid());
        }
        Ok(OrderCursor {
            created_at_ms: token.created_at_ms,
            order_id: token.order_id,
        })
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

    /// `req` as the gateway hands it over once its JWT authorizer verified a token of `sub`
    /// (in `groups`): the claims as strings, an array as `[a b]`.
    fn signed_in(req: Request, sub: &str, groups: &[&str]) -> Request {
        use aws_lambda_events::apigw::{
            ApiGatewayRequestAuthorizer, ApiGatewayRequestAuthorizerJwtDescription,
        };
        let Some(RequestContext::ApiGatewayV2(mut ctx)) = req.request_context_ref().cloned() else {
            panic!("an API Gateway v2 request");
        };
        let mut jwt = ApiGatewayRequestAuthorizerJwtDescription::default();
        jwt.claims.insert("sub".into(), sub.into());
        jwt.claims.insert("token_use".into(), "access".into());
        if !groups.is_empty() {
            jwt.claims
                .insert("cognito:groups".into(), format!("[{}]", groups.join(" ")));
        }
        let mut authorizer = ApiGatewayRequestAuthorizer::default();
        authorizer.jwt = Some(jwt);
        ctx.authorizer = Some(authorizer);
        req.with_request_context(RequestContext::ApiGatewayV2(ctx))
    }

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
        let err = parse_json::<PlaceOrderRequest>(br#"{"items": 1}"#).unwrap_err();
        assert_eq!(err.code, "INVALID_REQUEST");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        let err = parse_json::<PlaceOrderRequest>(br#"{"items":[],"extra":1}"#).unwrap_err();
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

        /// `POST /orders` by customer `c-1`.
        fn place(body: Value, key: Option<&str>) -> Request {
            place_as("c-1", body, key)
        }

        fn place_as(customer: &str, body: Value, key: Option<&str>) -> Request {
            let mut req = signed_in(request("POST /orders", &[]), customer, &[]);
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
            json!({"items": [{"productId": "p-1", "quantity": quantity}]})
        }

        fn get_order(id: &str, caller: &str, groups: &[&str]) -> Request {
            signed_in(
                request("GET /orders/{orderId}", &[("orderId", id)]),
                caller,
                groups,
            )
        }

        fn list_orders(caller: &str, query: &[(&str, &str)]) -> Request {
            let req = signed_in(request("GET /orders", &[]), caller, &[]);
            req.with_query_string_parameters(
                query
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<std::collections::HashMap<_, _>>(),
            )
        }

        fn put_product(id: &str, caller: &str, groups: &[&str], body: Value) -> Request {
            let mut req = request("PUT /products/{productId}", &[("productId", id)]);
            *req.body_mut() = Body::Text(body.to_string());
            signed_in(req, caller, groups)
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
            assert_eq!(body["customerId"], "c-1", "the customer is the token's sub");
            assert_eq!(queues.sent("payment")[0]["customerId"], "c-1");
            let (status, got, _) = call(&h, get_order(id, "c-1", &[])).await;
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
            let unknown = json!({"items": [{"productId": "p-9", "quantity": 1}]});
            let (status, body, _) = call(&h, place(unknown, None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["code"], "UNKNOWN_PRODUCT");
            let (status, body, _) = call(&h, place(order_body(0), None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["code"], "INVALID_REQUEST");
            let someone_else =
                json!({"customerId": "c-2", "items": [{"productId": "p-1", "quantity": 1}]});
            let (status, body, _) = call(&h, place(someone_else, None)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("customerId"),
                "{body}"
            );
            let (status, _, _) = call(&h, get_order("o-404", "c-1", &[])).await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            assert!(store.orders().is_empty());
            assert!(queues.sent("stock").is_empty());
        }

        #[tokio::test]
        async fn when_an_operator_puts_a_product_should_store_it() {
            let (h, store, _) = handler();
            let mug = json!({"name": "Mug", "priceCents": 900, "quantity": 7});
            let (status, body, _) = call(&h, put_product("p-2", "op-1", &["operators"], mug)).await;
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

        #[tokio::test]
        async fn when_no_verified_caller_should_answer_401_and_write_nothing() {
            let (h, store, queues) = handler();
            let mut anonymous = request("POST /orders", &[]);
            *anonymous.body_mut() = Body::Text(order_body(1).to_string());
            let response = h.handle(anonymous).await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
            let body: Value = serde_json::from_slice(response.body().as_ref()).unwrap();
            assert_eq!(body["error"]["code"], "UNAUTHORIZED");
            for route in [
                "GET /orders",
                "GET /orders/{orderId}",
                "PUT /products/{productId}",
            ] {
                let req = request(route, &[("orderId", "o-1"), ("productId", "p-1")]);
                let (status, _, _) = call(&h, req).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{route}");
            }
            assert!(store.orders().is_empty());
            assert!(queues.sent("stock").is_empty());
            // The catalogue is public.
            let (status, product, _) = call(
                &h,
                request("GET /products/{productId}", &[("productId", "p-1")]),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(product["priceCents"], 250);
        }

        #[tokio::test]
        async fn when_a_customer_asks_for_someone_elses_order_should_answer_as_if_it_did_not_exist()
        {
            let (h, _, _) = handler();
            let (_, placed, _) = call(&h, place_as("alice", order_body(1), None)).await;
            let id = placed["orderId"].as_str().unwrap();
            let (status, theirs, _) = call(&h, get_order(id, "bob", &[])).await;
            let (missing_status, missing, _) = call(&h, get_order("o-none", "bob", &[])).await;
            assert_eq!(
                (status, missing_status),
                (StatusCode::NOT_FOUND, StatusCode::NOT_FOUND)
            );
            assert_eq!(
                theirs["error"]["message"]
                    .as_str()
                    .unwrap()
                    .replace(id, "X"),
                missing["error"]["message"]
                    .as_str()
                    .unwrap()
                    .replace("o-none", "X"),
                "the answer does not tell that the order exists"
            );
            let (status, _, _) = call(&h, get_order(id, "bob", &["operators"])).await;
            assert_eq!(status, StatusCode::OK, "operators read any order");
            let (status, got, _) = call(&h, get_order(id, "alice", &[])).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got, placed);
        }

        #[tokio::test]
        async fn when_a_customer_changes_a_product_should_answer_403_and_change_nothing() {
            let (h, store, _) = handler();
            let free = json!({"name": "Mug", "priceCents": 0, "quantity": 1_000_000});
            let (status, body, _) = call(&h, put_product("p-1", "alice", &["admins"], free)).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(body["error"]["code"], "FORBIDDEN");
            assert_eq!(store.quantity("p-1"), Some(5));
        }

        #[tokio::test]
        async fn when_two_customers_send_one_idempotency_key_should_give_each_their_own_order() {
            let (h, store, _) = handler();
            let (a_status, a, _) = call(&h, place_as("alice", order_body(1), Some("k-1"))).await;
            let (b_status, b, headers) =
                call(&h, place_as("bob", order_body(1), Some("k-1"))).await;
            assert_eq!(
                (a_status, b_status),
                (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
            );
            assert_ne!(a["orderId"], b["orderId"]);
            assert!(!headers.contains_key("idempotent-replayed"));
            assert_eq!(
                (a["customerId"].as_str(), b["customerId"].as_str()),
                (Some("alice"), Some("bob"))
            );
            assert_eq!(store.orders().len(), 2);
            let (_, again, headers) = call(&h, place_as("bob", order_body(1), Some("k-1"))).await;
            assert_eq!(again, b, "each replays their own");
            assert_eq!(headers["idempotent-replayed"], "true");
        }

        #[tokio::test]
        async fn when_listing_orders_should_page_through_the_callers_own_newest_first() {
            let (h, store, _) = handler();
            // Five of alice's orders, two of them created in the same millisecond, and bob's.
            let order_of = |customer: &str, id: &str, at: i64| {
                let mut order = crate::handlers::testing::order(id, 1, at);
                order.customer_id = customer.into();
                order
            };
            for (i, at) in [10, 20, 20, 30, 40].into_iter().enumerate() {
                let order = order_of("alice", &format!("o-a{i}"), at);
                store.create(&order).await.unwrap();
            }
            store.create(&order_of("bob", "o-b", 25)).await.unwrap();
            let mut seen = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut query = vec![("limit", "2")];
                if let Some(t) = &token {
                    query.push(("nextToken", t.as_str()));
                }
                let (status, page, _) = call(&h, list_orders("alice", &query)).await;
                assert_eq!(status, StatusCode::OK, "{page}");
                let ids: Vec<String> = page["orders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|o| o["orderId"].as_str().unwrap().to_string())
                    .collect();
                assert!(ids.len() <= 2);
                seen.extend(ids);
                match page.get("nextToken") {
                    Some(t) => token = Some(t.as_str().unwrap().to_string()),
                    None => break,
                }
            }
            assert_eq!(seen, ["o-a4", "o-a3", "o-a2", "o-a1", "o-a0"]);
            // Bob cannot walk alice's list with her token, and nonsense is refused.
            let (_, first, _) = call(&h, list_orders("alice", &[("limit", "1")])).await;
            let alices = first["nextToken"].as_str().unwrap();
            for (caller, query) in [
                ("bob", vec![("nextToken", alices)]),
                ("alice", vec![("nextToken", "not-a-token")]),
                ("alice", vec![("limit", "0")]),
                ("alice", vec![("limit", "101")]),
                ("alice", vec![("limit", "ten")]),
            ] {
                let (status, body, _) = call(&h, list_orders(caller, &query)).await;
                assert_eq!(
                    status,
                    StatusCode::BAD_REQUEST,
                    "{caller} {query:?}: {body}"
                );
            }
            let (_, bobs, _) = call(&h, list_orders("bob", &[])).await;
            assert_eq!(bobs["orders"].as_array().unwrap().len(), 1);
            assert_eq!(bobs["orders"][0]["orderId"], "o-b");
            assert!(bobs.get("nextToken").is_none());
        }
    }
}
