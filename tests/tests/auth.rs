//! Who may do what, through the runner's HTTP front as a client meets it: the JWT authorizer
//! (what API Gateway's does) in front of the order API, tokens from the template's user
//! pool in moto (InitiateAuth), and forged tokens signed with the pool's own key (moto's, the
//! one its JWKS publishes) so that each check is shown to fail on its own.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use local_runner::authorizer::{JwtAuthorizer, local_jwks_url};
use saga_tests::{ANONYMOUS, OPERATOR, Reply, TestStack, repo_root};
use serde_json::{Map, Value, json};

/// moto's signing key for its user pools, as a JWK (it ships in the moto package).
fn moto_private_jwk() -> Value {
    let venv_lib = repo_root().join(".venv/lib");
    let path = std::fs::read_dir(&venv_lib)
        .expect(".venv/lib (make setup)")
        .filter_map(Result::ok)
        .map(|python| {
            python
                .path()
                .join("site-packages/moto/cognitoidp/resources/jwks-private.json.gz")
        })
        .find(|p| p.exists())
        .expect("moto's jwks-private.json.gz");
    let mut json = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut json)
        .unwrap();
    // One key (a JWK), or a set of them.
    let jwk: Value = serde_json::from_str(&json).unwrap();
    match jwk.get("keys") {
        Some(keys) => keys[0].clone(),
        None => jwk,
    }
}

