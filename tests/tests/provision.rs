//! Provisioning over what an earlier run left: `make run` keeps its tables (in
//! `.local/dynamodb`) and its user pool across restarts and upgrades.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use saga_tests::TestStack;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_kept_table_lacks_an_index_the_template_added_should_add_it_and_serve_the_route() {
    let (dynamodb_endpoint, sqs_endpoint) = saga_tests::services().await;
    let clients =
        local_runner::stack::local_clients(&dynamodb_endpoint, &sqs_endpoint, "us-east-1").await;
    let prefix = format!("u{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    // The orders table as an earlier version created it: the pending index only.
    let key = |name: &str, key_type: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()
            .unwrap()
    };
    let attribute = |name: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(t)
            .build()
            .unwrap()
    };
    clients
        .dynamodb
        .create_table()
        .table_name(format!("{prefix}OrdersTable"))
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("orderId", KeyType::Hash))
        .attribute_definitions(attribute("orderId", ScalarAttributeType::S))
        .attribute_definitions(attribute("pendingSweep", ScalarAttributeType::S))
        .attribute_definitions(attribute("createdAtMs", ScalarAttributeType::N))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("PendingOrdersIndex")
                .key_schema(key("pendingSweep", KeyType::Hash))
                .key_schema(key("createdAtMs", KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .expect("the old table");

    let t = TestStack::start_with(|o| o.prefix = prefix.clone()).await;
    let table = clients
        .dynamodb
        .describe_table()
        .table_name(format!("{prefix}OrdersTable"))
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let indexes: Vec<&str> = (table.global_secondary_indexes().iter())
        .filter_map(|i| i.index_name())
        .collect();
    assert!(indexes.contains(&"CustomerOrdersIndex"), "{indexes:?}");
    t.put_product("p-up", 100, 5).await;
    let id = t.place_ok(&[("p-up", 1)], None).await;
    let list = t.request("GET", "/orders", None, &[]).await;
    assert_eq!(list.status, 200, "{}", list.raw);
    assert_eq!(list.body["orders"][0]["orderId"], id.as_str());

    // Started again on the same prefix: the same pool and client, so tokens stay valid.
    let token = t.token("keeper", false).await;
    let pool = t.stack.names.user_pools.clone();
    let again = TestStack::start_with(|o| o.prefix = prefix.clone()).await;
    assert_eq!(again.stack.names.user_pools, pool);
    let auth = format!("Bearer {token}");
    let r = again
        .request("GET", "/orders", None, &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, 200, "{}", r.raw);
    again.stack.stop().await;
    t.stop().await;
}
