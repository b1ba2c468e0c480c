//! Sandboxes that sleep: requests for them are held while the router asks to wake them, and
//! routed by the table that shows them awake.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{BASE_DOMAIN, TestRouter, Upstream, answer, assert_held, eventually, table};

#[tokio::test]
async fn requests_for_a_sleeping_sandbox_are_held_ask_one_wake_and_reach_the_instance_once_it_wakes()
 {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 60_000)).await;
    let http = &router.http;

    // The sandbox named each way a request can name it, with bodies.
    let mut held = vec![
        router.send(
            http.post(router.url("/orders/1"))
                .header("host", format!("pay-42.{BASE_DOMAIN}"))
                .body("by host"),
        ),
        router.send(
            http.post(router.url("/orders/2"))
                .header("x-sdp-sandbox", "pay-42")
                .body("by header"),
        ),
        router.send(
            http.post(router.url("/orders/3"))
                .header("baggage", "k=v, sdp-sandbox=pay-42")
                .body("by baggage"),
        ),
    ];
    for request in &mut held {
        assert_held(request).await;
    }
    assert_eq!(router.wakes.all(), ["pay-42"], "one wake for all of them");
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());

    router
        .router
        .install(&table(upstream.addr, &[("pay-42", false)], 60_000))
        .unwrap();

    let mut bodies = Vec::new();
    for request in held {
        let answer = answer(request).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("x-sdp-route"), "sandbox");
        bodies.push(answer.body);
    }
    assert_eq!(
        bodies,
        [
            "/orders/1 sandbox=pay-42 body=by host",
            "/orders/2 sandbox=pay-42 body=by header",
            "/orders/3 sandbox=pay-42 body=by baggage",
        ]
    );
    assert_eq!(router.wakes.all(), ["pay-42"]);
    // Each is recorded once, with its answer.
    let decisions = router.router.requests("pay-42");
    assert_eq!(decisions.len(), 3, "{decisions:?}");
    assert!(decisions.iter().all(|d| d.status == 200));
}

#[tokio::test]
async fn a_request_held_past_the_wake_timeout_gets_503_sandbox_waking_with_retry_after() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 300)).await;

    let answer = answer(router.get("pay-42", "/orders/1")).await;

    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.error_code(), "sandbox_waking");
    assert_eq!(answer.header("retry-after"), "10");
    assert_eq!(answer.header("x-sdp-route"), "sandbox");
    assert_eq!(router.wakes.all(), ["pay-42"]);
    assert!(upstream.seen().is_empty());
    let decisions = router.router.requests("pay-42");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0].status, 503);
    assert_eq!(
        decisions[0].service.as_ref().map(|s| s.as_str()),
        Some("orders")
    );
}

#[tokio::test]
async fn a_held_request_whose_sandbox_is_removed_gets_404_unknown_sandbox() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 60_000)).await;
    let mut held = router.get("pay-42", "/orders/1");
    assert_held(&mut held).await;

    router
        .router
        .install(&table(upstream.addr, &[("other", false)], 60_000))
        .unwrap();

    let answer = answer(held).await;
    assert_eq!(answer.status, 404, "{answer:?}");
    assert_eq!(answer.error_code(), "unknown_sandbox");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_table_that_still_shows_the_sandbox_asleep_keeps_its_requests_held() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 60_000)).await;
    let mut held = router.get("pay-42", "/orders/1");
    assert_held(&mut held).await;

    let mut newer = table(upstream.addr, &[("pay-42", true), ("other", false)], 60_000);
    newer.generation = 2;
    router.router.install(&newer).unwrap();
    assert_held(&mut held).await;
    assert_eq!(
        router.wakes.all(),
        ["pay-42"],
        "asked again within the window"
    );

    router
        .router
        .install(&table(upstream.addr, &[("pay-42", false)], 60_000))
        .unwrap();
    assert_eq!(answer(held).await.status, 200);
}

