use std::process::Command;

use sdp_testkit::git_server::heads_of;
use sdp_testkit::{Api, Proc};

use crate::SDP;

#[tokio::test(flavor = "multi_thread")]
async fn sdp_dev_serves_login_and_branches_at_the_url_it_prints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut cmd = Command::new(SDP);
    cmd.args(["dev", "--port", "0", "--data"]).arg(&data);
    let mut dev = Proc::spawn("sdp dev", cmd);
    let line = dev.wait_for_line("its URL", |l| l.contains("Dashboard and API:"));
    let url = line.split_whitespace().last().unwrap().to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    dev.wait_for_line("the micro agent", |l| {
        l.contains("connected to the control plane") && l.contains("dev-micro")
    });

    let api = Api::new(&url);
    let page = api.get("/", None).await;
    assert!(page.body.to_lowercase().contains("<html"), "{}", page.body);

    let login = api.login_as("newcomer", "anything at all").await;
    assert_eq!(login.status, 200, "{}\n{}", login.body, dev.log_text());
    let token = login.json()["token"].as_str().unwrap().to_owned();

    let services = api.get("/api/services", Some(&token)).await.json();
    assert_eq!(services[0]["name"], "hello", "{services}");

    let listed = api.branches("hello", &token).await;
    assert_eq!(listed, heads_of(&data.join("repos/hello.git")));
    assert!(listed.iter().any(|(name, _)| name == "feature/x"));

    // A newcomer's first deploy: a branch of a demo service, running at once.
    let (sandbox, deployment) = api.deploy(&token, "first", &["hello@feature/x"]).await;
    assert_eq!(
        deployment["state"],
        "ready",
        "{deployment}\n{}",
        dev.log_text()
    );
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    // Its build printed a build's log for the dashboard to show: a few hundred lines, in
    // colour, with a progress bar redrawn by carriage returns (each redraw a line that
    // keeps its `\r`, the last one plain).
    let log = api.deployment_log(&token, &deployment).await;
    assert!(log.lines().count() > 200, "{log}");
    assert!(
        log.contains("\u{1b}[32m   compiling\u{1b}[0m hello/internal/"),
        "{log}"
    );
    assert!(log.contains("[hello/stderr] \u{1b}[33mwarning"), "{log}");
    // (`lines()` would take each `\r\n` for a line end.)
    let bar: Vec<&str> = log
        .split('\n')
        .filter(|l| l.contains("Restoring the build cache"))
        .collect();
    assert!(bar.len() > 10, "{log}");
    assert!(
        bar[..bar.len() - 1].iter().all(|l| l.ends_with('\r')),
        "{bar:?}"
    );
    assert!(bar[bar.len() - 1].ends_with("] 100%"), "{bar:?}");
    assert_eq!(
        api.answer(upstream).await,
        "Hello from feature/x: a new greeting.\n"
    );
    // Through the router it prints, at the sandbox's URL (`*.localhost` is this machine).
    let router = dev.wait_for_line("the router's URL", |l| l.contains("Sandbox router:"));
    let router = router.split_whitespace().nth(2).unwrap().to_owned();
    let sandbox_url = sandbox["url"].as_str().unwrap();
    let port = router.rsplit(':').next().unwrap();
    assert_eq!(
        sandbox_url,
        format!("http://first.sandbox.localhost:{port}")
    );
    let routed = api
        .http
        .get(format!("{router}/hello"))
        .header("X-SDP-Sandbox", "first")
        .send()
        .await
        .unwrap();
    assert_eq!(routed.headers()["x-sdp-route"], "sandbox");
    assert_eq!(
        routed.text().await.unwrap(),
        "Hello from feature/x: a new greeting.\n"
    );
    // Instances outlive `sdp dev` (its next start finds them again): delete the sandbox so
    // that the test leaves nothing running.
    let reply = api
        .http
        .delete(format!("{url}/api/sandboxes/first"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while api
        .http
        .get(format!("http://{upstream}/"))
        .send()
        .await
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo instance still answers"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    dev.stop();
}
