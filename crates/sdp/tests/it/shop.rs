//! The realistic Go service of the deploy benchmark (`bench/deploy.sh`, the test kit's
//! `fixtures/shop`): deployed once here, so that its fixture cannot rot unseen. It builds
//! offline from its vendored modules (`GOPROXY=off`) and answers through the router.

use std::time::Duration;

use sdp_testkit::{Reply, TestEnv};
use serde_json::{Value, json};

use crate::SDP;

/// Sends `req` (to the router) for sandbox `sandbox`; returns the reply and its route.
async fn through_router(sandbox: &str, req: reqwest::RequestBuilder) -> (Reply, Option<String>) {
    let resp = req
        .header("X-SDP-Sandbox", sandbox)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    let route = resp
        .headers()
        .get("x-sdp-route")
        .map(|v| v.to_str().unwrap().to_owned());
    (Reply::from(resp).await, route)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_realistic_go_service_builds_offline_from_its_vendored_modules_and_answers_through_the_router()
 {
    let env = TestEnv::builder(SDP)
        .repos(&["shop"])
        .catalog(&["shop"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "store", &["shop@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    assert_eq!(sandbox["services"][0]["state"], "running", "{sandbox}");

    let http = reqwest::Client::new();
    let router = env.router_url();
    let (index, route) = through_router("store", http.get(format!("{router}/shop"))).await;
    assert_eq!(index.status, 200, "{}", index.body);
    assert_eq!(route.as_deref(), Some("sandbox"));
    let index = index.json();
    assert_eq!(
        index["service"], "shop/shop",
        "the revision is the repository's name"
    );
    assert_eq!(index["sandbox"], "store");

    let (products, _) = through_router(
        "store",
        http.get(format!("{router}/shop/products?in_stock=true&limit=1")),
    )
    .await;
    assert_eq!(products.status, 200, "{}", products.body);
    let product: Value = products.json()["items"][0].clone();

    let customer = json!({
        "email": "ann@example.com", "name": "Ann", "tier": "gold",
        "address": {"line1": "1 Main St", "city": "Berlin", "postal_code": "10115", "country": "DE"},
    });
    let (created, _) = through_router(
        "store",
        http.post(format!("{router}/shop/customers"))
            .json(&customer),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let order = json!({
        "customer_id": created.json()["id"],
        "lines": [{"product_id": product["id"], "quantity": 1}],
    });
    let (placed, _) = through_router(
        "store",
        http.post(format!("{router}/shop/orders")).json(&order),
    )
    .await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    assert_eq!(placed.json()["status"], "placed");
    assert_eq!(
        placed.json()["lines"][0]["unit_price"],
        product["price"],
        "{}",
        placed.body
    );
}
