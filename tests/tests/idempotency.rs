//! The idempotency module against DynamoDB Local, and the order API's `Idempotency-Key`
//! contract (IETF draft "The Idempotency-Key HTTP Header Field") over HTTP.

use std::collections::HashSet;
use std::time::Duration;

use saga_core::adapters::orders::DynamoOrders;
use saga_core::aws::AwsClients;
use saga_core::config::OrderApiConfig;
use saga_core::domain::{self, PlaceOrderRequest};
use saga_core::faults::{FaultPoint, Faults};
use saga_core::handlers::api::ApiHandler;
use saga_core::idempotency::dynamo::DynamoIdempotency;
use saga_core::idempotency::{
    self, API_KEY_TTL, Claim, ClaimRequest, Completed, Existing, Idempotency, IdempotencyRecord,
    Status, StepKey, payload_hash,
};
use saga_core::ports::Orders;
use saga_core::time::now_ms;
use saga_tests::{Reply, TestStack};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(120);
const HOUR_MS: i64 = 3_600_000;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Counts the DynamoDB operations made through a client, by name (the runner's call counter).
#[derive(Debug, Default, Clone)]
struct OpCounter(local_runner::counting::CallCounter);

impl OpCounter {
    fn take(&self) -> Vec<String> {
        self.0.take().into_iter().map(|c| c.operation).collect()
    }
}

fn store(t: &TestStack) -> DynamoIdempotency {
    DynamoIdempotency::new(
        t.stack.clients.dynamodb.clone(),
        t.stack.table("IdempotencyTable"),
    )
}

/// A store whose client records every DynamoDB operation it sends.
fn counted_store(t: &TestStack) -> (DynamoIdempotency, OpCounter) {
    let counter = OpCounter::default();
    let config = t
        .stack
        .clients
        .dynamodb
        .config()
        .to_builder()
        .interceptor(counter.0.clone())
        .build();
    let client = aws_sdk_dynamodb::Client::from_conf(config);
    (
        DynamoIdempotency::new(client, t.stack.table("IdempotencyTable")),
        counter,
    )
}

/// The step a stored key names (`o-1#charge`, `api#{customer}#k`).
fn step(key: &str) -> StepKey<'_> {
    if let Some(rest) = key.strip_prefix("api#") {
        let (customer, key) = rest.split_once('#').expect("api#customer#key");
        return StepKey::Api { customer, key };
    }
    match key.rsplit_once('#').expect("order#step") {
        (order, "charge") => StepKey::Charge(order),
        (order, "refund") => StepKey::Refund(order),
        (order, "reserve") => StepKey::Reserve(order),
        (order, "release") => StepKey::Release(order),
        (_, other) => panic!("no step {other}"),
    }
}

fn completed<'a>(key: StepKey<'a>, hash: &'a str, result: &'a str, ttl: Duration) -> Completed<'a> {
    Completed {
        key,
        payload_hash: hash,
        result,
        outcome: Some(idempotency::Outcome::Reserved),
        ttl,
    }
}

fn claim_req<'a>(
    key: StepKey<'a>,
    hash: &'a str,
    until_ms: i64,
    take_over: bool,
) -> ClaimRequest<'a> {
    ClaimRequest {
        key,
        payload_hash: hash,
        in_progress_until_ms: until_ms,
        ttl: idempotency::STEP_RECORD_TTL,
        take_over_expired: take_over,
        order_id: None,
    }
}

fn existing(claim: Claim) -> IdempotencyRecord {
    match claim {
        Claim::Existing(record) => record,
        Claim::Acquired => panic!("expected the existing record, got Acquired"),
    }
}

