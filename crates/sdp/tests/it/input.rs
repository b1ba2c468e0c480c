use serde_json::json;

use sdp_testkit::{InProcessEnv, Reply};

#[tokio::test(flavor = "multi_thread")]
async fn malformed_login_bodies_get_4xx_in_the_error_shape_and_change_nothing() {
    let env = InProcessEnv::builder().start().await;
    let url = format!("{}/api/login", env.url);
    let raw = |body: Vec<u8>, content_type: &'static str| {
        env.http
            .post(&url)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // Just over the 1 MiB limit: the server answers 413 without reading the body and
    // closes, and a body much larger than the socket's buffers would still be being written
    // then (the client would see a broken pipe instead of the answer).
    let huge = format!(
        "{{\"username\":\"alice\",\"password\":\"{}\"}}",
        "x".repeat((1 << 20) + 1024)
    );
    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        (
            "not JSON",
            b"username=alice".to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "truncated",
            b"{\"username\":".to_vec(),
            "application/json",
            400,
            "invalid_json",
        ),
        (
            "missing password",
            br#"{"username":"alice"}"#.to_vec(),
            "application/json",
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            br#"{"username":1,"password":2}"#.to_vec(),
            "application/json",
            400,
            "invalid_request",
        ),
        (
            "no content type",
            br#"{"username":"a","password":"b"}"#.to_vec(),
            "text/plain",
            415,
            "unsupported_media_type",
        ),
        (
            "over the limit",
            huge.into_bytes(),
            "application/json",
            413,
            "payload_too_large",
        ),
        (
            "colon in username",
            br#"{"username":"a:b","password":"x"}"#.to_vec(),
            "application/json",
            400,
            "invalid_username",
        ),
        (
            "empty password",
            br#"{"username":"alice","password":""}"#.to_vec(),
            "application/json",
            400,
            "invalid_password",
        ),
        (
            "newline in password",
            br#"{"username":"alice","password":"a\nb"}"#.to_vec(),
            "application/json",
            400,
            "invalid_password",
        ),
    ];
    for (case, body, ct, status, code) in cases {
        let reply = Reply::from(raw(body, ct).await.unwrap()).await;
        assert_eq!(reply.status, status, "{case}: {}", reply.body);
        assert_eq!(reply.error_code(), code, "{case}");
    }
    for table in ["sessions", "users", "audit"] {
        assert_eq!(env.count_rows(table), 0, "{table} changed");
    }
    let reply = env
        .post_json("/api/login", None, json!({"username": "alice"}))
        .await;
    assert_eq!(reply.status, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_paths_and_methods_answer_in_the_error_shape() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let reply = env.get("/api/nothing-here", Some(&token)).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.error_code(), "not_found");
    let reply = env.get("/api/login", None).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.error_code(), "method_not_allowed");
}
