//! The dashboard's pages in a real browser, against the in-process control plane and
//! scripted agents whose builds print what a test needs: links that open a page directly
//! (and after a sign-in), markup in data shown as text, ANSI colours and progress bars drawn
//! as a terminal shows them, a dropped WebSocket resumed without gap or repeat, and a log of
//! 100,000 lines.

use serde_json::{Value, json};

use sdp_testkit::fake_agent::FAKE_COMMIT;
use sdp_testkit::{CutProxy, InProcessEnv};

use crate::browser::{Browser, pick_branch, sign_in, wait_login_form, wait_path};

/// Starts sandbox `name` (`orders@main`) and returns its deployment's id, not waiting for it.
async fn start_deploying(env: &InProcessEnv, token: &str, name: &str) -> String {
    let reply = env.create_sandbox(token, name, &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn wait_end(browser: &Browser) -> Value {
    browser
        .wait_for(
            "the end of the deployment log",
            "return document.getElementById('log-status').getAttribute('data-end-state')",
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_to_a_deployment_opens_it_directly_and_after_the_sign_in_it_asks_for() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let (_, deployment) = env.deploy(&token, "linked", &["orders@main"]).await;
    let id = deployment["id"].as_str().unwrap();
    let link = format!("{}/deployments/{id}", env.url);

    // Signed out: the sign-in page, which then leads to the page the link named.
    browser.open(&link).await;
    wait_login_form(&browser).await;
    assert_eq!(
        browser.path().await,
        format!("/login?next=%2Fdeployments%2F{id}")
    );
    sign_in(&browser).await;
    assert_eq!(
        wait_path(&browser, "/deployments/").await,
        format!("/deployments/{id}")
    );
    assert_eq!(wait_end(&browser).await, json!("ready"));

    // Signed in: the link opens the page itself, as a new tab would.
    browser.open(&link).await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    assert_eq!(browser.path().await, format!("/deployments/{id}"));
    let sandbox = browser
        .wait_for(
            "the link to its sandbox",
            "var a = document.getElementById('dep-sandbox'); return a && a.getAttribute('href')",
        )
        .await;
    assert_eq!(sandbox, json!("/sandboxes/linked"));

    // The sandbox's page, opened directly; its Redeploy opens the new deployment's page.
    browser.open(&format!("{}/sandboxes/linked", env.url)).await;
    browser
        .wait_for(
            "the sandbox's page",
            "return document.querySelector('#sv-state [data-view-state=\"ready\"]')",
        )
        .await;
    browser
        .click("#sv-actions [data-action=\"redeploy\"]")
        .await;
    browser
        .wait_for(
            "another deployment's page",
            &format!(
                "return location.pathname.indexOf('/deployments/dep_') === 0 && location.pathname !== {}",
                json!(format!("/deployments/{id}"))
            ),
        )
        .await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let deployments = env
        .get("/api/sandboxes/linked/deployments", Some(&token))
        .await
        .json();
    assert_eq!(
        deployments["items"].as_array().unwrap().len(),
        2,
        "{deployments}"
    );
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_name_holding_markup_is_shown_as_text_on_every_page() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    // A valid git branch name, and an image tag with a script to anyone who makes it markup.
    let hostile = "feature/<img/src=x/onerror=window.__pwned=1>";
    env.script
        .set_branches(&[("main", FAKE_COMMIT), (hostile, FAKE_COMMIT)]);
    browser.open(&env.url).await;
    sign_in(&browser).await;
    browser.click("#nav a[href=\"/new\"]").await;
    browser
        .wait_for(
            "the orders service",
            "return document.querySelector('[data-deploy-service=\"orders\"]')",
        )
        .await;
    browser.click("[data-deploy-service=\"orders\"]").await;
    pick_branch(&browser, "orders", "onerror", hostile).await;
    let option = browser
        .eval("return document.querySelector('[data-picker=\"orders\"] li[data-branch^=\"feature\"] .picker-name').textContent")
        .await;
    assert_eq!(option, json!(hostile));
    browser.type_into("#sandbox-name", "marked").await;
    browser.click("#deploy-submit").await;
    wait_path(&browser, "/deployments/").await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let timeline = browser
        .wait_for(
            "the branch in the steps",
            "var t = document.querySelector('[data-timeline-service=\"orders\"] .tl-head'); return t && t.textContent",
        )
        .await;
    assert!(timeline.as_str().unwrap().contains(hostile), "{timeline}");
    browser.click("#dep-sandbox").await;
    let row = browser
        .wait_for(
            "the branch in the services",
            "var r = document.querySelector('#sv-services [data-view-service=\"orders\"]'); return r && r.textContent",
        )
        .await;
    assert!(row.as_str().unwrap().contains(hostile), "{row}");
    browser.click("#nav a[href=\"/sandboxes\"]").await;
    let listed = browser
        .wait_for(
            "the branch in the list",
            "var r = document.querySelector('[data-sandbox=\"marked\"] .svc code'); return r && r.textContent",
        )
        .await;
    assert_eq!(listed, json!(format!("orders@{hostile}")));
    let safe = browser
        .eval(
            "return document.querySelectorAll('img').length === 0 && window.__pwned === undefined",
        )
        .await;
    assert_eq!(safe, json!(true), "a branch name became markup");
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ansi_colours_are_drawn_without_escape_codes_and_a_progress_bar_ends_as_one_line() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let mut output = vec![
        (
            "stdout",
            "\u{1b}[1;32m   Compiling\u{1b}[0m orders v1.4.2".to_owned(),
        ),
        (
            "stderr",
            "\u{1b}[33mwarning\u{1b}[39m: unused variable `x`".to_owned(),
        ),
        // The agent keeps the `\r` that ended each redraw of the bar.
        ("stdout", "\r".to_owned()),
    ];
    for pct in (0..100).step_by(10) {
        let bar = format!("{:<10}", "#".repeat(pct / 10));
        output.push(("stdout", format!("Downloading [{bar}] {pct:>3}%\r")));
    }
    output.push(("stdout", "Downloading [##########] 100%".to_owned()));
    // A title, an erase and a cursor move, which a browser cannot show: dropped.
    output.push((
        "stdout",
        "\u{1b}]0;building\u{7}\u{1b}[2K\u{1b}[1Gdone <b>not bold</b>".to_owned(),
    ));
    env.script.set_build_output(output, None);
    let token = env.login().await;
    let (_, deployment) = env.deploy(&token, "colour", &["orders@main"]).await;
    let id = deployment["id"].as_str().unwrap();

    browser.open(&format!("{}/deployments/{id}", env.url)).await;
    sign_in(&browser).await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let lines = browser.log_lines("#log-lines").await;
    let text = lines.join("\n");
    assert!(!text.contains('\u{1b}'), "{text}");
    assert!(!text.contains("[1;32m") && !text.contains("]0;"), "{text}");
    let bars: Vec<&String> = lines.iter().filter(|l| l.contains("Downloading")).collect();
    assert_eq!(bars.len(), 1, "{text}");
    assert!(bars[0].ends_with("Downloading [##########] 100%"), "{text}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("[orders/stdout] done <b>not bold</b>")),
        "{text}"
    );

    let compiling = browser
        .eval("var s = Array.from(document.querySelectorAll('#log-lines .log-row span')).find(s => s.textContent.indexOf('Compiling') >= 0); return s && {cls: s.className, colour: getComputedStyle(s).color, weight: getComputedStyle(s).fontWeight, plain: getComputedStyle(s.parentNode).color}")
        .await;
    assert_eq!(compiling["cls"], json!("ansi-bold ansi-fg2"), "{compiling}");
    assert_eq!(compiling["weight"], json!("700"), "{compiling}");
    assert_ne!(compiling["colour"], compiling["plain"], "{compiling}");
    let warning = browser
        .eval("var s = Array.from(document.querySelectorAll('#log-lines .log-row.stderr span')).find(s => s.textContent === 'warning'); return s && s.className")
        .await;
    assert_eq!(warning, json!("ansi-fg3"));
    let markup = browser
        .eval("return document.querySelector('#log-lines b') === null")
        .await;
    assert_eq!(markup, json!(true), "a log line became markup");

    // The stream filter hides stdout; the service filter keeps orders.
    browser.click("#main [data-stream-filter=\"stdout\"]").await;
    let streams = browser
        .wait_for(
            "only stderr, system, steps and the end",
            "var r = Array.from(document.querySelectorAll('#log-lines .log-row')); return r.length && r.every(x => x.getAttribute('data-stream') !== 'stdout') && r.map(x => x.getAttribute('data-stream')).join(',')",
        )
        .await;
    assert!(streams.as_str().unwrap().contains("stderr"), "{streams}");
    browser.screenshot("deployment-filtered").await;

    // The theme follows the system's: dark, the page and the log are dark, the text light.
    let lightness = "var l = c => { var [r, g, b] = getComputedStyle(c[0])[c[1]].match(/\\d+/g).map(Number); return (r + g + b) / 3; }; return {page: l([document.body, 'backgroundColor']), text: l([document.body, 'color']), log: l([document.getElementById('log-lines'), 'backgroundColor'])}";
    let light = browser.eval(lightness).await;
    assert!(light["page"].as_f64().unwrap() > 200.0, "{light}");
    browser.prefer_dark().await;
    let dark = browser.eval(lightness).await;
    assert!(dark["page"].as_f64().unwrap() < 50.0, "{dark}");
    assert!(dark["log"].as_f64().unwrap() < 50.0, "{dark}");
    assert!(dark["text"].as_f64().unwrap() > 200.0, "{dark}");
    browser.screenshot("deployment-dark").await;
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_websocket_dropped_mid_stream_resumes_without_a_gap_or_a_repeat() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    // The browser reaches the server through a proxy that the test cuts.
    let mut proxy = CutProxy::bind().await;
    let env = InProcessEnv::builder()
        .gateway(true)
        .server_keys(&format!("public_url = \"{}\"", proxy.url()))
        .start()
        .await;
    proxy.forward_to(&env.url);
    let output = (0..600)
        .map(|i| ("stdout", format!("numbered line {i}.")))
        .collect();
    env.script.set_build_output(output, Some(300));
    let token = env.login().await;
    let id = start_deploying(&env, &token, "steady").await;

    browser
        .open(&format!("{}/deployments/{id}", proxy.url()))
        .await;
    sign_in(&browser).await;
    browser
        .wait_for(
            "the first half, live",
            "return document.getElementById('log-lines').textContent.indexOf('numbered line 299.') >= 0 && document.getElementById('log-status').dataset.connection === 'live'",
        )
        .await;
    // The connection drops while the build goes on printing.
    proxy.cut();
    env.script.release();
    browser
        .wait_for(
            "the page to see the drop",
            "return document.getElementById('log-status').dataset.connection === 'reconnecting'",
        )
        .await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let lines = browser.log_lines("#log-lines").await;
    let numbered: Vec<u32> = lines
        .iter()
        .filter_map(|l| l.split("numbered line ").nth(1))
        .map(|n| n.trim_end_matches('.').parse().unwrap())
        .collect();
    assert_eq!(numbered, (0..600).collect::<Vec<_>>(), "{lines:?}");
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_of_100000_lines_keeps_only_the_rows_in_sight_in_the_page() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let output = (0..100_000)
        .map(|i| ("stdout", format!("line {i} of a long build")))
        .collect();
    env.script.set_build_output(output, None);
    let token = env.login().await;
    let id = start_deploying(&env, &token, "long").await;
    browser.open(&format!("{}/deployments/{id}", env.url)).await;
    sign_in(&browser).await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let shown = browser
        .wait_for(
            "every line counted",
            "var v = document.getElementById('log-lines'); return +v.dataset.lines > 100000 && {lines: +v.dataset.lines, rows: v.querySelectorAll('.log-row').length, last: v.querySelector('.log-row:last-child').textContent}",
        )
        .await;
    assert!(shown["rows"].as_u64().unwrap() < 200, "{shown}");
    // Followed to the end: the last row in sight is the deployment's end.
    assert_eq!(shown["last"], json!("Deployment ready"), "{shown}");
    // Scrolled to the top, the first lines are drawn.
    browser
        .eval("document.getElementById('log-lines').scrollTop = 0; return true")
        .await;
    let top = browser
        .wait_for(
            "the first line drawn",
            "var r = Array.from(document.querySelectorAll('#log-lines .log-row')).find(r => r.textContent.indexOf('line 0 of a long build') >= 0); return r && document.getElementById('log-follow').getAttribute('aria-pressed')",
        )
        .await;
    assert_eq!(top, json!("false"), "scrolling up stops following");
    browser.screenshot("deployment-long").await;
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_branches_are_searched_from_the_keyboard_and_one_branch_serves_every_service()
{
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let names: Vec<String> = std::iter::once("main".to_owned())
        .chain((1..5000).map(|i| format!("team-{}/feature-{i}", i % 7)))
        .collect();
    let branches: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), FAKE_COMMIT)).collect();
    env.script.set_branches(&branches);
    browser.open(&format!("{}/new", env.url)).await;
    sign_in(&browser).await;
    wait_path(&browser, "/new").await;
    browser
        .wait_for(
            "the services",
            "return document.querySelector('[data-deploy-service=\"billing\"]')",
        )
        .await;
    browser.click("#same-branch").await;
    browser.click("[data-deploy-service=\"billing\"]").await;
    browser
        .wait_for(
            "billing's branches",
            "var i = document.querySelector('[data-picker=\"billing\"] input'); return i && !i.disabled",
        )
        .await;
    browser.click("[data-deploy-service=\"orders\"]").await;
    browser
        .wait_for(
            "orders' branches",
            "var i = document.querySelector('[data-picker=\"orders\"] input'); return i && !i.disabled",
        )
        .await;
    let count = browser
        .eval("return document.querySelector('[data-picker=\"orders\"] .picker-note').textContent")
        .await;
    assert_eq!(count, json!("5,000 branches"));
    browser.click("[data-picker=\"orders\"] input").await;
    let listed = browser
        .wait_for(
            "the first branches and how many more",
            "var l = document.querySelector('[data-picker=\"orders\"] ul'); return !l.hidden && {options: l.querySelectorAll('[role=option]').length, more: l.querySelector('.picker-more').textContent}",
        )
        .await;
    assert_eq!(listed["options"], json!(50), "{listed}");
    assert_eq!(listed["more"], json!("4,950 more: type to narrow"));
    // How long a keystroke's filtering and drawing takes, for people to read (not asserted).
    let took = browser
        .eval("var i = document.querySelector('[data-picker=\"orders\"] input'); var t = performance.now(); i.value = 'feature-12'; i.dispatchEvent(new Event('input')); return performance.now() - t")
        .await;
    eprintln!("filtering 5,000 branches took {took} ms");
    pick_branch(&browser, "orders", "feature-4321", "team-2/feature-4321").await;
    // The shortcut chose it for billing too.
    let billing = browser
        .eval("return document.querySelector('[data-picker=\"billing\"] input').value")
        .await;
    assert_eq!(billing, json!("team-2/feature-4321"));
    browser.type_into("#sandbox-name", "wide").await;
    browser.click("#deploy-submit").await;
    wait_path(&browser, "/deployments/").await;
    assert_eq!(wait_end(&browser).await, json!("ready"));
    let token = env.login().await;
    let sandbox = env.get("/api/sandboxes/wide", Some(&token)).await.json();
    let chosen: Vec<(&str, &str)> = sandbox["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["service"].as_str().unwrap(),
                s["branch"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        chosen,
        [
            ("billing", "team-2/feature-4321"),
            ("orders", "team-2/feature-4321")
        ],
        "{sandbox}"
    );
    browser.quit().await;
}
