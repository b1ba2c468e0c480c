use std::process::Command;

use serde_json::json;

use crate::harness::{Proc, git_server::heads_of, sdp_bin};

#[tokio::test(flavor = "multi_thread")]
async fn sdp_dev_serves_login_and_branches_at_the_url_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut cmd = Command::new(sdp_bin());
    cmd.args(["dev", "--port", "0", "--data"]).arg(&data);
    let mut dev = Proc::spawn("sdp dev", cmd);
    let line = dev.wait_for_line("its URL", |l| l.contains("Dashboard and API:"));
    let url = line.split_whitespace().last().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    dev.wait_for_line("the micro agent", |l| {
        l.contains("connected to the control plane") && l.contains("dev-micro")
    });

    let http = reqwest::Client::new();
    let page = http.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(page.to_lowercase().contains("<html"), "{page}");

    let login: serde_json::Value = http
        .post(format!("{url}/api/login"))
        .json(&json!({"username": "newcomer", "password": "anything at all"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{login}\n{}", dev.log_text()));

    let services: serde_json::Value = http
        .get(format!("{url}/api/services"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(services[0]["name"], "hello", "{services}");

    let branches: serde_json::Value = http
        .get(format!("{url}/api/services/hello/branches"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut listed: Vec<(String, String)> = branches
        .as_array()
        .unwrap_or_else(|| panic!("{branches}"))
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["commit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed, heads_of(&data.join("repos/hello.git")));
    assert!(listed.iter().any(|(name, _)| name == "feature/x"));
    dev.stop();
}
