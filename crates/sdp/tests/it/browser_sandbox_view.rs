//! The dashboard's sandbox page in a real browser, against the in-process control plane with
//! a fake agent that reports what instances do after `ready`: services' states, the live
//! runtime log with its service filter, the history, and a sleeping sandbox's Wake button.

use serde_json::{Value, json};

use sdp_testkit::fake_agent::wire::{runtime_instance, runtime_log};
use sdp_testkit::{FakeAgent, InProcessEnv};

use crate::browser::{Browser, sign_in as sign_in_here};

/// A ready sandbox `name` running `selections`, with its id.
async fn ready(env: &InProcessEnv, name: &str, selections: &[&str]) -> String {
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, name, selections).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    sandbox["id"].as_str().unwrap().to_owned()
}

/// Sends `events` as a fake agent and waits until the control plane stored them.
async fn report(agent: &mut FakeAgent, events: Vec<sdp_protocol::RuntimeEvent>) {
    let last = events.last().map(|e| e.seq);
    agent.send_runtime(events).await;
    let answer = agent.next_runtime_answer().await;
    assert_eq!(
        (answer["type"].as_str(), answer["seq"].as_u64()),
        (Some("runtime_ack"), last),
        "{answer}"
    );
}

async fn sign_in(browser: &Browser, url: &str) {
    browser.open(url).await;
    sign_in_here(browser).await;
}

/// Opens sandbox `name`'s page from the list and waits until its runtime log is live.
async fn open_view(browser: &Browser, name: &str) {
    let button = format!("[data-sandbox=\"{name}\"] [data-sandbox-link]");
    browser
        .wait_for(
            "the sandbox's link",
            &format!(
                "return document.querySelector('{}')",
                button.replace('\'', "\\'")
            ),
        )
        .await;
    browser.click(&button).await;
    wait_live(browser).await;
}

async fn wait_live(browser: &Browser) {
    browser
        .wait_for(
            "the runtime log to be live",
            "var s = document.getElementById('rt-status'); return s.offsetParent !== null && s.textContent.indexOf('Live') === 0",
        )
        .await;
}

/// Waits until the runtime log shows `text`.
async fn wait_line(browser: &Browser, text: &str) {
    browser
        .wait_for(
            &format!("{text:?} in the runtime log"),
            &format!(
                "return document.getElementById('rt-lines').textContent.indexOf({}) >= 0",
                json!(text)
            ),
        )
        .await;
}

async fn runtime_text(browser: &Browser) -> String {
    browser
        .eval("return document.getElementById('rt-lines').textContent")
        .await
        .as_str()
        .unwrap()
        .to_owned()
}

