//! The router's metrics: each answer counted by where it went and its status class, and the
//! upstream latency only for requests whose upstream sent a response head.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{TestRouter, Upstream, answer, table};

/// The value of the sample written exactly as `series` (name and labels) in `text`.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn answers_are_counted_by_target_and_status_class_and_latency_only_when_a_head_came() {
    let upstream = Upstream::start().await;
    let mut routes = table(upstream.addr, &[("pay-42", false), ("dead", false)], 60_000);
    // Nothing listens on the discard port: the instance refuses, the router answers 502.
    for upstream in routes.sandboxes[1].upstreams.values_mut() {
        *upstream = "127.0.0.1:9".into();
    }
    let router = TestRouter::start(&routes).await;

    assert_eq!(answer(router.get("pay-42", "/orders/1")).await.status, 200);
    let baseline = router.send(router.http.get(router.url("/orders/1")));
    assert_eq!(answer(baseline).await.status, 200);
    assert_eq!(answer(router.get("dead", "/orders/1")).await.status, 502);
    assert_eq!(answer(router.get("nobody", "/orders/1")).await.status, 404);
    assert_eq!(answer(router.get("pay-42", "/elsewhere")).await.status, 404);
    let mut client = tokio::net::TcpStream::connect(router.addr).await.unwrap();
    client
        .write_all(b"GET /orders/ws HTTP/1.1\r\nHost: x\r\nX-SDP-Sandbox: pay-42\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut head))
        .await
        .expect("no answer within 20 s")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");

    let text = router.router.metrics();
    for (series, count) in [
        (
            r#"sdp_router_requests_total{target="sandbox",status="2xx"}"#,
            1.0,
        ),
        (
            r#"sdp_router_requests_total{target="sandbox",status="1xx"}"#,
            1.0,
        ),
        (
            r#"sdp_router_requests_total{target="sandbox",status="5xx"}"#,
            1.0,
        ),
        (
            r#"sdp_router_requests_total{target="baseline",status="2xx"}"#,
            1.0,
        ),
        (
            r#"sdp_router_requests_total{target="router",status="4xx"}"#,
            2.0,
        ),
        (
            r#"sdp_router_upstream_latency_seconds_count{target="sandbox"}"#,
            2.0,
        ),
        (
            r#"sdp_router_upstream_latency_seconds_count{target="baseline"}"#,
            1.0,
        ),
    ] {
        assert_eq!(value(&text, series), count, "{series} in\n{text}");
    }
}