/// The record as it is stored now (a consistent read, for assertions only).
async fn stored(t: &TestStack, key: &str) -> Option<IdempotencyRecord> {
    t.stack
        .clients
        .dynamodb
        .get_item()
        .table_name(t.stack.table("IdempotencyTable"))
        .key("id", aws_sdk_dynamodb::types::AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get_item")
        .item
        .map(|item| serde_dynamo::from_item(item).expect("a well-formed record"))
}

fn order_body(product: &str, quantity: u64) -> Value {
    json!({"items": [{"productId": product, "quantity": quantity}]})
}

/// The record id of `key` sent by the stack's default customer (the one `post` signs in as).
async fn api_key(t: &TestStack, key: &str) -> String {
    format!("api#{}#{key}", t.subject(saga_tests::CUSTOMER).await)
}

async fn post(t: &TestStack, body: &Value, key: Option<&str>) -> Reply {
    match key {
        Some(k) => {
            t.request("POST", "/orders", Some(body), &[("idempotency-key", k)])
                .await
        }
        None => t.request("POST", "/orders", Some(body), &[]).await,
    }
}

async fn order_count(t: &TestStack) -> usize {
    t.scan("OrdersTable").await.len()
}

fn api_records(records: &std::collections::HashMap<String, String>) -> usize {
    records.keys().filter(|k| k.starts_with("api#")).count()
}

fn order_id(r: &Reply) -> String {
    r.body["orderId"]
        .as_str()
        .unwrap_or_else(|| panic!("no orderId in {}", r.raw))
        .to_string()
}

fn assert_error(r: &Reply, status: u16, code: &str) {
    assert_eq!(r.status, status, "{}", r.raw);
    assert_eq!(r.body["error"]["code"], code, "{}", r.raw);
    assert!(r.body["error"]["message"].is_string(), "{}", r.raw);
}

/// Consumers held back, so the queues show exactly what the API sent.
async fn paused_stack() -> TestStack {
    TestStack::start_with(|o| {
        o.paused = vec![
            "StockFunction".into(),
            "PaymentFunction".into(),
            "CoordinatorFunction".into(),
        ];
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The idempotency module on DynamoDB Local
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_key_is_claimed_twice_should_acquire_once_and_hand_back_the_record_without_a_read() {
    let t = TestStack::start().await;
    let (s, ops) = counted_store(&t);
    let now = now_ms();
    let until = now + 60_000;
    let first = ClaimRequest {
        order_id: Some("o-1"),
        ..claim_req(step("o-1#charge"), "h1", until, false)
    };
    assert_eq!(s.claim(&first, now).await.unwrap(), Claim::Acquired);
    assert_eq!(ops.take(), ["PutItem"]);

    // The second claim is one conditional put whose failure carries the record (ALL_OLD).
    let second = ClaimRequest {
        order_id: Some("o-other"),
        ..claim_req(step("o-1#charge"), "h1", now + 120_000, false)
    };
    let record = existing(s.claim(&second, now + 1).await.unwrap());
    assert_eq!(ops.take(), ["PutItem"], "no read besides the put");
    assert_eq!(record.id, "o-1#charge");
    assert_eq!(record.status, Status::InProgress);
    assert_eq!(record.payload_hash, "h1");
    assert_eq!(record.in_progress_until_ms, Some(until));
    assert_eq!(record.order_id.as_deref(), Some("o-1"));
    assert_eq!(record.result, None);
    assert_eq!(
        record.expires_at,
        now / 1000 + idempotency::STEP_RECORD_TTL.as_secs() as i64
    );
    assert_eq!(record.classify("h1", now + 1), Existing::InProgress);
    // The losing claim changed nothing.
    assert_eq!(stored(&t, "o-1#charge").await, Some(record));

    // The same holds for put_completed on a taken key.
    let again = existing(
        s.put_completed(
            &completed(step("o-1#charge"), "h1", "{}", idempotency::STEP_RECORD_TTL),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(ops.take(), ["PutItem"]);
    assert_eq!(again.status, Status::InProgress);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_holder_is_past_its_deadline_should_be_taken_over_only_when_allowed() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();

    // A holder that is still within its deadline is never taken over.
    assert_eq!(
        s.claim(
            &claim_req(step("live#charge"), "h", now + 60_000, false),
            now
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    let live = existing(
        s.claim(
            &claim_req(step("live#charge"), "h", now + 90_000, true),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(live.classify("h", now), Existing::InProgress);

    // A holder past its deadline (a crashed or timed-out invocation).
    let dead_until = now - 1_000;
    assert_eq!(
        s.claim(
            &claim_req(step("dead#charge"), "h", dead_until, false),
            now - 5_000
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    let refused = existing(
        s.claim(
            &claim_req(step("dead#charge"), "h", now + 60_000, false),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(refused.in_progress_until_ms, Some(dead_until));
    assert_eq!(refused.classify("h", now), Existing::InProgressExpired);
    assert_eq!(
        stored(&t, "dead#charge")
            .await
            .unwrap()
            .in_progress_until_ms,
        Some(dead_until),
        "take_over_expired=false must not overwrite"
    );

    assert_eq!(
        s.claim(
            &claim_req(step("dead#charge"), "h", now + 60_000, true),
            now
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    let taken = stored(&t, "dead#charge").await.unwrap();
    assert_eq!(taken.status, Status::InProgress);
    assert_eq!(taken.in_progress_until_ms, Some(now + 60_000));

    // take_over() names the expiry it saw: a stale view loses.
    assert!(
        !s.take_over(step("dead#charge"), dead_until, now + 90_000)
            .await
            .unwrap()
    );
    assert!(
        s.take_over(step("dead#charge"), now + 60_000, now + 90_000)
            .await
            .unwrap()
    );
    assert_eq!(
        stored(&t, "dead#charge")
            .await
            .unwrap()
            .in_progress_until_ms,
        Some(now + 90_000)
    );

    // expire_claim() makes the next attempt's takeover possible at once.
    s.expire_claim(step("dead#charge")).await.unwrap();
    let expired = existing(
        s.claim(
            &claim_req(step("dead#charge"), "h", now + 60_000, false),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(expired.classify("h", now), Existing::InProgressExpired);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_step_completed_should_replay_its_result_and_never_be_taken_over() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();
    let result = r#"{"type":"PaymentCharged","orderId":"o-2","paymentId":"ch_1"}"#;

    // Claim, act, complete.
    assert_eq!(
        s.claim(
            &claim_req(step("o-2#charge"), "h", now - 10, false),
            now - 20
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    s.complete(
        step("o-2#charge"),
        result,
        Some(idempotency::Outcome::Charged),
    )
    .await
    .unwrap();
    let done = stored(&t, "o-2#charge").await.unwrap();
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.in_progress_until_ms, None, "the deadline is removed");

    // Even with takeover allowed and the old deadline long past, a completed record stays.
    for take_over in [false, true] {
        let record = existing(
            s.claim(
                &claim_req(step("o-2#charge"), "h", now + 60_000, take_over),
                now,
            )
            .await
            .unwrap(),
        );
        assert_eq!(
            record.classify("h", now),
            Existing::Completed(result.into())
        );
    }

    // A step recorded in one put (the stock transaction's way) replays the same way.
    assert_eq!(
        s.put_completed(
            &completed(
                step("o-2#reserve"),
                "hr",
                "{\"r\":1}",
                idempotency::STEP_RECORD_TTL
            ),
            now
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    let record = existing(
        s.claim(
            &claim_req(step("o-2#reserve"), "hr", now + 60_000, true),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        record.classify("hr", now),
        Existing::Completed("{\"r\":1}".into())
    );
    assert_eq!(
        existing(
            s.put_completed(
                &completed(
                    step("o-2#reserve"),
                    "hr",
                    "{\"r\":2}",
                    idempotency::STEP_RECORD_TTL
                ),
                now
            )
            .await
            .unwrap()
        )
        .result
        .as_deref(),
        Some("{\"r\":1}"),
        "the first result is kept"
    );

    // complete() on a key nobody claimed fails rather than inventing a record.
    assert!(
        s.complete(step("nobody#charge"), result, None)
            .await
            .is_err()
    );
    assert_eq!(stored(&t, "nobody#charge").await, None);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_key_is_reused_with_another_payload_should_refuse_it_also_on_the_replay_path() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();
    s.put_completed(
        &completed(
            step("o-3#refund"),
            "h-a",
            "{}",
            idempotency::STEP_RECORD_TTL,
        ),
        now,
    )
    .await
    .unwrap();
    for take_over in [false, true] {
        let record = existing(
            s.claim(
                &claim_req(step("o-3#refund"), "h-b", now + 60_000, take_over),
                now,
            )
            .await
            .unwrap(),
        );
        assert_eq!(record.status, Status::Completed);
        assert_eq!(
            record.classify("h-b", now),
            Existing::PayloadMismatch,
            "a completed record is not replayed for another payload"
        );
    }
    // In progress, live or expired: the payload still comes first.
    s.claim(
        &claim_req(step("o-3#charge"), "h-a", now + 60_000, false),
        now,
    )
    .await
    .unwrap();
    let live = existing(
        s.claim(
            &claim_req(step("o-3#charge"), "h-b", now + 60_000, false),
            now,
        )
        .await
        .unwrap(),
    );
    assert_eq!(live.classify("h-b", now), Existing::PayloadMismatch);
    assert_eq!(
        live.classify("h-b", now + 120_000),
        Existing::PayloadMismatch
    );
    assert_eq!(stored(&t, "o-3#refund").await.unwrap().payload_hash, "h-a");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_claim_is_released_should_let_a_retry_run_but_never_drop_a_completed_record() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();
    let req = claim_req(step("o-4#charge"), "h", now + 60_000, false);
    assert_eq!(s.claim(&req, now).await.unwrap(), Claim::Acquired);
    s.release(step("o-4#charge")).await.unwrap();
    assert_eq!(stored(&t, "o-4#charge").await, None);
    assert_eq!(
        s.claim(&req, now).await.unwrap(),
        Claim::Acquired,
        "the retry runs"
    );

    s.complete(step("o-4#charge"), "{\"done\":true}", None)
        .await
        .unwrap();
    s.release(step("o-4#charge")).await.unwrap();
    let kept = stored(&t, "o-4#charge")
        .await
        .expect("completed record kept");
    assert_eq!(kept.status, Status::Completed);
    assert_eq!(
        existing(s.claim(&req, now).await.unwrap()).classify("h", now),
        Existing::Completed("{\"done\":true}".into())
    );

    // Releasing what does not exist is harmless.
    s.release(step("never#charge")).await.unwrap();
    assert_eq!(stored(&t, "never#charge").await, None);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_record_has_outlived_its_ttl_should_be_treated_as_absent() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();
    let long_ago = now - 48 * HOUR_MS;
    let ttl = Duration::from_secs(24 * 3600);

    // A completed record whose expiresAt passed but which TTL has not deleted yet.
    s.put_completed(
        &completed(step("old#charge"), "h-old", "{\"old\":1}", ttl),
        long_ago,
    )
    .await
    .unwrap();
    let lingering = stored(&t, "old#charge").await.expect("not deleted yet");
    assert!(lingering.expires_at < now / 1000, "{lingering:?}");
    assert_eq!(
        s.claim(
            &claim_req(step("old#charge"), "h-new", now + 60_000, false),
            now
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    let fresh = stored(&t, "old#charge").await.unwrap();
    assert_eq!(fresh.status, Status::InProgress);
    assert_eq!(fresh.payload_hash, "h-new");
    assert_eq!(fresh.result, None);

    // An expired in-progress record, without takeover allowed, and put_completed over one.
    s.claim(
        &ClaimRequest {
            ttl,
            ..claim_req(step("old#refund"), "h", long_ago + 1_000, false)
        },
        long_ago,
    )
    .await
    .unwrap();
    assert_eq!(
        s.claim(
            &claim_req(step("old#refund"), "h2", now + 60_000, false),
            now
        )
        .await
        .unwrap(),
        Claim::Acquired
    );
    s.put_completed(&completed(step("old#reserve"), "h", "{}", ttl), long_ago)
        .await
        .unwrap();
    assert_eq!(
        s.put_completed(&completed(step("old#reserve"), "h2", "{\"n\":2}", ttl), now)
            .await
            .unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        stored(&t, "old#reserve").await.unwrap().result.as_deref(),
        Some("{\"n\":2}")
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_twenty_claims_race_for_one_key_should_acquire_exactly_once() {
    let t = TestStack::start().await;
    let s = store(&t);
    let now = now_ms();

    let race = |key: &'static str, take_over: bool| {
        let s = s.clone();
        async move {
            let runs = (0..20).map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    let hash = "h".to_string();
                    let order = format!("o-{i}");
                    let req = ClaimRequest {
                        order_id: Some(order.as_str()),
                        ..claim_req(step(key), &hash, now_ms() + 60_000, take_over)
                    };
                    (i, s.claim(&req, now_ms()).await.unwrap())
                })
            });
            futures::future::join_all(runs)
                .await
                .into_iter()
                .map(|r| r.unwrap())
                .collect::<Vec<_>>()
        }
    };

    // A free key.
    let outcomes = race("race#charge", false).await;
    let winners: Vec<_> = outcomes
        .iter()
        .filter(|(_, c)| *c == Claim::Acquired)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner_order = format!("o-{}", winners[0]);
    for (_, c) in &outcomes {
        if let Claim::Existing(r) = c {
            assert_eq!(r.order_id.as_deref(), Some(winner_order.as_str()));
        }
    }
    assert_eq!(
        stored(&t, "race#charge").await.unwrap().order_id,
        Some(winner_order)
    );

    // An abandoned key, with every racer allowed to take it over.
    s.claim(
        &claim_req(step("race#refund"), "h", now - 1_000, false),
        now - 2_000,
    )
    .await
    .unwrap();
    let outcomes = race("race#refund", true).await;
    let won = outcomes
        .iter()
        .filter(|(_, c)| *c == Claim::Acquired)
        .count();
    assert_eq!(won, 1, "{outcomes:?}");

    // Explicit takeovers of one expired holder: one wins.
    s.claim(
        &claim_req(step("api#c-race#race"), "h", now - 1_000, false),
        now - 2_000,
    )
    .await
    .unwrap();
    let takers = (0..20).map(|i| {
        let s = s.clone();
        tokio::spawn(async move {
            s.take_over(step("api#c-race#race"), now - 1_000, now + 60_000 + i)
                .await
                .unwrap()
        })
    });
    let took = futures::future::join_all(takers)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(took, 1);
    t.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The API's Idempotency-Key, over HTTP
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_post_is_retried_with_the_same_key_and_body_should_replay_the_first_response() {
    let t = TestStack::start().await;
    t.put_product("p-i1", 250, 10).await;
    let body = order_body("p-i1", 2);
    let first = post(&t, &body, Some("key-replay-1")).await;
    assert_eq!(first.status, 202, "{}", first.raw);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let id = order_id(&first);

    // The same body, written differently (key order, whitespace), is the same request.
    let reordered = r#"  { "items" : [ { "quantity": 2, "productId": "p-i1" } ] } "#.to_string();
    let retry = t
        .raw_request(
            "POST",
            "/orders",
            &[
                ("content-type", "application/json"),
                ("idempotency-key", "key-replay-1"),
            ],
            reordered.into_bytes(),
        )
        .await;
    let quoted = post(&t, &body, Some("\"key-replay-1\"")).await;
    for replay in [&retry, &quoted] {
        assert_eq!(replay.status, 202, "{}", replay.raw);
        assert_eq!(order_id(replay), id);
        assert_eq!(replay.body, first.body, "the first response, as it was");
        assert_eq!(
            replay
                .headers
                .get("idempotent-replayed")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(replay.headers["location"], format!("/orders/{id}"));
    }

    let o = t.wait_settled(&id, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    // After the saga finished, a retry still gets the first (PENDING) answer and changes nothing.
    let late = post(&t, &body, Some("key-replay-1")).await;
    assert_eq!(late.status, 202);
    assert_eq!(late.body, first.body);
    assert_eq!(order_count(&t).await, 1, "one order for one key");
    assert_eq!(t.product_quantity("p-i1").await, 8, "stock reserved once");
    let charges = t
        .ledger()
        .await
        .into_iter()
        .filter(|(k, o, _)| k == "CHARGE" && o == &id)
        .count();
    assert_eq!(charges, 1);
    let records = t.idempotency_records().await;
    assert_eq!(api_records(&records), 1);
    assert!(records[&api_key(&t, "key-replay-1").await].contains(&id));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_key_is_reused_with_another_body_should_answer_422_and_create_nothing() {
    let t = paused_stack().await;
    t.put_product("p-i2", 100, 10).await;
    t.put_product("p-i2b", 100, 10).await;
    let first = post(&t, &order_body("p-i2", 1), Some("key-reuse-1")).await;
    assert_eq!(first.status, 202, "{}", first.raw);
    for other in [
        order_body("p-i2", 2),
        order_body("p-i2b", 1),
        json!({"items": [{"productId": "p-i2", "quantity": 1}], "paymentMethod": "tok_mastercard"}),
    ] {
        let r = post(&t, &other, Some("key-reuse-1")).await;
        assert_error(&r, 422, "IDEMPOTENCY_KEY_REUSED");
    }
    assert_eq!(order_count(&t).await, 1);
    assert_eq!(t.queue_depth("StockQueue").await, 1);
    assert_eq!(t.queue_depth("PaymentQueue").await, 1);
    // The key still replays for its own body.
    let replay = post(&t, &order_body("p-i2", 1), Some("key-reuse-1")).await;
    assert_eq!(replay.status, 202);
    assert_eq!(order_id(&replay), order_id(&first));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_request_holding_a_key_is_still_running_should_answer_409_and_create_nothing() {
    let t = paused_stack().await;
    t.put_product("p-i3", 100, 10).await;
    let body = order_body("p-i3", 1);
    let request: PlaceOrderRequest = serde_json::from_value(body.clone()).unwrap();
    let hash = payload_hash(&request);
    let now = now_ms();
    assert_eq!(
        store(&t)
            .claim(
                &ClaimRequest {
                    key: step(&api_key(&t, "key-busy-1").await),
                    payload_hash: &hash,
                    in_progress_until_ms: now + 120_000,
                    ttl: API_KEY_TTL,
                    take_over_expired: false,
                    order_id: Some("o-being-written"),
                },
                now,
            )
            .await
            .unwrap(),
        Claim::Acquired
    );
    let r = post(&t, &body, Some("key-busy-1")).await;
    assert_error(&r, 409, "IDEMPOTENCY_KEY_IN_PROGRESS");
    // A different body with a busy key is a reuse: 422 before 409.
    let r = post(&t, &order_body("p-i3", 2), Some("key-busy-1")).await;
    assert_error(&r, 422, "IDEMPOTENCY_KEY_REUSED");
    assert_eq!(order_count(&t).await, 0);
    assert_eq!(t.queue_depth("StockQueue").await, 0);
    assert_eq!(t.queue_depth("PaymentQueue").await, 0);
    let record = stored(&t, &api_key(&t, "key-busy-1").await).await.unwrap();
    assert_eq!(record.in_progress_until_ms, Some(now + 120_000));
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_ten_identical_requests_race_with_one_key_should_create_one_order() {
    let t = paused_stack().await;
    t.put_product("p-i4", 100, 50).await;
    let body = order_body("p-i4", 1);
    let replies =
        futures::future::join_all((0..10).map(|_| post(&t, &body, Some("key-race-1")))).await;
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    // 202 (the winner, or a replay once it finished) or 409 (while it runs); never anything else.
    for r in &replies {
        assert!(
            r.status == 202 || r.status == 409,
            "statuses {statuses:?}; unexpected answer {}",
            r.raw
        );
        if r.status == 409 {
            assert_error(r, 409, "IDEMPOTENCY_KEY_IN_PROGRESS");
        }
    }
    let accepted: HashSet<String> = replies
        .iter()
        .filter(|r| r.status == 202)
        .map(order_id)
        .collect();
    assert_eq!(accepted.len(), 1, "statuses {statuses:?}: {accepted:?}");
    assert_eq!(order_count(&t).await, 1);
    assert_eq!(t.queue_depth("StockQueue").await, 1, "saga started once");
    assert_eq!(t.queue_depth("PaymentQueue").await, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_key_was_left_in_progress_past_its_deadline_should_take_it_over_and_finish_the_same_order()
 {
    let t = TestStack::start().await;
    t.put_product("p-i5", 400, 10).await;
    let body = order_body("p-i5", 3);
    let request: PlaceOrderRequest = serde_json::from_value(body.clone()).unwrap();
    let now = now_ms();
    // What a request that died after its transaction left behind: the order and the claim.
    let order = domain::price_order(
        "o-abandoned-1".into(),
        &t.subject(saga_tests::CUSTOMER).await,
        &request,
        |_| Some(400),
        now - 5_000,
    )
    .unwrap();
    DynamoOrders::new(
        t.stack.clients.dynamodb.clone(),
        t.stack.table("OrdersTable"),
    )
    .create(&order)
    .await
    .unwrap();
    let hash = payload_hash(&request);
    store(&t)
        .claim(
            &ClaimRequest {
                key: step(&api_key(&t, "key-crashed-1").await),
                payload_hash: &hash,
                in_progress_until_ms: now - 1_000,
                ttl: API_KEY_TTL,
                take_over_expired: false,
                order_id: Some("o-abandoned-1"),
            },
            now - 5_000,
        )
        .await
        .unwrap();

    let r = post(&t, &body, Some("key-crashed-1")).await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_eq!(order_id(&r), "o-abandoned-1", "the same order, finished");
    assert!(!r.headers.contains_key("idempotent-replayed"));
    let o = t.wait_settled("o-abandoned-1", SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(o["totalCents"], 1200);
    assert_eq!(t.product_quantity("p-i5").await, 7);
    assert_eq!(order_count(&t).await, 1, "no second order");
    let record = stored(&t, &api_key(&t, "key-crashed-1").await)
        .await
        .unwrap();
    assert_eq!(record.status, Status::Completed);
    let replay = post(&t, &body, Some("key-crashed-1")).await;
    assert_eq!(replay.status, 202);
    assert_eq!(order_id(&replay), "o-abandoned-1");
    assert_eq!(replay.headers["idempotent-replayed"], "true");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_api_crashed_after_its_write_should_let_the_retry_finish_the_same_order() {
    let t = TestStack::start().await;
    t.put_product("p-i6", 300, 10).await;
    let clients = AwsClients {
        dynamodb: t.stack.clients.dynamodb.clone(),
        sqs: t.stack.clients.sqs.clone(),
    };
    let env = t.stack.environments["OrderApiFunction"].clone();
    let config = OrderApiConfig::load(&move |k: &str| env.get(k).cloned()).unwrap();
    // The same handler code, dying after its DynamoDB transaction (before any message is sent),
    // with a 1.5 s invocation deadline.
    let crashing = ApiHandler::new(
        &clients,
        config,
        Faults::none().with(FaultPoint::AfterWrite, 1.0),
    );
    let body = order_body("p-i6", 2);
    let mut ctx = lambda_runtime::Context::default();
    let deadline = now_ms() + 1_500;
    ctx.deadline = deadline as u64;
    let req = http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "key-crash-2")
        .body(lambda_http::Body::Text(body.to_string()))
        .unwrap();
    let req = saga_tests::via_gateway(
        lambda_http::RequestExt::with_lambda_context(req, ctx),
        "POST /orders",
        &t.subject(saga_tests::CUSTOMER).await,
    );
    let crashed = crashing.handle(req).await.unwrap();
    assert_eq!(crashed.status(), 500);
    let orders = t.scan("OrdersTable").await;
    assert_eq!(orders.len(), 1, "the crash came after the write");
    let written = orders[0]["orderId"].as_s().unwrap().clone();
    let held = stored(&t, &api_key(&t, "key-crash-2").await).await.unwrap();
    assert_eq!(held.status, Status::InProgress);
    assert_eq!(
        held.in_progress_until_ms,
        Some(deadline),
        "held until its deadline"
    );

    // Retried before the deadline: the dead request may still be running, so 409.
    let early = post(&t, &body, Some("key-crash-2")).await;
    if now_ms() < deadline {
        assert_error(&early, 409, "IDEMPOTENCY_KEY_IN_PROGRESS");
    }
    let wait = (deadline + 100 - now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let retry = post(&t, &body, Some("key-crash-2")).await;
    assert_eq!(retry.status, 202, "{}", retry.raw);
    assert_eq!(order_id(&retry), written);
    let o = t.wait_settled(&written, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(t.product_quantity("p-i6").await, 8);
    assert_eq!(order_count(&t).await, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_sending_the_saga_messages_failed_should_let_the_next_retry_finish_the_same_order() {
    let t = TestStack::start().await;
    t.put_product("p-i10", 150, 10).await;
    let env = t.stack.environments["OrderApiFunction"].clone();
    let mut config = OrderApiConfig::load(&move |k: &str| env.get(k).cloned()).unwrap();
    // The stock queue is unreachable for this one invocation: the order and the key are
    // written, the ReserveStock send fails (the ChargePayment one, sent alongside, succeeds).
    config.stock_queue_url = format!("{}-gone", config.stock_queue_url);
    let clients = AwsClients {
        dynamodb: t.stack.clients.dynamodb.clone(),
        sqs: t.stack.clients.sqs.clone(),
    };
    let broken = ApiHandler::new(&clients, config, Faults::none());
    let body = order_body("p-i10", 4);
    let mut ctx = lambda_runtime::Context::default();
    ctx.deadline = (now_ms() + 60_000) as u64;
    let req = http::Request::builder()
        .method("POST")
        .uri("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "key-send-failed-1")
        .body(lambda_http::Body::Text(body.to_string()))
        .unwrap();
    let failed = broken
        .handle(saga_tests::via_gateway(
            lambda_http::RequestExt::with_lambda_context(req, ctx),
            "POST /orders",
            &t.subject(saga_tests::CUSTOMER).await,
        ))
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    let written = t.scan("OrdersTable").await;
    assert_eq!(written.len(), 1);
    let written = written[0]["orderId"].as_s().unwrap().clone();
    // The claim was made expired at once, although its invocation had a minute left.
    let record = stored(&t, &api_key(&t, "key-send-failed-1").await)
        .await
        .unwrap();
    assert_eq!(record.status, Status::InProgress);
    assert!(record.in_progress_until_ms.unwrap() < now_ms());

    let retry = post(&t, &body, Some("key-send-failed-1")).await;
    assert_eq!(retry.status, 202, "{}", retry.raw);
    assert_eq!(order_id(&retry), written, "the same order, finished");
    let o = t.wait_settled(&written, SETTLE).await;
    assert_eq!(o["status"], "CONFIRMED", "{o}");
    assert_eq!(t.product_quantity("p-i10").await, 6, "reserved once");
    let charges = t
        .ledger()
        .await
        .into_iter()
        .filter(|(k, o, _)| k == "CHARGE" && o == &written)
        .count();
    assert_eq!(
        charges, 1,
        "charged once although ChargePayment was sent twice"
    );
    assert_eq!(order_count(&t).await, 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_no_key_is_sent_should_create_an_order_per_request() {
    let t = paused_stack().await;
    t.put_product("p-i7", 100, 10).await;
    let body = order_body("p-i7", 1);
    let a = post(&t, &body, None).await;
    let b = post(&t, &body, None).await;
    assert_eq!((a.status, b.status), (202, 202), "{} {}", a.raw, b.raw);
    assert_ne!(order_id(&a), order_id(&b));
    assert!(!b.headers.contains_key("idempotent-replayed"));
    assert_eq!(order_count(&t).await, 2);
    assert_eq!(t.queue_depth("StockQueue").await, 2);
    assert_eq!(api_records(&t.idempotency_records().await), 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_key_has_outlived_its_24_hours_should_start_a_new_order() {
    let t = paused_stack().await;
    t.put_product("p-i8", 100, 10).await;
    let body = order_body("p-i8", 1);
    let request: PlaceOrderRequest = serde_json::from_value(body.clone()).unwrap();
    let hash = payload_hash(&request);
    let stale =
        json!({"statusCode": 202, "orderId": "o-yesterday", "body": {"orderId": "o-yesterday"}});
    // Written 25 hours ago with the API's 24-hour TTL; DynamoDB TTL has not removed it yet.
    store(&t)
        .put_completed(
            &completed(
                step(&api_key(&t, "key-old-1").await),
                &hash,
                &stale.to_string(),
                API_KEY_TTL,
            ),
            now_ms() - 25 * HOUR_MS,
        )
        .await
        .unwrap();
    let r = post(&t, &body, Some("key-old-1")).await;
    assert_eq!(r.status, 202, "{}", r.raw);
    assert_ne!(order_id(&r), "o-yesterday");
    assert!(!r.headers.contains_key("idempotent-replayed"));
    assert_eq!(order_count(&t).await, 1);
    let record = stored(&t, &api_key(&t, "key-old-1").await).await.unwrap();
    assert_eq!(record.order_id.as_deref(), Some(order_id(&r).as_str()));
    assert!(record.expires_at > now_ms() / 1000 + 23 * 3600);
    // The renewed key now belongs to the new request: another body is a reuse.
    let r2 = post(&t, &order_body("p-i8", 2), Some("key-old-1")).await;
    assert_error(&r2, 422, "IDEMPOTENCY_KEY_REUSED");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_idempotency_key_is_malformed_should_answer_400_and_write_nothing() {
    let t = paused_stack().await;
    t.put_product("p-i9", 100, 10).await;
    let body = order_body("p-i9", 1).to_string().into_bytes();
    let long = "k".repeat(256);
    let auth = format!("Bearer {}", t.token(saga_tests::CUSTOMER, false).await);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", b"".to_vec()),
        ("quoted empty", b"\"\"".to_vec()),
        ("256 characters", long.clone().into_bytes()),
        ("quoted 256 characters", format!("\"{long}\"").into_bytes()),
        ("tab (a control character)", b"key\twith-tab".to_vec()),
        ("inner space", b"key with-space".to_vec()),
        ("non-ASCII bytes", b"key-\xc3\xa9".to_vec()),
        ("obs-text byte", b"key-\xff".to_vec()),
    ];
    for (name, key) in &cases {
        let value = http::HeaderValue::from_bytes(key).unwrap_or_else(|e| panic!("{name}: {e}"));
        let req = hyper::Request::builder()
            .method("POST")
            .uri(format!("{}/orders", t.base))
            .header("content-type", "application/json")
            .header("authorization", &auth)
            .header("idempotency-key", value)
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.clone(),
            )))
            .unwrap();
        let r = send(req).await;
        assert_eq!(r.0, 400, "{name}: {}", r.1);
        let v: Value = serde_json::from_str(&r.1).unwrap_or(Value::Null);
        assert_eq!(
            v["error"]["code"], "INVALID_IDEMPOTENCY_KEY",
            "{name}: {}",
            r.1
        );
    }
    assert_eq!(order_count(&t).await, 0);
    assert!(t.idempotency_records().await.is_empty());
    assert_eq!(t.queue_depth("StockQueue").await, 0);

    // The longest key allowed, quoted or not, is one key.
    let longest = "k".repeat(255);
    let a = post(&t, &order_body("p-i9", 1), Some(&longest)).await;
    assert_eq!(a.status, 202, "{}", a.raw);
    let b = post(&t, &order_body("p-i9", 1), Some(&format!("\"{longest}\""))).await;
    assert_eq!(b.status, 202, "{}", b.raw);
    assert_eq!(order_id(&a), order_id(&b));
    assert_eq!(order_count(&t).await, 1);
    t.stop().await;
}

/// Sends a request with a header value the harness's `&str` headers cannot carry.
async fn send(req: hyper::Request<http_body_util::Full<hyper::body::Bytes>>) -> (u16, String) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let resp = client.request(req).await.expect("HTTP request");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}
