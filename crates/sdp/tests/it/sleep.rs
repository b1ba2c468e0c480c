//! Sleep and wake, the control plane's side (in-process, with scripted agents): an idle
//! sandbox sleeps, a gateway's `wake` or `POST …/wake` wakes it, `activity` keeps it awake.

use std::time::Duration;

use sdp_testkit::fake_agent::wire::runtime_instance;
use sdp_testkit::fake_agent::{WOKEN_UPSTREAM, wire};
use sdp_testkit::{FakeAgent, InProcessEnv, Wakes, wait_until};
use serde_json::Value;
use tokio::time::Instant;

use crate::run_sdp as sdp;

/// The sandbox `name` from the API.
async fn sandbox(env: &InProcessEnv, token: &str, name: &str) -> Value {
    let reply = env
        .get(&format!("/api/sandboxes/{name}"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Waits (generously) until sandbox `name` is `state`; returns it.
async fn wait_state(env: &InProcessEnv, token: &str, name: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sandbox(env, token, name).await;
        if s["state"] == state {
            return s;
        }
        assert!(Instant::now() < deadline, "never {state}: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sandbox's history, as `action actor: detail` lines.
async fn history(env: &InProcessEnv, token: &str, name: &str) -> Vec<String> {
    let reply = env
        .get(&format!("/api/sandboxes/{name}/history"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let entries: Vec<sdp_api::HistoryEntry> = reply.typed();
    entries
        .iter()
        .map(|h| format!("{} {}: {}", h.action, h.actor, h.detail))
        .collect()
}

/// Sandbox `name`'s entry in a route table job.
fn entry(table: &Value, name: &str) -> Option<Value> {
    table["job"]["sandboxes"]
        .as_array()?
        .iter()
        .find(|s| s["sandbox"] == name)
        .cloned()
}

/// The entry for `name` of the last table sent to the gateway.
fn routes_of(env: &InProcessEnv, name: &str) -> Option<Value> {
    entry(env.script.jobs("routes").last()?, name)
}

fn gateway(env: &InProcessEnv) -> &sdp_testkit::ScriptedAgent {
    env.gateway.as_ref().expect("a gateway agent")
}

/// Has the gateway report activity for `name` every 200 ms until the handle is dropped.
fn keep_awake(env: &InProcessEnv, name: &'static str) -> tokio::task::JoinHandle<()> {
    let frames = gateway(env).sender();
    tokio::spawn(async move {
        loop {
            if frames.send(wire::activity(&[name])).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

/// A sandbox deployed and asleep (idle_after is short).
async fn asleep(env: &InProcessEnv, token: &str, name: &str) -> Value {
    let (_, d) = env.deploy(token, name, &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    wait_state(env, token, name, "sleeping").await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_sandbox_sleeps_its_routes_first_then_its_instances_with_history() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .wake_timeout("7s")
        .start()
        .await;
    let token = env.login().await;
    let s = asleep(&env, &token, "dozy").await;
    let id = s["id"].as_str().unwrap().to_owned();
    assert_eq!(s["services"][0]["state"], "sleeping", "{s}");
    assert!(s["services"][0]["upstream"].is_null(), "{s}");

    wait_until("the micro agent got a sleep job", || {
        !env.script.jobs("sleep").is_empty()
    })
    .await;
    let sleep = &env.script.jobs("sleep")[0];
    assert_eq!(sleep["job"]["sandbox_id"], id.as_str(), "{sleep}");
    assert_eq!(sleep["agent"], "micro-0");
    // The gateways were told before the instances were stopped.
    let jobs = env.script.all_jobs();
    let told = jobs
        .iter()
        .position(|j| {
            j["job"]["name"] == "routes" && entry(j, "dozy").is_some_and(|e| e["sleeping"] == true)
        })
        .expect("a table with dozy sleeping");
    let stopped = jobs
        .iter()
        .position(|j| j["job"]["name"] == "sleep")
        .unwrap();
    assert!(told < stopped, "the sleep job came before the table");
    let table = env.script.jobs("routes").last().unwrap().clone();
    assert_eq!(table["job"]["wake_timeout_ms"], 7000, "{table}");
    let routes = routes_of(&env, "dozy").unwrap();
    assert_eq!(routes["sleeping"], true, "{routes}");
    assert!(routes["upstreams"].get("orders").is_none(), "{routes}");

    let listed = env
        .get("/api/sandboxes?state=sleeping", Some(&token))
        .await
        .json();
    assert_eq!(listed["items"][0]["name"], "dozy", "{listed}");
    let history = history(&env, &token, "dozy").await;
    assert!(
        history
            .iter()
            .any(|h| h == "sleep sdp: no routed request for 1s"),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wake_frame_from_the_gateway_wakes_the_sandbox_at_the_upstreams_its_agent_answers() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    let token = env.login().await;
    let s = asleep(&env, &token, "nap").await;
    let id = s["id"].as_str().unwrap().to_owned();

    let _awake = keep_awake(&env, "nap");
    // As the router does while it holds requests: again and again.
    gateway(&env).send(wire::wake("nap"));
    gateway(&env).send(wire::wake("nap"));
    let s = wait_state(&env, &token, "nap", "ready").await;
    assert_eq!(s["services"][0]["state"], "running", "{s}");
    assert_eq!(s["services"][0]["upstream"], WOKEN_UPSTREAM, "{s}");
    let wakes = env.script.jobs("wake");
    assert_eq!(wakes.len(), 1, "one wake at a time: {wakes:?}");
    assert_eq!(wakes[0]["job"]["sandbox_id"], id.as_str());
    wait_until("the gateway routes the woken sandbox", || {
        routes_of(&env, "nap").is_some_and(|r| {
            r.get("sleeping").is_none_or(|s| s == false)
                && r["upstreams"]["orders"] == WOKEN_UPSTREAM
        })
    })
    .await;
    let history = history(&env, &token, "nap").await;
    assert!(
        history
            .iter()
            .any(|h| h == &format!("wake router: orders at {WOKEN_UPSTREAM}")),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_wake_wakes_a_sleeping_sandbox_for_its_owner_only_and_leaves_an_awake_one() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    env.script.add_user("bob", "bobs password");
    let token = env.login().await;
    let bob = env.login_as("bob", "bobs password").await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    asleep(&env, &token, "siesta").await;

    let refused = env
        .post_json("/api/sandboxes/siesta/wake", Some(&bob), Value::Null)
        .await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(env.script.jobs("wake").is_empty());

    let _awake = keep_awake(&env, "siesta");
    let reply = env
        .post_json("/api/sandboxes/siesta/wake", Some(&token), Value::Null)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["name"], "siesta");
    wait_state(&env, &token, "siesta", "ready").await;
    let history = history(&env, &token, "siesta").await;
    assert!(
        history
            .iter()
            .any(|h| h.starts_with("wake alice: orders at")),
        "{history:?}"
    );

    // Awake: answered the same, and nothing is sent.
    let again = env
        .post_json("/api/sandboxes/siesta/wake", Some(&token), Value::Null)
        .await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.json()["state"], "ready");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.script.jobs("wake").len(), 1);

    assert_eq!(env.delete_sandbox(&token, "siesta").await.status, 202);
    let ended = env
        .post_json("/api/sandboxes/siesta/wake", Some(&token), Value::Null)
        .await;
    assert_eq!(ended.status, 409, "{}", ended.body);
    assert_eq!(ended.error_code(), "sandbox_ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn activity_keeps_a_sandbox_awake_past_idle_after_and_it_sleeps_once_that_stops() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("2s")
        .start()
        .await;
    let token = env.login().await;
    let (_, d) = env.deploy(&token, "busy", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");

    let awake = keep_awake(&env, "busy");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = sandbox(&env, &token, "busy").await;
    assert_eq!(s["state"], "ready", "{s}");
    assert!(env.script.jobs("sleep").is_empty());

    awake.abort();
    wait_state(&env, &token, "busy", "sleeping").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_wake_leaves_the_sandbox_sleeping_with_a_history_row() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    env.script
        .set_wakes(Wakes::Fail("the build of orders is gone".into()));
    let token = env.login().await;
    asleep(&env, &token, "grumpy").await;

    gateway(&env).send(wire::wake("grumpy"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let history = loop {
        let history = history(&env, &token, "grumpy").await;
        if history.iter().any(|h| h.starts_with("wake_failed")) {
            break history;
        }
        assert!(Instant::now() < deadline, "no wake_failed: {history:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        history
            .iter()
            .any(|h| h.starts_with("wake_failed router: ")
                && h.contains("the build of orders is gone")),
        "{history:?}"
    );
    let s = sandbox(&env, &token, "grumpy").await;
    assert_eq!(s["state"], "sleeping", "{s}");
    assert_eq!(routes_of(&env, "grumpy").unwrap()["sleeping"], true);

    // The router asks again: this time it wakes.
    env.script.set_wakes(Wakes::Ready);
    let _awake = keep_awake(&env, "grumpy");
    gateway(&env).send(wire::wake("grumpy"));
    wait_state(&env, &token, "grumpy", "ready").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sleeping_sandbox_still_expires_and_is_removed() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .sandbox_ttl("5s")
        .start()
        .await;
    let token = env.login().await;
    let s = asleep(&env, &token, "fading").await;
    let id = s["id"].as_str().unwrap().to_owned();
    wait_state(&env, &token, "fading", "expired").await;
    wait_until("the agent is told to remove it", || {
        env.script
            .jobs("teardown")
            .iter()
            .any(|j| j["job"]["sandbox_id"] == id.as_str())
    })
    .await;
    wait_until("the routes drop it", || routes_of(&env, "fading").is_none()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redeploy_of_a_sleeping_sandbox_makes_it_ready_at_its_new_instances() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    let token = env.login().await;
    asleep(&env, &token, "again").await;
    let _awake = keep_awake(&env, "again");
    let d = env
        .redeploy_and_wait(&token, "again", &["orders@main"])
        .await;
    assert_eq!(d["state"], "ready", "{d}");
    let s = wait_state(&env, &token, "again", "ready").await;
    assert_eq!(s["services"][0]["state"], "running", "{s}");
    wait_until("the routes say it is awake", || {
        routes_of(&env, "again").is_some_and(|r| {
            r.get("sleeping").is_none_or(|s| s == false) && r["upstreams"].get("orders").is_some()
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_after_zero_never_puts_a_sandbox_to_sleep() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("0")
        .start()
        .await;
    let token = env.login().await;
    let (_, d) = env.deploy(&token, "insomniac", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox(&env, &token, "insomniac").await["state"], "ready");
    assert!(env.script.jobs("sleep").is_empty());
}

#[test]
fn sleep_settings_show_in_config_print_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    let print = |keys: &str| {
        std::fs::write(
            &path,
            format!("{keys}\n[git]\nprobe_repo = \"https://git.example.com/p.git\"\n"),
        )
        .unwrap();
        sdp(
            &["config", "print", "--config", path.to_str().unwrap()],
            &[("SDP_AGENT_TOKEN", "x")],
        )
    };
    let (code, out, err) = print("");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("idle_after = \"2h\""), "{out}");
    assert!(out.contains("wake_timeout = \"1m\""), "{out}");
    let (code, out, err) = print("idle_after = \"0\"");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("idle_after = \"0s\""), "{out}");

    for (keys, message) in [
        (
            "wake_timeout = \"0\"",
            "`wake_timeout` must be longer than zero",
        ),
        (
            "idle_after = \"10ms\"",
            "`idle_after` must be \"0\" (sandboxes never sleep) or at least 1s, not 10ms",
        ),
        ("idle_after = \"soon\"", "\"soon\" is not a duration"),
    ] {
        let (code, _, err) = print(keys);
        assert_eq!(code, 2, "{keys}: {err}");
        assert!(err.contains(message), "{keys}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_reports_defer_to_sleep_and_wake() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .idle_after("1s")
        .start()
        .await;
    let token = env.login().await;
    let s = asleep(&env, &token, "quiet").await;
    let id = s["id"].as_str().unwrap().to_owned();
    let mut agent = FakeAgent::connect(&env, "watcher").await;

    // While it sleeps, a late report of a running instance changes nothing.
    agent
        .send_runtime(vec![runtime_instance(
            &id,
            1,
            "orders",
            "running",
            None,
            Some("127.0.0.1:20998"),
            0,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 1);
    let s = sandbox(&env, &token, "quiet").await;
    assert_eq!(s["services"][0]["state"], "sleeping", "{s}");
    assert!(s["services"][0]["upstream"].is_null(), "{s}");

    // Awake, a late `sleeping` report is from the sleep the wake undid.
    let _awake = keep_awake(&env, "quiet");
    gateway(&env).send(wire::wake("quiet"));
    wait_state(&env, &token, "quiet", "ready").await;
    agent
        .send_runtime(vec![runtime_instance(
            &id, 2, "orders", "sleeping", None, None, 0,
        )])
        .await;
    assert_eq!(agent.next_runtime_answer().await["seq"], 2);
    let s = sandbox(&env, &token, "quiet").await;
    assert_eq!(s["services"][0]["state"], "running", "{s}");
    assert_eq!(s["services"][0]["upstream"], WOKEN_UPSTREAM, "{s}");
}
