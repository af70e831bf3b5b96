//! `saga-local audit` over the wire (DynamoDB Local and moto): after a run of the saga with
//! confirmations, customer cancellations, declines and stock adjustments, the audit finds
//! nothing, as a library call and as the command. Then one corruption per invariant is
//! planted by hand in the tables, and the audit reports exactly that invariant with the ids
//! involved (the command exits 1), and nothing once it is undone.

use std::collections::{BTreeSet, HashMap};
use std::process::Output;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use futures::StreamExt;
use local_runner::audit::Finding;
use saga_tests::{TestStack, saga_local_binary};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(300);

type Item = HashMap<String, AttributeValue>;

async fn wait_quiet(t: &TestStack) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !t.queues_idle().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queues not quiet in {SETTLE:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `saga-local audit --prefix <the stack's> ...`, from the repository.
fn run_audit(t: &TestStack, dynamodb: &str, args: &[&str]) -> Output {
    run_saga_local("audit", t, dynamodb, args)
}

/// `saga-local <command> --prefix <the stack's> ...` (a command that reads the stack's
/// tables), from the repository.
fn run_saga_local(command: &str, t: &TestStack, dynamodb: &str, args: &[&str]) -> Output {
    std::process::Command::new(saga_local_binary())
        .arg(command)
        .args(["--prefix", &t.prefix, "--dynamodb-endpoint", dynamodb])
        .args(args)
        .current_dir(saga_tests::repo_root())
        .env_remove("SAGA_PREFIX")
        .output()
        .expect("saga-local runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Tables<'a> {
    t: &'a TestStack,
}

impl Tables<'_> {
    fn db(&self) -> &aws_sdk_dynamodb::Client {
        &self.t.stack.clients.dynamodb
    }

    fn name(&self, logical: &str) -> &str {
        self.t.stack.table(logical)
    }

    async fn get(&self, logical: &str, key: &[(&str, &str)]) -> Item {
        let mut req = self
            .db()
            .get_item()
            .table_name(self.name(logical))
            .consistent_read(true);
        for (k, v) in key {
            req = req.key(*k, AttributeValue::S((*v).into()));
        }
        req.send()
            .await
            .expect("get")
            .item
            .unwrap_or_else(|| panic!("no {logical} item {key:?}"))
    }

    async fn put(&self, logical: &str, item: Item) {
        self.db()
            .put_item()
            .table_name(self.name(logical))
            .set_item(Some(item))
            .send()
            .await
            .expect("put");
    }

    async fn delete(&self, logical: &str, key: &[(&str, &str)]) {
        let mut req = self.db().delete_item().table_name(self.name(logical));
        for (k, v) in key {
            req = req.key(*k, AttributeValue::S((*v).into()));
        }
        req.send().await.expect("delete");
    }

    /// Moves `units` of a product from `reserved` to `quantity` (negative: the other way).
    async fn unreserve(&self, product: &str, units: i64) {
        self.db()
            .update_item()
            .table_name(self.name("ProductsTable"))
            .key("productId", AttributeValue::S(product.into()))
            .update_expression("ADD quantity :n, reserved :m")
            .expression_attribute_values(":n", AttributeValue::N(units.to_string()))
            .expression_attribute_values(":m", AttributeValue::N((-units).to_string()))
            .send()
            .await
            .expect("update");
    }
}

fn n(item: &Item, attr: &str) -> i64 {
    item.get(attr)
        .and_then(|v| v.as_n().ok())
        .map_or(0, |v| v.parse().unwrap())
}

fn lines(o: &Value) -> Vec<(String, i64)> {
    o["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["productId"].as_str().unwrap().to_string(),
                i["quantity"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn invariants(findings: &[Finding]) -> BTreeSet<usize> {
    findings.iter().map(Finding::invariant).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_saga_has_run_should_find_nothing_and_report_each_planted_corruption() {
    let (dynamodb, _) = saga_tests::services().await;
    let t = TestStack::start_with(|o| {
        o.env_overrides
            .insert("PAYMENT_FAILURE_RATE".into(), "0.2".into());
    })
    .await;
    let products = saga_tests::catalogue("p-audit", 3, 40, 10);
    t.stock_catalogue(&products, |q| 100 + q as u64).await;
    let pid = |i: usize| products[i].0.clone();
    for (i, delta) in [(0, 5), (1, -2), (2, 3)] {
        let r = t.adjust_stock(&pid(i), delta, "audit test", None).await;
        assert_eq!(r.status, 201, "{}", r.raw);
    }

    // 30 orders: two declined for sure, a third cancelled by their customer at a random
    // point, the rest left to the saga (with random declines).
    let placed: Vec<String> = futures::stream::iter(0..30usize)
        .map(|i| {
            let t = &t;
            let basket = saga_tests::random_basket(&products);
            async move {
                let items: Vec<(&str, u64)> =
                    basket.iter().map(|(p, q)| (p.as_str(), *q)).collect();
                let method = (i < 2).then_some("tok_chargeDeclined");
                let id = t.place_ok(&items, method).await;
                if i % 3 == 2 {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..800))).await;
                    let r = t
                        .request("POST", &format!("/orders/{id}/cancel"), None, &[])
                        .await;
                    assert_eq!(r.status, 200, "{}", r.raw);
                }
                id
            }
        })
        .buffer_unordered(10)
        .collect()
        .await;
    let settled = t.wait_all_settled(&placed, SETTLE).await;
    // Two confirmed orders cancelled after the fact: released and refunded.
    let confirmed: Vec<&Value> = settled
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .collect();
    assert!(confirmed.len() >= 4, "too few confirmed: {settled:?}");
    for o in &confirmed[..2] {
        let r = t
            .request(
                "POST",
                &format!("/orders/{}/cancel", o["orderId"].as_str().unwrap()),
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.raw);
    }
    let settled = t.wait_all_settled(&placed, SETTLE).await;
    wait_quiet(&t).await;
    let count = |f: &dyn Fn(&Value) -> bool| settled.iter().filter(|o| f(o)).count();
    eprintln!(
        "audit run: {} confirmed, {} cancelled by customers, {} declined",
        count(&|o| o["status"] == "CONFIRMED"),
        count(&|o| o["cancelReason"] == "CUSTOMER_CANCELLED"),
        count(&|o| o["cancelReason"] == "PAYMENT_DECLINED"),
    );

    // Clean: the library call, and the command.
    let report = t.audit().await;
    assert!(report.clean(), "{}", report.text());
    eprintln!("library audit:\n{}", report.text());
    assert!(report.tables.values().all(|s| s.items > 0), "{report:?}");
    let out = run_audit(&t, &dynamodb, &[]);
    eprintln!(
        "saga-local audit:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("no findings"));
    assert!(text(&out.stdout).contains("read capacity"));

    let db = Tables { t: &t };
    let by_status = |status: &str, stock: &str, payment: &str| -> Vec<&Value> {
        settled
            .iter()
            .filter(|o| {
                o["status"] == status && o["stockStatus"] == stock && o["paymentStatus"] == payment
            })
            .collect()
    };
    let confirmed = by_status("CONFIRMED", "RESERVED", "CHARGED");
    let c = confirmed[0];
    let c_id = c["orderId"].as_str().unwrap().to_string();
    // Which confirmed orders hold units of a product (the live reservations).
    let holders = |product: &str| -> Vec<String> {
        let mut ids: Vec<String> = confirmed
            .iter()
            .filter(|o| lines(o).iter().any(|(p, _)| p == product))
            .map(|o| o["orderId"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };

    // 1. A negative quantity (recorded as a movement, so only invariant 1 breaks); the command
    //    exits 1 and names the product.
    let p0 = pid(0);
    let before = db.get("ProductsTable", &[("productId", &p0)]).await;
    let mut item = before.clone();
    item.insert("quantity".into(), AttributeValue::N("-1".into()));
    db.put("ProductsTable", item).await;
    let planted = format!("{:015}#planted", 1);
    let movement: Item = [
        ("productId", AttributeValue::S(p0.clone())),
        ("movementId", AttributeValue::S(planted.clone())),
        (
            "delta",
            AttributeValue::N((-1 - n(&before, "quantity")).to_string()),
        ),
        ("reason", AttributeValue::S("planted".into())),
        ("actor", AttributeValue::S("test".into())),
        ("atMs", AttributeValue::N("1".into())),
        ("quantityAfter", AttributeValue::N("0".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    db.put("StockMovementsTable", movement).await;
    assert_eq!(
        t.audit_findings().await,
        vec![Finding::NegativeStock {
            product_id: p0.clone(),
            quantity: -1,
            reserved: n(&before, "reserved"),
        }]
    );
    let out = run_audit(&t, &dynamodb, &["--segments", "2"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    let finding = stdout
        .lines()
        .find(|l| l.starts_with("FINDING"))
        .expect("a finding line");
    assert!(
        finding.contains("invariant 1 ") && finding.contains(&p0),
        "{finding}"
    );
    let out = run_audit(&t, &dynamodb, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["findings"][0]["kind"], "negativeStock");
    assert_eq!(json["findings"][0]["productId"], p0.as_str());
    db.put("ProductsTable", before).await;
    db.delete(
        "StockMovementsTable",
        &[("productId", &p0), ("movementId", &planted)],
    )
    .await;
    t.assert_audit_clean().await;

    // 2. `reserved` one more than the reservations hold (quantity one less: the sum stands).
    let p1 = pid(1);
    let before = db.get("ProductsTable", &[("productId", &p1)]).await;
    db.unreserve(&p1, -1).await;
    assert_eq!(
        t.audit_findings().await,
        vec![Finding::ReservedMismatch {
            product_id: p1.clone(),
            reserved: n(&before, "reserved") + 1,
            held: n(&before, "reserved"),
            orders: holders(&p1),
        }]
    );
    db.unreserve(&p1, 1).await;
    t.assert_audit_clean().await;

    // 3. A movement deleted.
    let p2 = pid(2);
    let moves = t.movements(&p2).await;
    let gone = moves.last().unwrap().clone();
    db.delete(
        "StockMovementsTable",
        &[("productId", &p2), ("movementId", &gone.movement_id)],
    )
    .await;
    let product = db.get("ProductsTable", &[("productId", &p2)]).await;
    assert_eq!(
        t.audit_findings().await,
        vec![Finding::MovementsMismatch {
            product_id: p2.clone(),
            quantity: n(&product, "quantity"),
            reserved: n(&product, "reserved"),
            legacy_held: 0,
            movements: moves.len() - 1,
            movements_sum: moves.iter().map(|m| m.delta).sum::<i64>() - gone.delta,
        }]
    );
    db.put(
        "StockMovementsTable",
        saga_core::adapters::dynamo::to_item(&gone).unwrap(),
    )
    .await;
    t.assert_audit_clean().await;

    // 4. A confirmed order's reservation released behind its back (units and `reserved`
    //    moved consistently): it holds nothing.
    let mut release = db
        .get("IdempotencyTable", &[("id", &format!("{c_id}#reserve"))])
        .await;
    release.insert("id".into(), AttributeValue::S(format!("{c_id}#release")));
    release.insert("outcome".into(), AttributeValue::S("RELEASED".into()));
    db.put("IdempotencyTable", release).await;
    for (p, q) in lines(c) {
        db.unreserve(&p, q).await;
    }
    assert_eq!(
        t.audit_findings().await,
        vec![Finding::ConfirmedWithoutReservation {
            order_id: c_id.clone()
        }]
    );
    db.delete("IdempotencyTable", &[("id", &format!("{c_id}#release"))])
        .await;
    for (p, q) in lines(c) {
        db.unreserve(&p, -q).await;
    }
    t.assert_audit_clean().await;

    // 4 (and 7). A second approved charge of a confirmed order.
    let mut charge = db
        .get(
            "PaymentLedgerTable",
            &[("idempotencyKey", &format!("{c_id}#charge"))],
        )
        .await;
    let twice = format!("{c_id}#charge-again");
    charge.insert("idempotencyKey".into(), AttributeValue::S(twice.clone()));
    db.put("PaymentLedgerTable", charge).await;
    let f = t.audit_findings().await;
    assert_eq!(invariants(&f), BTreeSet::from([4, 7]), "{f:?}");
    assert!(f.contains(&Finding::ConfirmedNotChargedOnce {
        order_id: c_id.clone(),
        charges: 2,
        refunds: 0
    }));
    assert!(
        matches!(&f[1], Finding::LedgerMismatch { orders, .. } if orders == &vec![c_id.clone()]),
        "{f:?}"
    );
    db.delete("PaymentLedgerTable", &[("idempotencyKey", &twice)])
        .await;
    t.assert_audit_clean().await;

    // 5 (and 2). A cancelled order's release record deleted: its reservation holds again,
    //    which `reserved` does not count.
    let x = by_status("CANCELLED", "RELEASED", "REFUNDED")[0];
    let x_id = x["orderId"].as_str().unwrap().to_string();
    let key = format!("{x_id}#release");
    let record = db.get("IdempotencyTable", &[("id", &key)]).await;
    db.delete("IdempotencyTable", &[("id", &key)]).await;
    let f = t.audit_findings().await;
    assert_eq!(invariants(&f), BTreeSet::from([2, 5]), "{f:?}");
    assert_eq!(
        f.last(),
        Some(&Finding::CancelledStillReserved {
            order_id: x_id.clone()
        })
    );
    let mismatched: BTreeSet<String> = f
        .iter()
        .filter_map(|f| match f {
            Finding::ReservedMismatch {
                product_id, orders, ..
            } => {
                assert!(orders.contains(&x_id), "{f:?}");
                Some(product_id.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        mismatched,
        lines(x)
            .into_iter()
            .map(|(p, _)| p)
            .collect::<BTreeSet<_>>()
    );
    db.put("IdempotencyTable", record).await;
    t.assert_audit_clean().await;

    // 5 (and 7). A cancelled order's refund deleted from the ledger.
    let refund_key = format!("{x_id}#refund");
    let refund = db
        .get("PaymentLedgerTable", &[("idempotencyKey", &refund_key)])
        .await;
    db.delete("PaymentLedgerTable", &[("idempotencyKey", &refund_key)])
        .await;
    let f = t.audit_findings().await;
    assert_eq!(
        f[0],
        Finding::CancelledNotRefunded {
            order_id: x_id.clone(),
            charges: 1,
            refunds: 0
        }
    );
    assert!(
        matches!(&f[..], [_, Finding::LedgerMismatch { orders, .. }] if orders == &vec![x_id.clone()]),
        "{f:?}"
    );
    db.put("PaymentLedgerTable", refund).await;
    t.assert_audit_clean().await;

    // 6. An order PENDING since an hour ago (and nothing else about it).
    let mut stale = db.get("OrdersTable", &[("orderId", &c_id)]).await;
    for (k, v) in [
        ("orderId", "o-stale"),
        ("status", "PENDING"),
        ("stockStatus", "PENDING"),
        ("paymentStatus", "PENDING"),
    ] {
        stale.insert(k.into(), AttributeValue::S(v.into()));
    }
    stale.remove("paymentId");
    let an_hour_ago = saga_core::time::now_ms() - 3_600_000;
    stale.insert(
        "createdAtMs".into(),
        AttributeValue::N(an_hour_ago.to_string()),
    );
    db.put("OrdersTable", stale).await;
    let f = t.audit_findings().await;
    assert!(
        matches!(&f[..], [Finding::PendingPastTimeout { order_id, age_seconds, limit_seconds: 420 }]
            if order_id == "o-stale" && (3600..3700).contains(age_seconds)),
        "{f:?}"
    );
    db.delete("OrdersTable", &[("orderId", "o-stale")]).await;
    t.assert_audit_clean().await;

    // 7. A confirmed order's total changed.
    let order = db.get("OrdersTable", &[("orderId", &c_id)]).await;
    let mut changed = order.clone();
    let total = n(&order, "totalCents");
    changed.insert(
        "totalCents".into(),
        AttributeValue::N((total + 1).to_string()),
    );
    db.put("OrdersTable", changed).await;
    let f = t.audit_findings().await;
    assert!(
        matches!(&f[..], [Finding::LedgerMismatch { orders, charged_cents, refunded_cents, confirmed_cents }]
            if orders == &vec![c_id.clone()]
                && *charged_cents as i64 - *refunded_cents as i64 + 1 == *confirmed_cents as i64),
        "{f:?}"
    );
    db.put("OrdersTable", order).await;
    t.assert_audit_clean().await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_audit_cannot_run_should_say_why_and_exit_2() {
    let (dynamodb, _) = saga_tests::services().await;
    let root = saga_tests::repo_root();
    let audit = |args: &[&str]| {
        std::process::Command::new(saga_local_binary())
            .arg("audit")
            .args(args)
            .current_dir(&root)
            .env_remove("SAGA_PREFIX")
            .output()
            .expect("saga-local runs")
    };
    // Some table names but not all five: a usage error.
    let out = audit(&["--orders-table", "o"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    // No such tables (a prefix no stack has).
    let out = audit(&["--prefix", "nosuchstack-", "--dynamodb-endpoint", &dynamodb]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("does not exist"),
        "{}",
        text(&out.stderr)
    );
    // Nothing listening.
    let out = audit(&["--dynamodb-endpoint", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("does not answer"),
        "{}",
        text(&out.stderr)
    );
    let help = audit(&["--help"]);
    let help = text(&help.stdout);
    assert!(help.contains("one full scan of the five tables"), "{help}");
}

/// `saga-local opening-balances --prefix <the stack's> ...`, from the repository.
fn run_opening(t: &TestStack, dynamodb: &str, args: &[&str]) -> Output {
    run_saga_local("opening-balances", t, dynamodb, args)
}

/// A product created before stock movements were recorded (planted as that version wrote it:
/// no movement, no `reserved`, no `version`), restocked through the API since: the audit
/// flags it (invariant 3). `opening-balances` without `--apply` says what it would write and
/// writes nothing; with `--apply` it writes the opening balance once, and not for a product
/// created by this version; the audit then finds nothing, and another run writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_product_predates_movements_should_get_its_opening_balance_once() {
    let (dynamodb, _) = saga_tests::services().await;
    let t = TestStack::start_paused().await;
    let db = Tables { t: &t };
    let s = |v: &str| AttributeValue::S(v.into());
    db.put(
        "ProductsTable",
        Item::from([
            ("productId".into(), s("p-old")),
            ("name".into(), s("Old")),
            ("priceCents".into(), AttributeValue::N("100".into())),
            ("quantity".into(), AttributeValue::N("7".into())),
        ]),
    )
    .await;
    let created = t
        .as_operator(
            "PUT",
            "/products/p-new",
            &serde_json::json!({"name": "New", "priceCents": 100, "quantity": 4}),
            &[],
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.raw);
    let r = t.adjust_stock("p-old", 3, "restock", None).await;
    assert_eq!(r.status, 201, "{}", r.raw);

    let report = t.audit().await;
    let findings: Vec<String> = report.findings.iter().map(|f| f.to_string()).collect();
    assert_eq!(
        invariants(&report.findings),
        BTreeSet::from([3]),
        "{findings:?}"
    );
    assert!(findings.iter().all(|f| f.contains("p-old")), "{findings:?}");

    // Read only: says +7 would be written, writes nothing.
    let dry = run_opening(&t, &dynamodb, &[]);
    let out = text(&dry.stdout);
    assert_eq!(dry.status.code(), Some(0), "{out}{}", text(&dry.stderr));
    assert!(
        out.contains("p-old:") && out.contains("+7: would be written"),
        "{out}"
    );
    assert!(!out.contains("p-new"), "{out}");
    assert!(!t.audit().await.clean());

    // Applied: the movement, first in the product's history, and the audit is clean.
    let applied = run_opening(&t, &dynamodb, &["--apply", "--json"]);
    assert_eq!(applied.status.code(), Some(0), "{}", text(&applied.stderr));
    let json: Value = serde_json::from_slice(&applied.stdout).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["outcome"], "written", "{json}");
    assert_eq!(json[0]["opening"]["delta"], 7, "{json}");
    let movement = db
        .get(
            "StockMovementsTable",
            &[
                ("productId", "p-old"),
                ("movementId", local_runner::opening::OPENING_MOVEMENT_ID),
            ],
        )
        .await;
    assert_eq!(n(&movement, "delta"), 7);
    // Its quantity after: the product's when it was written (after the restock).
    assert_eq!(n(&movement, "quantityAfter"), 10);
    let report = t.audit().await;
    assert!(report.clean(), "{}", report.text());

    // Again: nothing left to write.
    let again = run_opening(&t, &dynamodb, &["--apply"]);
    assert_eq!(again.status.code(), Some(0), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("no product needs an opening balance"),
        "{}",
        text(&again.stdout)
    );
    t.stop().await;
}
