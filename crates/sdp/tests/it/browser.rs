//! The dashboard in a real browser: headless Chromium driven by chromedriver over the W3C
//! WebDriver protocol.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use sdp_testkit::{PASSWORD, Proc, TestEnv, USER};

use crate::SDP;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub(crate) struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: Proc,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; `None` when they are not installed and
    /// this is not CI (`scripts/test.sh` installs them; in CI their absence is a failure).
    pub(crate) async fn start() -> Option<Browser> {
        let installed = ["/usr/bin/chromedriver", "/usr/bin/chromium"]
            .iter()
            .all(|p| std::path::Path::new(p).exists());
        if !installed {
            assert!(
                std::env::var("CI").is_err(),
                "chromium and chromium-driver are missing in CI: scripts/test.sh installs them"
            );
            eprintln!(
                "skipping: chromium or chromedriver is not installed (scripts/test.sh installs them)"
            );
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new("/usr/bin/chromedriver");
        cmd.arg(format!("--port={port}"));
        let mut driver = Proc::spawn("chromedriver", cmd);
        driver.wait_for_line("chromedriver ready", |l| l.contains("started successfully"));
        let profile = tempfile::tempdir().unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}\n{}", driver.log_text()))
            .to_owned();
        Some(Browser {
            http,
            base: format!("{base}/session/{id}"),
            _driver: driver,
            profile,
        })
    }

    pub(crate) async fn call(&self, path: &str, body: Value) -> Value {
        let v: Value = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(v["value"]["error"].is_null(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    pub(crate) async fn open(&self, url: &str) {
        self.call("/url", json!({"url": url})).await;
    }

    pub(crate) async fn find(&self, css: &str) -> String {
        let v = self
            .call("/element", json!({"using": "css selector", "value": css}))
            .await;
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    pub(crate) async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(&format!("/element/{id}/clear"), json!({})).await;
        self.call(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    pub(crate) async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.call(&format!("/element/{id}/click"), json!({})).await;
    }

    /// Ends the browser session, so Chromium exits before chromedriver does.
    /// (A failed test skips this; `Drop` then ends Chromium by its profile folder.)
    pub(crate) async fn quit(self) {
        let _ = self.http.delete(&self.base).send().await;
    }

    pub(crate) async fn eval(&self, script: &str) -> Value {
        self.call("/execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Waits until `script` returns something truthy, and returns it. Generously: a page may
    /// wait on a real Go build, which takes half a minute on a busy two-core machine.
    pub(crate) async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.eval(script).await;
            let falsy = v.is_null() || v == json!(false) || v == json!("") || v == json!(0);
            if !falsy {
                return v;
            }
            let body = self.eval("return document.body.innerText").await;
            assert!(
                Instant::now() < deadline,
                "never saw {what}; page says:\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium leaves chromedriver's process group; its profile folder names it.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(self.profile.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_logs_in_sees_branches_deploys_watches_the_log_and_logs_out_in_a_real_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    browser.open(&env.url).await;
    browser
        .wait_for(
            "the login form",
            "var f = document.getElementById('login-form'); return f && f.offsetParent !== null",
        )
        .await;
    let dev_notice = browser
        .eval("var n = document.getElementById('dev-notice'); return n.hidden || n.offsetParent === null")
        .await;
    assert_eq!(
        dev_notice,
        json!(true),
        "the dev notice shows on a real server"
    );

    browser.type_into("#username", USER).await;
    browser.type_into("#password", "not my password").await;
    browser.click("#login-submit").await;
    let error = browser
        .wait_for(
            "the login error",
            "var e = document.getElementById('login-error'); return !e.hidden && e.textContent",
        )
        .await;
    assert!(
        error.as_str().unwrap().contains("did not accept"),
        "{error}"
    );

    browser.type_into("#password", PASSWORD).await;
    browser.click("#login-submit").await;
    let who = browser
        .wait_for("the signed-in user", "var w = document.getElementById('whoami'); return w.offsetParent !== null && w.textContent")
        .await;
    assert!(who.as_str().unwrap().contains(USER), "{who}");

    browser
        .wait_for(
            "the orders service",
            "return document.querySelector('[data-service=\"orders\"]')",
        )
        .await;
    browser.click("[data-service=\"orders\"]").await;
    let shown = browser
        .wait_for(
            "the branches of orders",
            "var rows = document.querySelectorAll('[data-branch]'); return rows.length && Array.from(rows).map(r => r.getAttribute('data-branch') + ' ' + r.innerText).join('\\n')",
        )
        .await;
    let shown = shown.as_str().unwrap();
    for (branch, commit) in env.git.heads("orders") {
        assert!(shown.contains(&branch), "{branch} missing from:\n{shown}");
        assert!(
            shown.contains(&commit[..12]),
            "{commit} missing from:\n{shown}"
        );
    }

    // Deploy a branch from the page and watch its log to the end.
    browser.type_into("#sandbox-name", "web").await;
    browser.click("[data-deploy-service=\"orders\"]").await;
    browser
        .wait_for(
            "the branches of orders in the deploy form",
            "var s = document.querySelector('[data-deploy-branch=\"orders\"]'); return s && s.options.length > 1 && !s.disabled",
        )
        .await;
    browser
        .eval("var s = document.querySelector('[data-deploy-branch=\"orders\"]'); s.value = 'feature/x'; s.dispatchEvent(new Event('change')); return true")
        .await;
    browser.click("#deploy-submit").await;
    let end = browser
        .wait_for(
            "the end of the deployment log",
            "return document.getElementById('log-status').getAttribute('data-end-state')",
        )
        .await;
    assert_eq!(end, json!("ready"));
    let log = browser
        .eval("return document.getElementById('log-lines').textContent")
        .await;
    let log = log.as_str().unwrap();
    assert!(log.contains("building orders"), "{log}");
    assert!(log.contains("orders listening on"), "{log}");
    let state = browser
        .wait_for(
            "the sandbox listed as ready",
            "var c = document.querySelector('[data-sandbox=\"web\"] [data-sandbox-state]'); return c && c.textContent.trim() === 'ready' && c.textContent.trim()",
        )
        .await;
    assert_eq!(state, json!("ready"));
    // The test's sandboxes live an hour: the list warns that this one expires soon.
    let soon = browser
        .wait_for(
            "the expiry warning",
            "var b = document.querySelector('[data-sandbox=\"web\"] [data-expires-soon]'); return b && b.textContent",
        )
        .await;
    assert_eq!(soon, json!("expires soon"));
    let sandbox = env.get("/api/sandboxes/web", None).await;
    assert_eq!(sandbox.status, 401, "the page's session is its own");

    // A request through the router shows in the sandbox's route inspector.
    let routed = env
        .http
        .get(format!(
            "{}/orders/from-the-browser-test?secret=1",
            env.router_url()
        ))
        .header("X-SDP-Sandbox", "web")
        .send()
        .await
        .unwrap();
    assert_eq!(routed.headers()["x-sdp-route"], "sandbox");
    browser
        .click("[data-sandbox=\"web\"] [data-action=\"requests\"]")
        .await;
    let row = browser
        .wait_for(
            "the request in the inspector",
            "var r = document.querySelector('#requests [data-route=\"sandbox\"]'); return r && r.innerText",
        )
        .await;
    let row = row.as_str().unwrap();
    assert!(row.contains("/orders/from-the-browser-test"), "{row}");
    assert!(!row.contains("secret"), "{row}");
    assert!(row.contains("200"), "{row}");

    browser.click("#logout").await;
    browser
        .wait_for(
            "the login form again",
            "var f = document.getElementById('login-form'); return f && f.offsetParent !== null",
        )
        .await;
    let after = env.get("/api/services", None).await;
    assert_eq!(after.status, 401);
    browser.quit().await;
}