#[tokio::test]
async fn other_sandboxes_and_the_baseline_are_answered_while_one_sandbox_sleeps() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(
        upstream.addr,
        &[("pay-42", true), ("awake", false)],
        60_000,
    ))
    .await;
    let mut held = router.get("pay-42", "/orders/1");
    assert_held(&mut held).await;

    let awake = answer(router.get("awake", "/orders/2")).await;
    assert_eq!(
        (awake.status, awake.body.as_str()),
        (200, "/orders/2 sandbox=awake body=")
    );
    let baseline = answer(router.send(router.http.get(router.url("/orders/3")))).await;
    assert_eq!(
        (baseline.status, baseline.body.as_str()),
        (200, "/baseline/orders/3 sandbox=- body=")
    );
    assert_eq!(baseline.header("x-sdp-route"), "baseline");

    assert_held(&mut held).await;
    assert_eq!(router.wakes.all(), ["pay-42"]);
}

#[tokio::test]
async fn the_activity_names_sandboxes_whose_requests_were_routed_or_held_and_is_emptied_when_taken()
{
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(
        upstream.addr,
        &[("used", false), ("asleep", true), ("idle", false)],
        60_000,
    ))
    .await;
    assert!(router.router.take_activity().is_empty());

    assert_eq!(answer(router.get("used", "/orders/1")).await.status, 200);
    assert_eq!(answer(router.get("used", "/orders/2")).await.status, 200);
    let mut held = router.get("asleep", "/orders/1");
    assert_held(&mut held).await;
    // Not a request for any sandbox's instance: no activity.
    assert_eq!(
        answer(router.send(router.http.get(router.url("/orders/1"))))
            .await
            .status,
        200
    );

    assert_eq!(router.router.take_activity(), ["asleep", "used"]);
    assert!(router.router.take_activity().is_empty());

    // The flags outlive a new table that keeps the sandbox.
    assert_eq!(answer(router.get("used", "/orders/3")).await.status, 200);
    router
        .router
        .install(&table(upstream.addr, &[("used", false)], 60_000))
        .unwrap();
    assert_eq!(router.router.take_activity(), ["used"]);
    assert_eq!(answer(held).await.status, 404);
}

#[tokio::test]
async fn a_client_that_leaves_while_held_is_never_forwarded() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 60_000)).await;
    let mut client = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    client
        .write_all(b"GET /orders/left HTTP/1.1\r\nHost: x\r\nX-SDP-Sandbox: pay-42\r\n\r\n")
        .await
        .unwrap();
    eventually("the wake asked", || !router.wakes.all().is_empty()).await;
    drop(client);
    // Generous: the router notices a closed connection at once.
    tokio::time::sleep(Duration::from_millis(300)).await;

    router
        .router
        .install(&table(upstream.addr, &[("pay-42", false)], 60_000))
        .unwrap();
    let after = answer(router.get("pay-42", "/orders/after")).await;
    assert_eq!(after.status, 200);
    // Had the held request outlived its client, it would be forwarded by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.seen(), ["/orders/after sandbox=pay-42 body="]);
}

#[tokio::test]
async fn an_upgrade_held_for_a_sleeping_sandbox_passes_once_it_wakes() {
    let upstream = Upstream::start().await;
    let router = TestRouter::start(&table(upstream.addr, &[("pay-42", true)], 60_000)).await;
    let mut client = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    client
        .write_all(
            format!(
                "GET /orders/ws HTTP/1.1\r\nHost: pay-42.{BASE_DOMAIN}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    eventually("the wake asked", || !router.wakes.all().is_empty()).await;

    router
        .router
        .install(&table(upstream.addr, &[("pay-42", false)], 60_000))
        .unwrap();

    let head = tokio::time::timeout(Duration::from_secs(20), read_head(&mut client))
        .await
        .expect("no answer within 20 s");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: echo"),
        "{head}"
    );
    client.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut echoed))
        .await
        .expect("no echo within 20 s")
        .unwrap();
    assert_eq!(&echoed, b"ping");
}

/// A response head, read byte by byte so that nothing after it is taken.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}
