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
        let v = self.try_call(path, body).await;
        assert!(v["value"]["error"].is_null(), "WebDriver {path}: {v}");
        v["value"].clone()
    }

    /// The WebDriver answer, error or not.
    async fn try_call(&self, path: &str, body: Value) -> Value {
        self.http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
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

    /// Clicks the element `css` names. Pages redraw what changed while a test looks at
    /// them: an element replaced between finding and clicking it is found again.
    pub(crate) async fn click(&self, css: &str) {
        for _ in 0..3 {
            let id = self.find(css).await;
            let v = self
                .try_call(&format!("/element/{id}/click"), json!({}))
                .await;
            if v["value"]["error"] != "stale element reference" {
                assert!(v["value"]["error"].is_null(), "WebDriver click {css}: {v}");
                return;
            }
        }
        panic!("{css} was replaced each time it was clicked");
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
    /// Sends `text` as keystrokes to the element, after what it holds (WebDriver's key codes
    /// work: `\u{e007}` is Enter).
    pub(crate) async fn keys(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.call(&format!("/element/{id}/value"), json!({"text": text}))
            .await;
    }

    /// Makes the page see a system that prefers dark colours (through Chromium's DevTools
    /// protocol, which chromedriver passes on).
    pub(crate) async fn prefer_dark(&self) {
        self.call(
            "/goog/cdp/execute",
            json!({"cmd": "Emulation.setEmulatedMedia", "params": {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}}),
        )
        .await;
    }

    /// The page's URL, without its origin.
    pub(crate) async fn path(&self) -> String {
        self.eval("return location.pathname + location.search")
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Saves what the browser shows as `target/screenshots/<name>.png`, a test artefact.
    pub(crate) async fn screenshot(&self, name: &str) {
        let v: Value = self
            .http
            .get(format!("{}/screenshot", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().expect("a screenshot"))
            .unwrap();
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Every line of the log view `css`, in order, read by scrolling it from top to bottom:
    /// the view keeps only the rows in sight in the document.
    pub(crate) async fn log_lines(&self, css: &str) -> Vec<String> {
        let view = format!("document.querySelector({})", json!(css));
        let total = self
            .eval(&format!("return +{view}.dataset.lines"))
            .await
            .as_u64()
            .unwrap_or(0) as usize;
        let mut lines = std::collections::BTreeMap::new();
        let mut top = 0u64;
        loop {
            self.eval(&format!("{view}.scrollTop = {top}; return true"))
                .await;
            // The view draws the rows in sight at the next frame.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let rows = self
                .eval(&format!(
                    "var v = {view}; return {{rows: Array.from(v.querySelectorAll('.log-row')).map(r => [+r.dataset.index, r.textContent]), height: v.clientHeight, end: v.scrollTop + v.clientHeight >= v.scrollHeight - 1}}"
                ))
                .await;
            for row in rows["rows"].as_array().unwrap() {
                lines.insert(
                    row[0].as_u64().unwrap(),
                    row[1].as_str().unwrap().to_owned(),
                );
            }
            if lines.len() >= total || rows["end"] == json!(true) {
                break;
            }
            top += rows["height"].as_u64().unwrap().max(100);
        }
        lines.into_values().collect()
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

/// Waits for the sign-in form, which a signed-out browser is sent to from any page.
pub(crate) async fn wait_login_form(browser: &Browser) {
    browser
        .wait_for(
            "the login form",
            "var f = document.getElementById('login-form'); return f && f.offsetParent !== null",
        )
        .await;
}

/// Signs in through the form as [`USER`], and waits until the page says who is signed in.
pub(crate) async fn sign_in(browser: &Browser) {
    wait_login_form(browser).await;
    browser.type_into("#username", USER).await;
    browser.type_into("#password", PASSWORD).await;
    browser.click("#login-submit").await;
    let who = browser
        .wait_for(
            "the signed-in user",
            "var w = document.getElementById('whoami'); return w.offsetParent !== null && w.textContent",
        )
        .await;
    assert!(who.as_str().unwrap().contains(USER), "{who}");
}

/// Waits until the page's path starts with `prefix`, and returns it.
pub(crate) async fn wait_path(browser: &Browser, prefix: &str) -> String {
    browser
        .wait_for(
            &format!("a page under {prefix}"),
            &format!(
                "return location.pathname.indexOf({}) === 0 && location.pathname",
                json!(prefix)
            ),
        )
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

/// Searches the branches of `service` (ticked in the new sandbox form) for `search` with the
/// keyboard and takes the best match, `expect`, with Enter.
pub(crate) async fn pick_branch(browser: &Browser, service: &str, search: &str, expect: &str) {
    let input = format!("[data-picker={}] input", json!(service));
    browser
        .wait_for(
            "the branches in the picker",
            &format!(
                "var i = document.querySelector({}); return i && !i.disabled",
                json!(input)
            ),
        )
        .await;
    browser.click(&input).await;
    // Select what the input holds (the default branch), then type over it.
    browser
        .keys(&input, &format!("\u{e009}a\u{e000}{search}"))
        .await;
    browser
        .wait_for(
            "the search's best match highlighted",
            &format!(
                "var o = document.querySelector({} + ' li[aria-selected=true]'); return o && o.getAttribute('data-branch') === {}",
                json!(format!("[data-picker={}]", json!(service))),
                json!(expect)
            ),
        )
        .await;
    browser.keys(&input, "\u{e007}").await;
    let value = browser
        .eval(&format!(
            "return document.querySelector({}).value",
            json!(input)
        ))
        .await;
    assert_eq!(value, json!(expect));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_creates_a_sandbox_from_the_form_follows_its_deployment_reaches_it_extends_and_deletes_it_in_a_real_browser()
 {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    browser.open(&env.url).await;
    wait_login_form(&browser).await;
    assert!(browser.path().await.starts_with("/login"));
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
    browser.screenshot("login").await;

    browser.type_into("#password", PASSWORD).await;
    browser.click("#login-submit").await;
    let who = browser
        .wait_for("the signed-in user", "var w = document.getElementById('whoami'); return w.offsetParent !== null && w.textContent")
        .await;
    assert!(who.as_str().unwrap().contains(USER), "{who}");
    assert_eq!(wait_path(&browser, "/sandboxes").await, "/sandboxes");
    browser
        .wait_for(
            "the empty list",
            "return document.querySelector('#sandboxes .empty')",
        )
        .await;

    // The new sandbox form: every branch with its commit, searched from the keyboard.
    browser.click("#nav a[href=\"/new\"]").await;
    wait_path(&browser, "/new").await;
    browser
        .wait_for(
            "the orders service",
            "return document.querySelector('[data-deploy-service=\"orders\"]')",
        )
        .await;
    browser.click("[data-deploy-service=\"orders\"]").await;
    browser
        .wait_for(
            "the branches of orders",
            "var i = document.querySelector('[data-picker=\"orders\"] input'); return i && !i.disabled",
        )
        .await;
    browser.click("[data-picker=\"orders\"] input").await;
    let shown = browser
        .wait_for(
            "the list of branches",
            "var rows = document.querySelectorAll('[data-picker=\"orders\"] li[data-branch]'); return rows.length && Array.from(rows).map(r => r.getAttribute('data-branch') + ' ' + r.textContent).join('\\n')",
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
    // Unticked and ticked again, it keeps its branches.
    browser.click("[data-deploy-service=\"orders\"]").await;
    browser.click("[data-deploy-service=\"orders\"]").await;
    pick_branch(&browser, "orders", "featu", "feature/x").await;
    browser.type_into("#sandbox-name", "web").await;
    browser.screenshot("new-sandbox").await;
    browser.click("#deploy-submit").await;

    // The deployment's page, followed live to its end.
    let dep_path = wait_path(&browser, "/deployments/dep_").await;
    let end = browser
        .wait_for(
            "the end of the deployment log",
            "return document.getElementById('log-status').getAttribute('data-end-state')",
        )
        .await;
    assert_eq!(end, json!("ready"));
    let log = browser.log_lines("#log-lines").await.join("\n");
    assert!(log.contains("building orders"), "{log}");
    assert!(log.contains("orders listening on"), "{log}");
    let steps = browser
        .wait_for(
            "the steps of orders with their durations",
            "var s = document.querySelectorAll('[data-timeline-service=\"orders\"] [data-step]'); return s.length >= 4 && Array.from(s).every(x => x.querySelector('[data-duration-ms]').getAttribute('data-duration-ms') !== '') && Array.from(s).map(x => x.getAttribute('data-step') + ':' + x.getAttribute('data-step-state')).join(',')",
        )
        .await;
    assert_eq!(
        steps,
        json!("fetching:done,building:done,starting:done,healthy:done")
    );
    browser.screenshot("deployment").await;

    // The sandbox's page, from the deployment's.
    browser.click("#dep-sandbox").await;
    assert_eq!(wait_path(&browser, "/sandboxes/").await, "/sandboxes/web");
    browser
        .wait_for(
            "the sandbox ready",
            "return document.querySelector('#sv-state [data-view-state=\"ready\"]')",
        )
        .await;
    browser
        .wait_for(
            "orders running",
            "return document.querySelector('#sv-services [data-view-service=\"orders\"][data-service-state=\"running\"]')",
        )
        .await;
    // The test's sandboxes live an hour: the page warns that this one expires soon.
    let soon = browser
        .wait_for(
            "the expiry warning",
            "var b = document.querySelector('#sv-summary [data-expires-soon]'); return b && b.textContent",
        )
        .await;
    assert_eq!(soon, json!("expires soon"));
    let history = browser
        .wait_for(
            "the deployment in the sandbox's history",
            "var r = document.querySelector('#sv-deployments [data-deployment]'); return r && r.getAttribute('data-deployment')",
        )
        .await;
    assert_eq!(
        format!("/deployments/{}", history.as_str().unwrap()),
        dep_path
    );
    browser.screenshot("sandbox").await;
    let sandbox = env.get("/api/sandboxes/web", None).await;
    assert_eq!(sandbox.status, 401, "the page's session is its own");

    // Its URL, as the page gives it, through the router: the sandbox answers.
    let url = browser
        .eval("return document.getElementById('sv-url').href")
        .await;
    let url = reqwest::Url::parse(url.as_str().unwrap()).unwrap();
    assert_eq!(url.host_str(), Some("web.sdp.test"), "{url}");
    let router: std::net::SocketAddr = env
        .router_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let client = reqwest::Client::builder()
        .resolve("web.sdp.test", router)
        .build()
        .unwrap();
    let routed = client
        .get(url.join("/orders/from-the-browser-test?secret=1").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(routed.status(), 200);
    assert_eq!(routed.headers()["x-sdp-route"], "sandbox");
    let token = env.login().await;
    let upstream =
        env.get("/api/sandboxes/web", Some(&token)).await.json()["services"][0]["upstream"]
            .as_str()
            .unwrap()
            .to_owned();
    let direct = env
        .http
        .get(format!(
            "http://{upstream}/orders/from-the-browser-test?secret=1"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(routed.text().await.unwrap(), direct);
    let header_form = browser
        .eval("return document.getElementById('curl-header').textContent")
        .await;
    assert_eq!(
        header_form,
        json!(format!(
            "curl -H 'X-SDP-Sandbox: web' {}/orders",
            env.router_url()
        ))
    );

    // The request shows in the route inspector.
    browser.click("#requests-refresh").await;
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

    // Extend it by a day.
    let before = env.get("/api/sandboxes/web", Some(&token)).await.json()["expires_at"].clone();
    browser.click("#sv-actions [data-action=\"extend\"]").await;
    browser
        .wait_for(
            "the extension",
            "var s = document.getElementById('sv-status'); return !s.hidden && s.textContent.indexOf('Extended') === 0",
        )
        .await;
    let after = env.get("/api/sandboxes/web", Some(&token)).await.json()["expires_at"].clone();
    let parse = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(
        parse(&after) - parse(&before) > time::Duration::hours(20),
        "{before} -> {after}"
    );
    browser
        .wait_for(
            "no expiry warning",
            "return document.querySelector('#sv-state [data-view-state]') && !document.querySelector('#sv-summary [data-expires-soon]')",
        )
        .await;

    // Delete it, once the dialog is confirmed.
    browser.click("#sv-actions [data-action=\"delete\"]").await;
    browser
        .wait_for(
            "the confirmation",
            "return document.getElementById('confirm-dialog').open",
        )
        .await;
    browser.screenshot("delete-confirmation").await;
    browser.click("#confirm-delete").await;
    browser
        .wait_for(
            "the sandbox deleted",
            "return document.querySelector('#sv-state [data-view-state=\"deleted\"]')",
        )
        .await;
    assert_eq!(
        env.get("/api/sandboxes/web", Some(&token)).await.json()["state"],
        "deleted"
    );

    // The list shows live sandboxes by default; every state on demand.
    browser.click("#nav a[href=\"/sandboxes\"]").await;
    browser
        .wait_for(
            "the empty list",
            "return document.querySelector('#sandboxes .empty')",
        )
        .await;
    browser
        .eval("var s = document.getElementById('filter-state'); s.value = 'any'; s.dispatchEvent(new Event('change', {bubbles: true})); return true")
        .await;
    browser
        .wait_for(
            "the deleted sandbox listed",
            "return document.querySelector('[data-sandbox=\"web\"] [data-sandbox-state=\"deleted\"]')",
        )
        .await;
    assert!(browser.path().await.contains("state=any"));
    browser.screenshot("sandboxes").await;

    browser.click("#nav a[href=\"/agents\"]").await;
    let agents = browser
        .wait_for(
            "the agents",
            "var r = document.querySelectorAll('#agents [data-agent] [data-connected=\"true\"]'); return r.length",
        )
        .await;
    assert_eq!(agents, json!(2), "a micro agent and a gateway agent");
    browser.screenshot("agents").await;

    browser.click("#logout").await;
    wait_login_form(&browser).await;
    assert_eq!(browser.path().await, "/login");
    // The session ended on the server too: a page opened now asks for a sign-in.
    browser.open(&format!("{}/sandboxes", env.url)).await;
    wait_login_form(&browser).await;
    assert_eq!(browser.path().await, "/login?next=%2Fsandboxes");
    browser.quit().await;
}
