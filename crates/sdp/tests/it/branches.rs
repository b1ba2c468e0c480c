use crate::harness::{Options, TestEnv};

#[tokio::test(flavor = "multi_thread")]
async fn the_branch_list_equals_what_git_ls_remote_heads_says_with_commits() {
    let env = TestEnv::start(Options::default()).await;
    let token = env.login().await;
    let reply = env.get("/api/services/orders/branches", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut listed: Vec<(String, String)> = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["commit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    let expected = env.git.heads("orders");
    assert_eq!(expected.len(), 3);
    assert_eq!(listed, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_service_gets_404() {
    let env = TestEnv::start(Options::default()).await;
    let token = env.login().await;
    for name in ["nope", "--upload-pack=x", "ORDERS"] {
        let reply = env
            .get(&format!("/api/services/{name}/branches"), Some(&token))
            .await;
        assert_eq!(reply.status, 404, "{name}: {}", reply.body);
        assert_eq!(reply.error_code(), "unknown_service");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_list_is_the_catalog() {
    let env = TestEnv::start(Options::default()).await;
    let token = env.login().await;
    let reply = env.get("/api/services", Some(&token)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let services = reply.json();
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders", "payments"]);
    assert_eq!(services[0]["repo"], env.git.url("orders"));
    assert_eq!(services[0]["routes"], serde_json::json!(["/orders"]));
    assert_eq!(services[0]["baseline"], "http://127.0.0.1:9/orders");
}
