//! The order API (API Gateway HTTP API, payload format 2.0).
//!
//! - `POST /orders`: validate, price from the products (one `BatchGetItem`), write the order
//!   as PENDING, send ReserveStock and ChargePayment at once (the parallel saga), answer 202.
//!   With an `Idempotency-Key` header the key's claim is written in the same transaction as
//!   the order (see [`ApiHandler::place_order`]).
//! - `GET /orders`: the caller's own orders, newest first, paged (`?limit=`, `nextToken`).
//! - `GET /orders/{orderId}`: the caller's order (any order for an operator); 404 otherwise.
//! - `PUT /products/{productId}`: operators only (403 for anyone else). Creates a product with
//!   its initial stock, or changes an existing one's name and price (never its stock; a
//!   `quantity` for an existing product is a 409). `If-Match` makes the change conditional on
//!   the product's `ETag` (412 when it no longer matches).
//! - `GET /products/{productId}`: public (the template routes it without the authorizer), with
//!   the product's `ETag` (of its catalogue fields: stock changes leave it alone).
//! - `POST /products/{productId}/stock-adjustments`: operators only; the one way stock changes
//!   outside the saga, each change recorded as a stock movement (see
//!   [`ApiHandler::adjust_stock`]).
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
use crate::domain::{
    self, AdjustStockRequest, Order, PlaceOrderRequest, Product, PutProductRequest, StockMovement,
};
use crate::faults::{FaultPoint, Faults};
use crate::handlers::coordinator::{CUSTOMER_CANCELLED_DETAIL, compensations};
use crate::idempotency::dynamo::DynamoIdempotency;
use crate::idempotency::{self, Claim, ClaimRequest, Existing, Idempotency, StepKey};
use crate::identity::{AccessPolicy, Caller};
use crate::messages::{PaymentCommand, StockCommand};
use crate::ports::{
    Adjusted, Adjustment, CreateError, Created, Expected, OrderCursor, Orders, Products, Publish,
    Updated,
};
use crate::ports::{FactUpdate, Update};
use crate::saga::Fact;

/// Longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// `GET /orders` answers this many orders per page unless `?limit=` says otherwise.
pub const DEFAULT_PAGE_SIZE: usize = 20;
/// The largest `?limit=` of `GET /orders`.
pub const MAX_PAGE_SIZE: usize = 100;
/// How many times a stock adjustment reads and tries again when the quantity it read moved
/// before its write (orders reserving, other adjustments), before answering 503.
pub const ADJUST_ATTEMPTS: u32 = 10;
/// How many entity tags one `If-Match` may list.
pub const MAX_IF_MATCH_TAGS: usize = 20;

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
        let retry = [(header::RETRY_AFTER.as_str(), "1".to_string())];
        let headers: &[(&str, String)] = match self.status {
            StatusCode::UNAUTHORIZED => &challenge,
            StatusCode::SERVICE_UNAVAILABLE => &retry,
            _ => &[],
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
    CancelOrder(String),
    AdjustStock(String),
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
        let products = DynamoProducts::new(clients.dynamodb.clone(), config.products_table)
            .with_movements(config.stock_movements_table)
            .with_idempotency(idempotency.clone());
        Self::with_ports(
            DynamoOrders::new(clients.dynamodb.clone(), config.orders_table)
                .with_customer_index(config.customer_index)
                .with_idempotency(idempotency.clone()),
            products,
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
                let expected = if_match(req.headers())?;
                let body: PutProductRequest = parse_json(json_body(req)?)?;
                body.validate()
                    .map_err(|e| ApiError::bad_request("INVALID_REQUEST", e.to_string()))?;
                self.put_product(&caller, id, body, expected).await
            }
            Route::GetProduct(id) => self.get_product(&id).await,
            Route::AdjustStock(id) => {
                if !caller.operator {
                    return Err(ApiError::forbidden("only operators may adjust stock"));
                }
                let body: AdjustStockRequest = parse_json(json_body(req)?)?;
                body.validate()
                    .map_err(|e| ApiError::bad_request("INVALID_REQUEST", e.to_string()))?;
                let key = idempotency_key(req.headers())?;
                self.adjust_stock(&caller, &id, &body, key.as_deref()).await
            }
            Route::CancelOrder(id) => self.cancel_order(&caller, &id).await,
        }
    }

    /// `POST /orders/{orderId}/cancel`: the order's customer (or an operator) cancels a
    /// pending or confirmed order. One conditional update cancels it (and names the customer,
    /// so nobody else's order is touched) and marks it as cancelling in the sweeper's index;
    /// then the compensations go straight to the stock and payment queues, fencing off the
    /// steps whose results are not seen yet; then the mark is cleared. A retry of the request
    /// (or the sweeper, should this invocation die in between) sends them again, which the
    /// stock and payment functions absorb. Cancelling again answers the same final order.
    async fn cancel_order(&self, caller: &Caller, id: &str) -> Result<Response<Body>, ApiError> {
        let now = crate::time::now_ms();
        let update = FactUpdate {
            cancel_detail: Some(CUSTOMER_CANCELLED_DETAIL.into()),
            customer_id: (!caller.operator).then(|| caller.subject.clone()),
            ..FactUpdate::new(Fact::CustomerCancelled)
        };
        let not_found = || ApiError::not_found(format!("order {id} does not exist"));
        let order = match self.orders.apply(id, &update, now).await? {
            Update::Applied(order) => {
                crate::metrics::order_cancelled(domain::CancelReason::CustomerCancelled);
                tracing::info!(
                    order_id = id,
                    operator = caller.operator,
                    "order cancelled by request"
                );
                order
            }
            // Someone else's order is answered exactly as one that does not exist.
            Update::NotApplicable(order)
                if caller.operator || order.customer_id == caller.subject =>
            {
                order
            }
            Update::NotApplicable(_) | Update::NotFound => return Err(not_found()),
        };
        if order.pending_sweep.as_deref() == Some(domain::CANCELLING_SWEEP) {
            let (release, refund) =
                compensations(&order).map_err(|e| ApiError::unavailable(StoreError::Corrupt(e)))?;
            let (a, b) = tokio::join!(
                async {
                    match &release {
                        Some(c) => self.publisher.send(&self.stock_queue_url, c).await,
                        None => Ok(()),
                    }
                },
                async {
                    match &refund {
                        Some(c) => self.publisher.send(&self.payment_queue_url, c).await,
                        None => Ok(()),
                    }
                }
            );
            a?;
            b?;
            self.orders.compensations_sent(id, now).await?;
        }
        Ok(json_response(StatusCode::OK, &order.view(), &[]))
    }

    async fn get_product(&self, id: &str) -> Result<Response<Body>, ApiError> {
        let product = (self.products.get(id).await?)
            .ok_or_else(|| ApiError::not_found(format!("product {id} does not exist")))?;
        Ok(product_response(StatusCode::OK, &product))
    }

    /// `PUT /products/{productId}`. With `quantity`: creates the product with that initial
    /// stock (a put conditional on its absence, in one transaction with its first stock
    /// movement); 409 if it exists, since stock then changes only through adjustments.
    /// Without: sets name and price of the existing product and bumps its version (an update
    /// conditional on its existence, and on `If-Match`), leaving stock alone.
    async fn put_product(
        &self,
        caller: &Caller,
        id: String,
        body: PutProductRequest,
        expected: Option<Expected>,
    ) -> Result<Response<Body>, ApiError> {
        if let Some(quantity) = body.quantity {
            if let Some(expected) = &expected {
                // Refused either way; which answer depends on the precondition, evaluated first.
                return Err(match self.products.get(&id).await? {
                    Some(p) if expected.accepts(p.version) => quantity_not_writable(&id),
                    _ => precondition_failed(&id),
                });
            }
            let now = crate::time::now_ms();
            let product = Product {
                product_id: id.clone(),
                name: body.name,
                price_cents: body.price_cents,
                quantity,
                reserved: 0,
                version: 1,
            };
            let first = StockMovement {
                product_id: id.clone(),
                movement_id: domain::movement_id(now),
                delta: quantity as i64,
                reason: domain::INITIAL_STOCK_REASON.into(),
                actor: caller.subject.clone(),
                at_ms: now,
                quantity_after: quantity,
            };
            for attempt in 0..ADJUST_ATTEMPTS {
                if attempt > 0 {
                    crate::adapters::dynamo::conflict_backoff(attempt).await;
                }
                match self.products.create_product(&product, &first).await? {
                    Created::Created(product) => {
                        tracing::info!(product_id = %id, quantity, actor = %caller.subject, "product created");
                        let mut response = product_response(StatusCode::CREATED, &product);
                        response.headers_mut().insert(
                            header::LOCATION,
                            format!("/products/{id}").parse().expect("a valid id"),
                        );
                        return Ok(response);
                    }
                    Created::Exists => return Err(quantity_not_writable(&id)),
                    Created::Conflict => continue,
                }
            }
            return Err(contended(&id));
        }
        if expected == Some(Expected::Versions(vec![])) {
            // Only tags this API never gives out: none can match.
            return Err(precondition_failed(&id));
        }
        match (self.products)
            .update(&id, &body.name, body.price_cents, expected.as_ref())
            .await?
        {
            Updated::Updated(product) => {
                tracing::info!(product_id = %id, version = product.version, actor = %caller.subject, "product changed");
                Ok(product_response(StatusCode::OK, &product))
            }
            Updated::NotFound if expected.is_some() => Err(precondition_failed(&id)),
            Updated::NotFound => Err(ApiError::bad_request(
                "INVALID_REQUEST",
                format!(
                    "quantity: product {id} does not exist; its initial stock (quantity) is required to create it"
                ),
            )),
            Updated::VersionMismatch(_) => Err(precondition_failed(&id)),
        }
    }

    /// `POST /products/{productId}/stock-adjustments`: adds `delta` units to the product's
    /// available stock (takes them off when negative), never below zero, and records the
    /// movement (who, when, why, the quantity after), all in one transaction together with the
    /// `Idempotency-Key`'s record when there is one.
    ///
    /// This path reads the product first, unlike every other write here: the movement must
    /// hold the exact quantity after it, and `TransactWriteItems` returns no values. So it
    /// reads the quantity (consistently), writes `quantity = seen + delta` on the condition
    /// `quantity = seen` (optimistic concurrency), and when an order or another adjustment
    /// moved the quantity in between, reads again and retries, a bounded number of times with
    /// the conflict backoff, then answers 503 (retryable; nothing was written).
    ///
    /// With an `Idempotency-Key` (scoped to the caller, as on `POST /orders`): the same key and
    /// body replay the first answer (the same movement, `Idempotent-Replayed: true`), another
    /// body is a 422. The key's record is read before anything else, so a replay answers as the
    /// first time even when the stock since then would refuse the adjustment, and it is put in
    /// the transaction on the condition that the key is free, so two racing duplicates adjust
    /// once.
    async fn adjust_stock(
        &self,
        caller: &Caller,
        id: &str,
        body: &AdjustStockRequest,
        key: Option<&str>,
    ) -> Result<Response<Body>, ApiError> {
        let hash = idempotency::payload_hash(
            &json!({"productId": id, "delta": body.delta, "reason": body.reason}),
        );
        let record_key = key.map(|key| StepKey::Adjust {
            actor: &caller.subject,
            key,
        });
        if let Some(record_key) = record_key {
            let now = crate::time::now_ms();
            if let Some(existing) = self.idempotency.get(record_key, now).await? {
                return answer_existing(&existing, &hash, now);
            }
        }
        for attempt in 0..ADJUST_ATTEMPTS {
            if attempt > 0 {
                crate::adapters::dynamo::conflict_backoff(attempt).await;
            }
            let product = (self.products.get(id).await?)
                .ok_or_else(|| ApiError::not_found(format!("product {id} does not exist")))?;
            let after = product.quantity as i64 + body.delta;
            if after < 0 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "INSUFFICIENT_STOCK",
                    format!(
                        "product {id} has {} units available; {} cannot be taken off",
                        product.quantity,
                        body.delta.unsigned_abs()
                    ),
                ));
            }
            if after > domain::MAX_STOCK as i64 {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "STOCK_LIMIT_EXCEEDED",
                    format!(
                        "product {id} would have {after} units available; at most {} are allowed",
                        domain::MAX_STOCK
                    ),
                ));
            }
            let now = crate::time::now_ms();
            let movement = StockMovement {
                product_id: id.to_string(),
                movement_id: domain::movement_id(now),
                delta: body.delta,
                reason: body.reason.clone(),
                actor: caller.subject.clone(),
                at_ms: now,
                quantity_after: after as u64,
            };
            let stored =
                json!({"statusCode": StatusCode::CREATED.as_u16(), "body": movement}).to_string();
            let done = record_key.map(|key| idempotency::Completed {
                key,
                payload_hash: &hash,
                result: &stored,
                outcome: None,
                ttl: idempotency::API_KEY_TTL,
            });
            let adjustment = Adjustment {
                movement: &movement,
                seen: product.quantity,
                done: done.as_ref(),
            };
            match self.products.adjust(&adjustment, now).await? {
                Adjusted::Applied => {
                    tracing::info!(product_id = %id, delta = body.delta, quantity_after = after, actor = %caller.subject, "stock adjusted");
                    return Ok(json_response(StatusCode::CREATED, &json!(movement), &[]));
                }
                Adjusted::KeyTaken(existing) => return answer_existing(&existing, &hash, now),
                Adjusted::StockMoved | Adjusted::Conflict => {
                    tracing::info!(product_id = %id, attempt, "stock moved under an adjustment; reading again");
                }
            }
        }
        Err(contended(id))
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
            Existing::PayloadMismatch => Err(key_reused()),
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
            .complete(record_key, &stored.to_string(), None)
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