async fn choose_service(browser: &Browser, service: &str) {
    browser
        .eval(&format!(
            "var s = document.getElementById('rt-service'); s.value = {}; s.dispatchEvent(new Event('change')); return true",
            json!(service)
        ))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_service_shows_its_state_reason_restarts_and_folded_last_lines_in_the_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let id = ready(&env, "crashy", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    // Its reason, and so its last line, holds markup: the page must show it as text.
    let reason = "exit code 2 <b id=bold>loud</b>";
    report(
        &mut agent,
        vec![runtime_instance(
            &id,
            1,
            "orders",
            "crashed",
            Some(reason),
            None,
            3,
        )],
    )
    .await;

    sign_in(&browser, &env.url).await;
    let listed = browser
        .wait_for(
            "the crashed service marked in the list",
            "var s = document.querySelector('[data-sandbox=\"crashy\"] .problem[data-service-state=\"crashed\"]'); return s && s.textContent",
        )
        .await;
    assert!(listed.as_str().unwrap().contains("3 restarts"), "{listed}");

    open_view(&browser, "crashy").await;
    let row = browser
        .wait_for(
            "orders shown as crashed",
            "var r = document.querySelector('#sv-services [data-view-service=\"orders\"][data-service-state=\"crashed\"]'); return r && r.innerText",
        )
        .await;
    let row = row.as_str().unwrap();
    assert!(row.contains(reason), "{row}");
    assert!(row.contains("3 restarts"), "{row}");
    let last = browser
        .eval(
            "var d = document.querySelector('[data-view-service=\"orders\"] details[data-last-lines]'); return d && {open: d.open, text: d.querySelector('pre').textContent, summary: d.querySelector('summary').textContent}",
        )
        .await;
    assert_eq!(last["open"], json!(false), "folded by default: {last}");
    assert_eq!(
        last["text"],
        json!(format!("last words before {reason}")),
        "{last}"
    );
    assert!(
        last["summary"].as_str().unwrap().contains("crashed"),
        "{last}"
    );
    let markup = browser
        .eval("return document.getElementById('bold') === null && document.querySelector('#main b') === null")
        .await;
    assert_eq!(markup, json!(true), "the reason became markup");
    let billing = browser
        .eval("var r = document.querySelector('[data-view-service=\"billing\"]'); return r && r.getAttribute('data-service-state')")
        .await;
    assert_ne!(billing, json!("crashed"));
    assert_ne!(billing, Value::Null, "billing is listed");

    // Unfolded, the last lines stay unfolded across the view's refreshes.
    browser
        .click("[data-view-service=\"orders\"] details[data-last-lines] summary")
        .await;
    report(
        &mut agent,
        vec![runtime_instance(
            &id,
            2,
            "orders",
            "crashed",
            Some(reason),
            None,
            4,
        )],
    )
    .await;
    browser
        .wait_for(
            "the new restart count",
            "var r = document.querySelector('[data-view-service=\"orders\"] [data-restarts]'); return r && r.getAttribute('data-restarts') === '4'",
        )
        .await;
    let open = browser
        .eval("return document.querySelector('[data-view-service=\"orders\"] details[data-last-lines]').open")
        .await;
    assert_eq!(open, json!(true));

    let history = browser
        .wait_for(
            "the sandbox's history",
            "var h = document.querySelectorAll('#sv-history [data-history-action]'); return h.length && Array.from(h).map(r => r.getAttribute('data-history-action')).join(',')",
        )
        .await;
    assert!(
        history.as_str().unwrap().contains("create_sandbox"),
        "{history}"
    );
    browser
        .wait_for(
            "the crash in the history",
            "return document.querySelector('#sv-history [data-history-action^=\"instance_\"]')",
        )
        .await;
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_lines_appear_live_as_text_and_the_service_filter_hides_other_services_in_the_browser()
 {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = InProcessEnv::builder().gateway(true).start().await;
    let id = ready(&env, "chatty", &["orders@main", "billing@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    report(
        &mut agent,
        vec![runtime_log(
            &id,
            1,
            "orders",
            "stdout",
            "said before the view opened",
        )],
    )
    .await;

    sign_in(&browser, &env.url).await;
    open_view(&browser, "chatty").await;
    wait_line(&browser, "[orders/stdout] said before the view opened").await;

    let hostile = "order <img src=x onerror=\"window.__pwned=1\"> placed";
    report(
        &mut agent,
        vec![
            runtime_log(&id, 2, "orders", "stdout", hostile),
            runtime_log(&id, 3, "billing", "stderr", "billing says hello"),
            runtime_instance(&id, 4, "orders", "crashed", Some("exit code 1"), None, 1),
        ],
    )
    .await;
    wait_line(&browser, "[billing/stderr] billing says hello").await;
    let text = runtime_text(&browser).await;
    assert!(text.contains(hostile), "{text}");
    let safe = browser
        .eval("return document.querySelector('#rt-lines img') === null && window.__pwned === undefined")
        .await;
    assert_eq!(safe, json!(true), "a log line became markup");
    let instance = browser
        .wait_for(
            "the crash as a system line",
            "var l = document.querySelector('#rt-lines [data-kind=\"instance\"][data-service=\"orders\"]'); return l && l.className + ' | ' + l.textContent",
        )
        .await;
    let instance = instance.as_str().unwrap();
    assert!(
        instance.contains("problem") && instance.contains("orders is crashed: exit code 1"),
        "{instance}"
    );
    // The frame refreshes the services' table without waiting for the next poll.
    browser
        .wait_for(
            "orders crashed in the services' table",
            "return document.querySelector('#sv-services [data-view-service=\"orders\"][data-service-state=\"crashed\"]')",
        )
        .await;

    choose_service(&browser, "billing").await;
    browser
        .wait_for(
            "only billing's lines",
            "var l = document.querySelectorAll('#rt-lines .log-row'); return l.length > 0 && document.getElementById('rt-status').textContent.indexOf('Live') === 0 && Array.from(l).every(s => s.getAttribute('data-service') === 'billing')",
        )
        .await;
    report(
        &mut agent,
        vec![
            runtime_log(&id, 5, "orders", "stdout", "orders after the filter"),
            runtime_log(&id, 6, "billing", "stdout", "billing after the filter"),
        ],
    )
    .await;
    wait_line(&browser, "billing after the filter").await;
    let text = runtime_text(&browser).await;
    assert!(!text.contains("orders"), "{text}");

    choose_service(&browser, "").await;
    wait_line(&browser, "[orders/stdout] orders after the filter").await;
    let text = runtime_text(&browser).await;
    assert_eq!(
        text.matches("billing after the filter").count(),
        1,
        "{text}"
    );
    assert!(text.contains("said before the view opened"), "{text}");

    // Leaving the page ends its WebSocket: later lines reach no page, not even the one left.
    browser
        .eval("window.__left = document.getElementById('rt-lines'); return true")
        .await;
    browser.click("#nav a[href=\"/sandboxes\"]").await;
    browser
        .wait_for(
            "the page left",
            "return !document.getElementById('rt-lines') && document.getElementById('sandboxes')",
        )
        .await;
    report(
        &mut agent,
        vec![runtime_log(
            &id,
            7,
            "orders",
            "stdout",
            "nobody is watching",
        )],
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let text = browser
        .eval("return window.__left.textContent")
        .await
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.contains("orders after the filter"), "{text}");
    assert!(!text.contains("nobody is watching"), "{text}");
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runtime_log_resumes_after_a_dropped_connection_without_gaps_or_repeats_and_stays_bounded_in_the_browser()
 {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let mut env = InProcessEnv::builder().gateway(true).start().await;
    let id = ready(&env, "steady", &["orders@main"]).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    report(
        &mut agent,
        (1..=3)
            .map(|i| runtime_log(&id, i, "orders", "stdout", &format!("resumed line {i}.")))
            .collect(),
    )
    .await;
    sign_in(&browser, &env.url).await;
    open_view(&browser, "steady").await;
    wait_line(&browser, "resumed line 3.").await;

    // A control plane restart drops the page's WebSocket; the page reconnects by itself.
    drop(agent);
    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    let mut agent = FakeAgent::connect(&env, "watcher").await;
    report(
        &mut agent,
        (1..=6)
            .map(|i| runtime_log(&id, i, "orders", "stdout", &format!("resumed line {i}.")))
            .collect(),
    )
    .await;
    wait_line(&browser, "resumed line 6.").await;
    wait_live(&browser).await;
    let text = runtime_text(&browser).await;
    let mut at = 0;
    for i in 1..=6 {
        let line = format!("resumed line {i}.");
        assert_eq!(text.matches(&line).count(), 1, "{line} once:\n{text}");
        let found = text.find(&line).unwrap();
        assert!(found >= at, "{line} out of order:\n{text}");
        at = found;
    }

    // A chatty service: the page keeps the newest 2000 lines.
    let mut seq = 6;
    for batch in 0..21 {
        let events = (0..100)
            .map(|i| {
                seq += 1;
                runtime_log(
                    &id,
                    seq,
                    "orders",
                    "stdout",
                    &format!("bulk {}.", batch * 100 + i),
                )
            })
            .collect();
        report(&mut agent, events).await;
    }
    wait_line(&browser, "bulk 2099.").await;
    let kept = browser.log_lines("#rt-lines").await;
    assert_eq!(kept.len(), 2000, "{kept:?}");
    assert!(kept[0].contains("bulk 100."), "{kept:?}");
    assert!(kept[1999].contains("bulk 2099."), "{kept:?}");
    browser.quit().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_sandbox_shows_its_badge_and_a_wake_button_that_wakes_it_in_the_browser() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    // Unused for a second, a sandbox sleeps: the control plane puts it to sleep for real.
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    let token = env.login().await;
    ready(&env, "dozy", &["orders@main"]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while env.get("/api/sandboxes/dozy", Some(&token)).await.json()["state"] != "sleeping" {
        assert!(std::time::Instant::now() < deadline, "dozy never slept");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    sign_in(&browser, &env.url).await;

    let badge = browser
        .wait_for(
            "the sleeping badge in the list",
            "var b = document.querySelector('[data-sandbox=\"dozy\"] [data-sandbox-state=\"sleeping\"] .badge.sleeping'); return b && b.textContent",
        )
        .await;
    assert_eq!(badge, json!("sleeping"));
    browser
        .wait_for(
            "the Wake button in the list",
            "return document.querySelector('[data-sandbox=\"dozy\"] [data-action=\"wake\"]')",
        )
        .await;

    open_view(&browser, "dozy").await;
    browser
        .wait_for(
            "the sleeping badge in the view",
            "return document.querySelector('#sv-state .badge.sleeping[data-view-state=\"sleeping\"]')",
        )
        .await;
    browser
        .wait_for(
            "orders sleeping in the view",
            "return document.querySelector('#sv-services [data-view-service=\"orders\"][data-service-state=\"sleeping\"]')",
        )
        .await;

    // Wake: the control plane has the agent start it again. (It falls asleep again a second
    // later, unused: the history is what says the button woke it.)
    browser.click("#sv-actions [data-action=\"wake\"]").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let history = env
            .get("/api/sandboxes/dozy/history", Some(&token))
            .await
            .json();
        let woken = history
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["action"] == "wake" && h["actor"] == sdp_testkit::USER);
        if woken {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never woken: {history}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let error = browser
        .eval("return document.getElementById('sv-error').hidden")
        .await;
    assert_eq!(error, json!(true));
    browser.quit().await;
}
