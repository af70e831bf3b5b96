//! Load: 200 concurrent orders of 1 to 3 units over 5 products with scarce stock and a
//! payment failure rate of 0.2. Afterwards every order is final and the invariants hold.

use std::time::{Duration, Instant};

use futures::StreamExt;
use saga_tests::{Pacer, TestStack, assert_invariants};

/// Placement waits while the work queues hold this many messages (see [`Pacer`]).
const BACKLOG_BOUND: i64 = 200;
/// However slow the machine, 200 paced orders settle well within this.
const SETTLE: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_200_orders_compete_for_scarce_stock_with_random_declines_should_keep_every_invariant()
{
    let t = TestStack::start_with(|o| {
        o.env_overrides
            .insert("PAYMENT_FAILURE_RATE".into(), "0.2".into());
    })
    .await;
    let products = saga_tests::catalogue("p-load", 5, 20, 10);
    let initial = t.stock_catalogue(&products, |qty| 100 + qty as u64).await;

    let started = Instant::now();
    let orders: Vec<Vec<(String, u64)>> = (0..200)
        .map(|_| saga_tests::random_basket(&products))
        .collect();
    let pacer = Pacer::new(&t, BACKLOG_BOUND);
    let ids: Vec<String> = futures::stream::iter(orders.iter())
        .map(|items| {
            let (t, pacer) = (&t, &pacer);
            async move {
                pacer.admit().await;
                let items: Vec<(&str, u64)> = items.iter().map(|(p, q)| (p.as_str(), *q)).collect();
                t.place_ok(&items, None).await
            }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let placed_in = started.elapsed();
    let settled = t.wait_all_settled(&ids, SETTLE).await;
    let (peak_backlog, paced) = pacer.report().await;
    let confirmed = settled
        .iter()
        .filter(|o| o["status"] == "CONFIRMED")
        .count();
    let declined = settled
        .iter()
        .filter(|o| o["cancelReason"] == "PAYMENT_DECLINED")
        .count();
    let short = settled
        .iter()
        .filter(|o| o["cancelReason"] == "INSUFFICIENT_STOCK")
        .count();
    eprintln!(
        "load: 200 orders placed in {placed_in:?}, all settled in {:?}: {confirmed} confirmed, {declined} declined, {short} short of stock; backlog peaked at {peak_backlog}, placement waited {paced} times",
        started.elapsed()
    );
    assert_eq!(settled.len(), 200);
    assert!(
        confirmed > 0 && declined > 0 && short > 0,
        "the mix should exercise every path"
    );
    assert_invariants(&t, &settled, &initial).await;
    t.stop().await;
}

/// The local event source mapping's batching window, both ways. By default a batch goes to
/// its function at the first receive that comes back empty: with the longest window SQS
/// allows (300 s) an order still settles in well under that. With `fill_batching_window`
/// (the load benchmark), as on Lambda, a batch waits out its whole window before its
/// function gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_batching_window_is_set_should_hold_a_batch_for_it_only_when_asked_to_fill_it() {
    for (fill, window) in [(false, 300), (true, 2)] {
        let probe = local_runner::timing::Probe::default();
        let t = TestStack::start_with(|o| {
            o.batching_window = Some(Duration::from_secs(window));
            o.fill_batching_window = fill;
            o.probe = Some(probe.clone());
        })
        .await;
        let products = saga_tests::catalogue("p-window", 1, 10, 10);
        t.stock_catalogue(&products, |qty| 100 + qty as u64).await;
        let id = t.place_ok(&[(products[0].0.as_str(), 1)], None).await;
        // Three hops in a row; a 300 s window waited out would take 900 s.
        t.wait_all_settled(&[id], Duration::from_secs(240)).await;
        let samples = probe.take();
        let waits: Vec<f64> = samples
            .deliveries
            .iter()
            .filter(|d| d.function == "StockFunction" && d.first)
            .map(|d| d.batching_wait_ms)
            .collect();
        assert!(!waits.is_empty(), "no delivery to the stock function");
        if fill {
            assert!(
                waits.iter().all(|w| *w >= 1_900.0),
                "a {window} s window, filled: {waits:?}"
            );
        }
        t.stop().await;
    }
}