/// The answer to a request whose `Idempotency-Key` already has a record: the first answer
/// replayed, or why not.
fn answer_existing(
    existing: &idempotency::IdempotencyRecord,
    hash: &str,
    now: i64,
) -> Result<Response<Body>, ApiError> {
    match existing.classify(hash, now) {
        Existing::Completed(stored) => replay(&stored),
        Existing::PayloadMismatch => Err(key_reused()),
        Existing::InProgress | Existing::InProgressExpired => Err(in_progress()),
    }
}

fn key_reused() -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "IDEMPOTENCY_KEY_REUSED",
        "this Idempotency-Key was already used with a different request body",
    )
}

/// A product with its `ETag`.
fn product_response(status: StatusCode, product: &Product) -> Response<Body> {
    json_response(
        status,
        &json!(product),
        &[(header::ETAG.as_str(), product.etag())],
    )
}

fn quantity_not_writable(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "QUANTITY_NOT_WRITABLE",
        format!(
            "product {id} exists: its stock changes only through POST /products/{id}/stock-adjustments; send name and priceCents without quantity to change the rest"
        ),
    )
}

fn precondition_failed(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "PRECONDITION_FAILED",
        format!(
            "If-Match does not match product {id} as it is now (or it does not exist); GET it for its current ETag"
        ),
    )
}