/// The same key, as jsonwebtoken signs with it, and its public half as PEM. The JWK holds only
/// `n`, `e` and `d`; the rsa crate recovers the primes.
fn moto_signing_key() -> (EncodingKey, String) {
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey, LineEnding};
    let jwk = moto_private_jwk();
    let part = |name: &str| {
        let bytes = URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
        rsa::BoxedUint::from_be_slice_vartime(&bytes)
    };
    let key = rsa::PrivateKey::from_components(part("n"), part("e"), part("d"), vec![])
        .expect("moto's key");
    let der = key.to_pkcs1_der().unwrap();
    let pem = key.to_public_key().to_pkcs1_pem(LineEnding::LF).unwrap();
    (EncodingKey::from_rsa_der(der.as_bytes()), pem)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims_of(token: &str) -> Map<String, Value> {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn sign(claims: &Map<String, Value>, kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// The authorizer the stack's HTTP front runs on `POST /orders`, built the same way.
async fn stack_authorizer(t: &TestStack) -> JwtAuthorizer {
    let template = &t.stack.template;
    let api = template.function("OrderApiFunction").unwrap();
    let route = api
        .http_routes
        .iter()
        .find(|r| r.route_key() == "POST /orders")
        .unwrap();
    let spec = template
        .route_authorizer(route)
        .unwrap()
        .expect("an authorizer");
    let (issuer, audiences) = template.resolve_authorizer(spec, &t.stack.names).unwrap();
    let pools: Vec<&str> = t
        .stack
        .names
        .user_pools
        .values()
        .map(String::as_str)
        .collect();
    let (_, sqs) = saga_tests::services().await;
    let url = local_jwks_url(&issuer, &pools, &sqs).unwrap();
    JwtAuthorizer::fetch(issuer, audiences, &spec.identity_source, &url)
        .await
        .unwrap()
}

async fn place_with(t: &TestStack, token: &str) -> Reply {
    let auth = format!("Bearer {token}");
    t.request(
        "POST",
        "/orders",
        Some(&json!({"items": [{"productId": "p-auth", "quantity": 1}]})),
        &[("authorization", &auth)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_token_is_missing_or_forged_should_answer_401_and_run_no_handler() {
    let t = TestStack::start().await;
    t.put_product("p-auth", 500, 10).await;
    let real = t.token("forger", false).await;
    let (key, public_pem) = moto_signing_key();
    let genuine = claims_of(&real);
    let kid = "dummy";

    // A token re-signed with the pool's key and the same claims is accepted: each forgery
    // below differs from it in one thing only.
    let control = place_with(&t, &sign(&genuine, kid, &key)).await;
    assert_eq!(control.status, 202, "{}", control.raw);
    let orders_before = t.scan("OrdersTable").await.len();

    let with = |changes: &[(&str, Value)]| {
        let mut c = genuine.clone();
        for (k, v) in changes {
            c.insert(k.to_string(), v.clone());
        }
        c
    };
    let tampered = {
        let mut parts: Vec<String> = real.split('.').map(str::to_string).collect();
        let payload = with(&[("sub", json!("someone-else"))]);
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&payload).unwrap());
        parts.join(".")
    };
    let alg_none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&genuine).unwrap())
    );
    let hs256_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        let secret = EncodingKey::from_secret(public_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &genuine, &secret).unwrap()
    };
    // Each forgery, and the check that refuses it (the authorizer's reason, which it logs).
    let forged: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("not a JWT", Some("hello".into())),
        (
            "expired",
            Some(sign(
                &with(&[("exp", json!(now() - 60)), ("iat", json!(now() - 3660))]),
                kid,
                &key,
            )),
        ),
        (
            "not yet valid",
            Some(sign(&with(&[("nbf", json!(now() + 3600))]), kid, &key)),
        ),
        (
            "issued in the future",
            Some(sign(&with(&[("iat", json!(now() + 3600))]), kid, &key)),
        ),
        (
            "wrong issuer",
            Some(sign(
                &with(&[(
                    "iss",
                    json!("https://cognito-idp.us-east-1.amazonaws.com/us-east-1_someoneelse"),
                )]),
                kid,
                &key,
            )),
        ),
        (
            "wrong audience",
            Some(sign(
                &with(&[("client_id", json!("another-app"))]),
                kid,
                &key,
            )),
        ),
        (
            "wrong aud beside a right client_id",
            Some(sign(&with(&[("aud", json!("another-app"))]), kid, &key)),
        ),
        ("tampered payload", Some(tampered)),
        ("alg none", Some(alg_none)),
        (
            "HS256 signed with the public key",
            Some(hs256_with_public_key),
        ),
        (
            "unknown kid",
            Some(sign(&genuine, "not-a-key-of-the-pool", &key)),
        ),
    ];
    let reasons = [
        ("not a JWT", "not a JWT"),
        ("expired", "ExpiredSignature"),
        ("not yet valid", "ImmatureSignature"),
        ("issued in the future", "issued in the future"),
        ("wrong issuer", "InvalidIssuer"),
        ("wrong audience", "another audience"),
        ("wrong aud beside a right client_id", "another audience"),
        ("tampered payload", "InvalidSignature"),
        ("alg none", "not a JWT"),
        ("HS256 signed with the public key", "is not RS256"),
        ("unknown kid", "no key with kid"),
    ];
    let authorizer = stack_authorizer(&t).await;
    for (what, reason) in reasons {
        let token = forged
            .iter()
            .find(|(w, _)| *w == what)
            .unwrap()
            .1
            .as_ref()
            .unwrap();
        let refusal = authorizer.verify(token).expect_err(what).to_string();
        assert!(
            refusal.contains(reason),
            "{what}: refused for {refusal:?}, not {reason:?}"
        );
    }
    assert!(authorizer.verify(&real).is_ok());
    for (what, token) in &forged {
        let auth = token
            .as_ref()
            .map_or(ANONYMOUS.to_string(), |t| format!("Bearer {t}"));
        let r = t
            .request(
                "POST",
                "/orders",
                Some(&json!({"items": [{"productId": "p-auth", "quantity": 1}]})),
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(r.status, 401, "{what}: {}", r.raw);
        assert_eq!(r.body, json!({"message": "Unauthorized"}), "{what}");
        // An operator's claims do not help a forged token either.
        let r = t
            .request(
                "PUT",
                "/products/p-auth",
                Some(&json!({"name": "free", "priceCents": 0, "quantity": 1_000_000})),
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(r.status, 401, "{what}: {}", r.raw);
    }
    assert_eq!(
        t.scan("OrdersTable").await.len(),
        orders_before,
        "nothing written"
    );
    let product = t
        .request(
            "GET",
            "/products/p-auth",
            None,
            &[("authorization", ANONYMOUS)],
        )
        .await;
    assert_eq!(
        product.status, 200,
        "the catalogue is public: {}",
        product.raw
    );
    assert_eq!(
        (
            product.body["priceCents"].as_u64(),
            product.body["quantity"].as_u64()
        ),
        (Some(500), Some(9)),
        "the price and stock are untouched (one unit went to the control order)"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_customers_share_a_shop_should_each_see_and_change_only_their_own() {
    let t = TestStack::start().await;
    t.put_product("p-own", 300, 50).await;
    let as_user = |token: String| format!("Bearer {token}");
    let alice = as_user(t.token("alice", false).await);
    let bob = as_user(t.token("bob", false).await);
    let body = json!({"items": [{"productId": "p-own", "quantity": 1}]});
    let mut alices = Vec::new();
    for _ in 0..2 {
        let r = t
            .request("POST", "/orders", Some(&body), &[("authorization", &alice)])
            .await;
        assert_eq!(r.status, 202, "{}", r.raw);
        assert_eq!(r.body["customerId"], t.subject("alice").await.as_str());
        alices.push(r.body["orderId"].as_str().unwrap().to_string());
    }
    let r = t
        .request("POST", "/orders", Some(&body), &[("authorization", &bob)])
        .await;
    let bobs = r.body["orderId"].as_str().unwrap().to_string();

    // Bob cannot read Alice's order; the answer is the one for an order that does not exist.
    let theirs = t
        .request(
            "GET",
            &format!("/orders/{}", alices[0]),
            None,
            &[("authorization", &bob)],
        )
        .await;
    let missing = t
        .request(
            "GET",
            "/orders/o-does-not-exist",
            None,
            &[("authorization", &bob)],
        )
        .await;
    assert_eq!((theirs.status, missing.status), (404, 404));
    assert_eq!(
        theirs.raw.replace(&alices[0], "X"),
        missing.raw.replace("o-does-not-exist", "X")
    );
    let mine = t
        .request(
            "GET",
            &format!("/orders/{}", alices[0]),
            None,
            &[("authorization", &alice)],
        )
        .await;
    assert_eq!(mine.status, 200);
    let operator = as_user(t.token(OPERATOR, true).await);
    let any = t
        .request(
            "GET",
            &format!("/orders/{bobs}"),
            None,
            &[("authorization", &operator)],
        )
        .await;
    assert_eq!(any.status, 200, "operators read any order");

    // Each list holds exactly its owner's orders.
    let list = |auth: String| {
        let t = &t;
        async move {
            let r = t
                .request("GET", "/orders", None, &[("authorization", &auth)])
                .await;
            assert_eq!(r.status, 200, "{}", r.raw);
            r.body["orders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["orderId"].as_str().unwrap().to_string())
                .collect::<BTreeSet<_>>()
        }
    };
    assert_eq!(list(alice.clone()).await, alices.iter().cloned().collect());
    assert_eq!(list(bob.clone()).await, BTreeSet::from([bobs.clone()]));

    // Customers cannot change the catalogue: 403 with the JSON error, and nothing changes.
    for auth in [&alice, &bob] {
        let r = t
            .request(
                "PUT",
                "/products/p-own",
                Some(&json!({"name": "free", "priceCents": 0, "quantity": 1_000_000})),
                &[("authorization", auth)],
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.raw);
        assert_eq!(r.body["error"]["code"], "FORBIDDEN");
    }
    let product = t.request("GET", "/products/p-own", None, &[]).await;
    assert_eq!(product.body["priceCents"], 300);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_paging_while_orders_arrive_should_lose_none_and_repeat_none() {
    let t = TestStack::start().await;
    t.put_product("p-page", 100, 1_000).await;
    let alice = format!("Bearer {}", t.token("alice", false).await);
    let bob = format!("Bearer {}", t.token("bob", false).await);
    let body = json!({"items": [{"productId": "p-page", "quantity": 1}]});
    let place = |auth: String| {
        let t = &t;
        let body = body.clone();
        async move {
            let r = t
                .request("POST", "/orders", Some(&body), &[("authorization", &auth)])
                .await;
            assert_eq!(r.status, 202, "{}", r.raw);
            r.body["orderId"].as_str().unwrap().to_string()
        }
    };
    let mut before = BTreeSet::new();
    for _ in 0..12 {
        before.insert(place(alice.clone()).await);
    }
    // Page through Alice's list, three at a time, while both customers keep ordering.
    let walk = async {
        let mut seen = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let path = match &next {
                None => "/orders?limit=3".to_string(),
                Some(token) => format!("/orders?limit=3&nextToken={token}"),
            };
            let r = t
                .request("GET", &path, None, &[("authorization", &alice)])
                .await;
            assert_eq!(r.status, 200, "{}", r.raw);
            let page = r.body["orders"].as_array().unwrap().clone();
            assert!(page.len() <= 3);
            seen.extend(page);
            match r.body.get("nextToken").and_then(Value::as_str) {
                Some(token) => next = Some(token.to_string()),
                None => return seen,
            }
        }
    };
    let arrivals = async {
        let mut placed = Vec::new();
        for i in 0..15 {
            let who = if i % 3 == 0 {
                bob.clone()
            } else {
                alice.clone()
            };
            placed.push(place(who).await);
        }
        placed
    };
    let (seen, _) = tokio::join!(walk, arrivals);
    let alice_sub = t.subject("alice").await;
    let ids: Vec<String> = seen
        .iter()
        .map(|o| o["orderId"].as_str().unwrap().to_string())
        .collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique.len(), ids.len(), "no order twice: {ids:?}");
    assert!(
        before.is_subset(&unique),
        "every order that existed is seen"
    );
    assert!(
        seen.iter().all(|o| o["customerId"] == alice_sub.as_str()),
        "only Alice's"
    );
    let times: Vec<&str> = seen
        .iter()
        .map(|o| o["createdAt"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_two_customers_send_one_idempotency_key_should_get_two_orders() {
    let t = TestStack::start().await;
    t.put_product("p-key", 100, 10).await;
    let body = json!({"items": [{"productId": "p-key", "quantity": 1}]});
    let mut first = HashMap::new();
    for user in ["alice", "bob"] {
        let auth = format!("Bearer {}", t.token(user, false).await);
        let headers = [
            ("authorization", auth.as_str()),
            ("idempotency-key", "same-key-1"),
        ];
        let r = t.request("POST", "/orders", Some(&body), &headers).await;
        assert_eq!(r.status, 202, "{}", r.raw);
        assert!(
            !r.headers.contains_key("idempotent-replayed"),
            "{user}: a new order"
        );
        first.insert(user, r.body.clone());
        let again = t.request("POST", "/orders", Some(&body), &headers).await;
        assert_eq!(again.body, r.body, "{user} replays their own order");
    }
    assert_ne!(first["alice"]["orderId"], first["bob"]["orderId"]);
    assert_eq!(t.scan("OrdersTable").await.len(), 2);
    t.stop().await;
}