fn contended(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "CONCURRENT_UPDATE",
        format!(
            "product {id} kept changing while this request was written; nothing was changed: retry (with the same Idempotency-Key to be safe)"
        ),
    )
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
    let mut headers = vec![("idempotent-replayed", "true".to_string())];
    if let Some(order_id) = stored["orderId"].as_str() {
        headers.push((header::LOCATION.as_str(), format!("/orders/{order_id}")));
    }
    Ok(json_response(status, &stored["body"], &headers))
}

/// The routes this function serves, as API Gateway route keys (`template.yaml` declares the
/// same ones on the function's `HttpApi` events).
pub const ROUTES: [&str; 7] = [
    "POST /orders",
    "GET /orders",
    "GET /orders/{orderId}",
    "PUT /products/{productId}",
    "GET /products/{productId}",
    "POST /products/{productId}/stock-adjustments",
    "POST /orders/{orderId}/cancel",
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
        Some(5) => id("productId").map(Route::AdjustStock),
        Some(6) => id("orderId").map(Route::CancelOrder),
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

/// `If-Match`: `None` without the header; `Any` for `*`; otherwise the versions of the
/// entity tags this API gives out (`"v{version}"`) among those listed. A weak tag never
/// matches (If-Match compares strongly), nor does another strong tag, so such a list may
/// leave no version at all. A header that is not a list of entity tags is a 400.
fn if_match(headers: &HeaderMap) -> Result<Option<Expected>, ApiError> {
    let values: Vec<_> = headers.get_all(header::IF_MATCH).iter().collect();
    if values.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        ApiError::bad_request(
            "INVALID_IF_MATCH",
            format!(
                "If-Match must be * or 1 to {MAX_IF_MATCH_TAGS} entity tags such as \"v3\" (the ETag of GET /products/{{productId}})"
            ),
        )
    };
    let mut text = String::new();
    for value in values {
        let value = value.to_str().map_err(|_| invalid())?;
        if !text.is_empty() {
            text.push(',');
        }
        text.push_str(value);
    }
    if text.trim() == "*" {
        return Ok(Some(Expected::Any));
    }
    let mut versions = Vec::new();
    let mut tags = 0;
    let mut rest = text.as_str();
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, after) = match rest.strip_prefix("W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        let opaque = after.strip_prefix('"').ok_or_else(invalid)?;
        let end = opaque.find('"').ok_or_else(invalid)?;
        let tag = &opaque[..end];
        if !tag.bytes().all(|b| b == 0x21 || (0x23..=0x7e).contains(&b)) {
            return Err(invalid());
        }
        tags += 1;
        if tags > MAX_IF_MATCH_TAGS {
            return Err(invalid());
        }
        let version = tag
            .strip_prefix('v')
            .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|v| v.parse::<u64>().ok());
        if let (false, Some(version)) = (weak, version) {
            versions.push(version);
        }
        rest = opaque[end + 1..].trim_start_matches([' ', '\t']);
        if !(rest.is_empty() || rest.starts_with(',')) {
            return Err(invalid());
        }
    }
    if tags == 0 {
        return Err(invalid());
    }
    Ok(Some(Expected::Versions(versions)))
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

        fn with_header(mut req: Request, name: &'static str, value: &str) -> Request {
            req.headers_mut().append(name, value.parse().unwrap());
            req
        }

        fn adjust(id: &str, caller: &str, body: Value, key: Option<&str>) -> Request {
            let mut req = request(
                "POST /products/{productId}/stock-adjustments",
                &[("productId", id)],
            );
            *req.body_mut() = Body::Text(body.to_string());
            if let Some(key) = key {
                req = with_header(req, IDEMPOTENCY_KEY_HEADER, key);
            }
            signed_in(req, caller, &["operators"])
        }

        fn get_product(id: &str) -> Request {
            request("GET /products/{productId}", &[("productId", id)])
        }

        const OPS: &[&str] = &["operators"];

        #[tokio::test]
        async fn when_an_operator_creates_a_product_should_store_its_stock_and_first_movement() {
            let (h, store, _) = handler();
            let mug = json!({"name": "Mug", "priceCents": 900, "quantity": 7});
            let (status, body, headers) = call(&h, put_product("p-2", "op-1", OPS, mug)).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            assert_eq!(
                body,
                json!({"productId": "p-2", "name": "Mug", "priceCents": 900, "quantity": 7, "reserved": 0, "version": 1})
            );
            assert_eq!(headers[header::ETAG], "\"v1\"");
            assert_eq!(headers[header::LOCATION], "/products/p-2");
            assert_eq!(store.quantity("p-2"), Some(7));
            let movements = store.movements("p-2");
            assert_eq!(movements.len(), 1, "{movements:?}");
            let first = &movements[0];
            assert_eq!(
                (first.delta, first.quantity_after, first.actor.as_str()),
                (7, 7, "op-1")
            );
            assert_eq!(first.reason, domain::INITIAL_STOCK_REASON);
            let (status, got, got_headers) = call(&h, get_product("p-2")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(got, body);
            assert_eq!(got_headers[header::ETAG], "\"v1\"");
        }

        #[tokio::test]
        async fn when_a_product_is_changed_should_leave_its_stock_alone_and_refuse_a_quantity() {
            let (h, store, _) = handler();
            let before = store.product("p-1").unwrap();
            // An order reserves two units after the operator read the product.
            use crate::ports::Stock;
            let done = idempotency::Completed {
                key: StepKey::Reserve("o-1"),
                payload_hash: "h",
                result: "{}",
                outcome: Some(idempotency::Outcome::Reserved),
                ttl: idempotency::STEP_RECORD_TTL,
            };
            let line = domain::StockLine {
                product_id: "p-1".into(),
                quantity: 2,
            };
            store.reserve(&[line], &done, 0).await.unwrap();
            let cheaper = json!({"name": "Mug", "priceCents": 200});
            let (status, body, headers) = call(&h, put_product("p-1", "op-1", OPS, cheaper)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["priceCents"], 200);
            assert_eq!(
                body["quantity"],
                before.quantity - 2,
                "the reservation stands"
            );
            assert_eq!(body["version"], before.version + 1);
            assert_eq!(
                headers[header::ETAG],
                format!("\"v{}\"", before.version + 1)
            );
            let after = store.product("p-1").unwrap();
            assert_eq!(after.quantity, before.quantity - 2);
            // A quantity on an existing product: 409, nothing changed.
            let restock = json!({"name": "Mug", "priceCents": 300, "quantity": 15});
            let (status, body, _) = call(&h, put_product("p-1", "op-1", OPS, restock)).await;
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(body["error"]["code"], "QUANTITY_NOT_WRITABLE");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("stock-adjustments"),
                "{body}"
            );
            assert_eq!(store.product("p-1").unwrap(), after);
            assert!(store.movements("p-1").is_empty());
            // No quantity for a product that does not exist: 400, nothing created.
            let (status, body, _) = call(
                &h,
                put_product("p-new", "op-1", OPS, json!({"name": "N", "priceCents": 1})),
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(body["error"]["code"], "INVALID_REQUEST");
            assert_eq!(store.product("p-new"), None);
        }

        #[tokio::test]
        async fn when_if_match_is_stale_should_answer_412_and_change_nothing() {
            let (h, store, _) = handler();
            let (_, _, headers) = call(&h, get_product("p-1")).await;
            let etag = headers[header::ETAG].to_str().unwrap().to_string();
            let body = |price: u64| json!({"name": "Mug", "priceCents": price});
            let put = |price, if_match: &str| {
                with_header(
                    put_product("p-1", "op-1", OPS, body(price)),
                    "if-match",
                    if_match,
                )
            };
            let (status, changed, headers) = call(&h, put(300, &etag)).await;
            assert_eq!(status, StatusCode::OK, "{changed}");
            let new_etag = headers[header::ETAG].to_str().unwrap().to_string();
            assert_ne!(new_etag, etag);
            // The first ETag is stale now; weak tags and strangers' tags never match.
            for stale in [etag.as_str(), "W/\"v2\"", "\"abc\"", "\"v99\", \"v98\""] {
                let (status, body, _) = call(&h, put(400, stale)).await;
                assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{stale}: {body}");
                assert_eq!(body["error"]["code"], "PRECONDITION_FAILED");
                assert_eq!(store.product("p-1").unwrap().price_cents, 300, "{stale}");
            }
            // A quantity with If-Match: the precondition first, then the quantity.
            let restock = json!({"name": "Mug", "priceCents": 1, "quantity": 9});
            let with_quantity = |if_match: &str| {
                with_header(
                    put_product("p-1", "op-1", OPS, restock.clone()),
                    "if-match",
                    if_match,
                )
            };
            let (status, _, _) = call(&h, with_quantity(&etag)).await;
            assert_eq!(status, StatusCode::PRECONDITION_FAILED);
            let (status, refused, _) = call(&h, with_quantity(&new_etag)).await;
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(refused["error"]["code"], "QUANTITY_NOT_WRITABLE");
            // If-Match on a product that does not exist: 412, and nothing is created.
            for if_match in ["*", "\"v1\""] {
                for body in [body(1), restock.clone()] {
                    let req = with_header(
                        put_product("p-none", "op-1", OPS, body),
                        "if-match",
                        if_match,
                    );
                    let (status, _, _) = call(&h, req).await;
                    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{if_match}");
                }
            }
            assert_eq!(store.product("p-none"), None);
            // Malformed: 400.
            for bad in ["v2", "\"v2", "\"v2\" x", "", ",", "\"a b\""] {
                let (status, body, _) = call(&h, put(500, bad)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body}");
                assert_eq!(body["error"]["code"], "INVALID_IF_MATCH");
            }
            // `*` and a list holding the current tag match.
            let (status, _, _) = call(&h, put(600, &format!("\"v9\", {new_etag}"))).await;
            assert_eq!(status, StatusCode::OK);
            let (status, _, headers) = call(&h, put(700, "*")).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(headers[header::ETAG], "\"v4\"");
            assert_eq!(store.product("p-1").unwrap().quantity, 5, "stock untouched");
        }

        #[tokio::test]
        async fn when_stock_is_adjusted_should_change_it_and_record_the_movement() {
            let (h, store, _) = handler();
            let (_, _, headers) = call(&h, get_product("p-1")).await;
            let etag = headers[header::ETAG].clone();
            let (status, movement, _) = call(
                &h,
                adjust(
                    "p-1",
                    "op-1",
                    json!({"delta": 5, "reason": "restock"}),
                    None,
                ),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{movement}");
            assert_eq!(movement["productId"], "p-1");
            assert_eq!(movement["delta"], 5);
            assert_eq!(movement["reason"], "restock");
            assert_eq!(movement["actor"], "op-1");
            assert_eq!(movement["quantityAfter"], 10);
            assert!(movement["atMs"].as_i64().unwrap() > 0);
            assert_eq!(store.quantity("p-1"), Some(10));
            let recorded = store.movements("p-1");
            assert_eq!(recorded.len(), 1);
            assert_eq!(json!(recorded[0]), movement);
            // The ETag covers the catalogue fields only: stock changes leave it.
            let (_, product, headers) = call(&h, get_product("p-1")).await;
            assert_eq!(headers[header::ETAG], etag);
            assert_eq!(product["quantity"], 10);

            let (status, taken, _) = call(
                &h,
                adjust(
                    "p-1",
                    "op-2",
                    json!({"delta": -10, "reason": "broken"}),
                    None,
                ),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED);
            assert_eq!(taken["quantityAfter"], 0);
            // Below zero: 409, nothing changed.
            let (status, body, _) = call(
                &h,
                adjust("p-1", "op-1", json!({"delta": -1, "reason": "lost"}), None),
            )
            .await;
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(body["error"]["code"], "INSUFFICIENT_STOCK");
            assert_eq!(store.quantity("p-1"), Some(0));
            assert_eq!(store.movements("p-1").len(), 2);
            // Above the largest stock: 409 too.
            store.add_product("p-full", 1, domain::MAX_STOCK);
            let (status, body, _) = call(
                &h,
                adjust(
                    "p-full",
                    "op-1",
                    json!({"delta": 1, "reason": "more"}),
                    None,
                ),
            )
            .await;
            assert_eq!(status, StatusCode::CONFLICT);
            assert_eq!(body["error"]["code"], "STOCK_LIMIT_EXCEEDED");
            // Unknown product: 404; a customer: 403.
            let (status, _, _) = call(
                &h,
                adjust("p-none", "op-1", json!({"delta": 1, "reason": "x"}), None),
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND);
            let mut as_customer = request(
                "POST /products/{productId}/stock-adjustments",
                &[("productId", "p-1")],
            );
            *as_customer.body_mut() = Body::Text(json!({"delta": 100, "reason": "x"}).to_string());
            let (status, body, _) = call(&h, signed_in(as_customer, "alice", &[])).await;
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(body["error"]["code"], "FORBIDDEN");
            // Bad bodies: 400.
            for bad in [
                json!({"delta": 0, "reason": "x"}),
                json!({"delta": 1.5, "reason": "x"}),
                json!({"delta": domain::MAX_STOCK + 1, "reason": "x"}),
                json!({"delta": -(domain::MAX_STOCK as i64) - 1, "reason": "x"}),
                json!({"delta": 1, "reason": ""}),
                json!({"delta": 1, "reason": "  "}),
                json!({"delta": 1, "reason": "a\nb"}),
                json!({"delta": 1, "reason": "r".repeat(domain::MAX_REASON_LEN + 1)}),
                json!({"delta": 1}),
                json!({"reason": "x"}),
                json!({"delta": 1, "reason": "x", "quantity": 3}),
            ] {
                let (status, body, _) = call(&h, adjust("p-1", "op-1", bad.clone(), None)).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
                assert_eq!(body["error"]["code"], "INVALID_REQUEST", "{bad}");
            }
            assert_eq!(store.quantity("p-1"), Some(0));
            assert_eq!(store.movements("p-1").len(), 2);
        }

        #[tokio::test]
        async fn when_an_adjustment_key_is_reused_should_replay_it_and_refuse_another_body() {
            let (h, store, _) = handler();
            store.add_product("p-2", 100, 5);
            let take = |delta: i64| json!({"delta": delta, "reason": "sold at the counter"});
            let (status, first, _) = call(&h, adjust("p-1", "op-1", take(-2), Some("k-1"))).await;
            assert_eq!(status, StatusCode::CREATED, "{first}");
            // The stock then falls below what the adjustment takes: the replay still answers
            // as the first time, and takes nothing.
            let (status, _, _) = call(&h, adjust("p-1", "op-1", take(-3), None)).await;
            assert_eq!(status, StatusCode::CREATED);
            let (status, again, headers) =
                call(&h, adjust("p-1", "op-1", take(-2), Some("k-1"))).await;
            assert_eq!(status, StatusCode::CREATED);
            assert_eq!(again, first);
            assert_eq!(headers["idempotent-replayed"], "true");
            assert_eq!(store.quantity("p-1"), Some(0));
            assert_eq!(store.movements("p-1").len(), 2);
            // Another body, or the same body on another product: 422.
            for (id, delta) in [("p-1", -1), ("p-2", -2)] {
                let (status, body, _) =
                    call(&h, adjust(id, "op-1", take(delta), Some("k-1"))).await;
                assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{id}");
                assert_eq!(body["error"]["code"], "IDEMPOTENCY_KEY_REUSED");
            }
            // Another operator's key of the same name is theirs.
            let (status, theirs, headers) =
                call(&h, adjust("p-2", "op-2", take(-2), Some("k-1"))).await;
            assert_eq!(status, StatusCode::CREATED);
            assert!(!headers.contains_key("idempotent-replayed"));
            assert_ne!(theirs["movementId"], first["movementId"]);
            assert_eq!(store.quantity("p-2"), Some(3));
            let record = store
                .record(StepKey::Adjust {
                    actor: "op-1",
                    key: "k-1",
                })
                .unwrap();
            assert_eq!(record.status, idempotency::Status::Completed);
            // A malformed key: 400, nothing written.
            let (status, body, _) = call(&h, adjust("p-2", "op-1", take(1), Some("a b"))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["code"], "INVALID_IDEMPOTENCY_KEY");
            assert_eq!(store.quantity("p-2"), Some(3));
        }

        #[tokio::test]
        async fn when_orders_move_the_stock_under_an_adjustment_should_read_again_and_record_the_exact_quantity()
         {
            let (h, store, _) = handler();
            store.add_product("p-busy", 100, 50);
            // Three orders each take a unit between the adjustment's read and its write.
            store.race_next_adjustments(3);
            let (status, movement, _) = call(
                &h,
                adjust(
                    "p-busy",
                    "op-1",
                    json!({"delta": 5, "reason": "restock"}),
                    None,
                ),
            )
            .await;
            assert_eq!(status, StatusCode::CREATED, "{movement}");
            assert_eq!(movement["quantityAfter"], 47 + 5);
            assert_eq!(store.quantity("p-busy"), Some(52));
            // Losing every race: 503, retryable, nothing written.
            store.race_next_adjustments(ADJUST_ATTEMPTS as usize);
            let response = h
                .handle(adjust(
                    "p-busy",
                    "op-1",
                    json!({"delta": 5, "reason": "restock"}),
                    None,
                ))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[header::RETRY_AFTER], "1");
            let body: Value = serde_json::from_slice(response.body().as_ref()).unwrap();
            assert_eq!(body["error"]["code"], "CONCURRENT_UPDATE");
            assert_eq!(store.movements("p-busy").len(), 1);
            assert_eq!(
                store.quantity("p-busy"),
                Some(52 - ADJUST_ATTEMPTS as u64),
                "only the orders took stock"
            );
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
                "POST /products/{productId}/stock-adjustments",
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
