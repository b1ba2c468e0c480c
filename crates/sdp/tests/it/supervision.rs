//! Instances after `ready`, end to end: watched by their agent, restarted by their policy,
//! their output in the sandbox's runtime log, with the real binary, real processes and the
//! real Docker Engine.

use std::process::Command;
use std::time::Duration;

use sdp_testkit::{AGENT_TOKEN, TestEnv, docker_available, docker_inspect};
use serde_json::Value;

use crate::SDP;

/// Asks `check` every 100 ms until it gives a value, for at most a minute: a restart waits
/// a backoff of a second or more, and a health check runs every 300 ms.
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    sdp_testkit::eventually(what, Duration::from_secs(60), check).await
}

/// The actions of the sandbox's history, oldest first.
async fn history(env: &TestEnv, token: &str, sandbox: &str) -> Vec<String> {
    let reply = env
        .get(&format!("/api/sandboxes/{sandbox}/history"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let mut actions: Vec<(String, String)> = reply
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["at"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    actions.sort();
    actions.into_iter().map(|(_, action)| action).collect()
}

/// The process group of a process-runtime instance, from its pid file.
fn process_group(env: &TestEnv, sandbox_id: &str, service: &str) -> i32 {
    let path = env
        .agent_work_dir("micro-0")
        .join("run")
        .join(sandbox_id)
        .join(format!("{service}.pid.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str::<Value>(&text).unwrap()["pid"]
        .as_i64()
        .unwrap() as i32
}

/// `kill -9` of every process of the instance.
fn kill_group(pgid: i32) {
    let status = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 of group {pgid}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_instance_is_reported_crashed_restarted_and_the_router_answers_again() {
    let env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "phoenix", &["talker@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let sandbox_id = sandbox["id"].as_str().unwrap();
    let before = env.through_router("phoenix", "/talker/hello").await;
    assert_eq!(
        (before.status, before.body.as_str()),
        (200, "talker on phoenix\n")
    );
    let first = process_group(&env, sandbox_id, "talker");

    kill_group(first);

    let restarted = eventually("the instance runs again after a restart", || async {
        let s = env.sandbox_service(&token, "phoenix", "talker").await;
        (s["state"] == "running" && s["restarts"].as_u64() >= Some(1)).then_some(s)
    })
    .await;
    assert_ne!(
        process_group(&env, sandbox_id, "talker"),
        first,
        "a new instance"
    );
    // The route table follows the report a moment later.
    let after = eventually("the router answers again", || async {
        let r = env.through_router("phoenix", "/talker/again").await;
        (r.status != 503).then_some(r)
    })
    .await;
    assert_eq!(
        (after.status, after.body.as_str()),
        (200, "talker on phoenix\n"),
        "{restarted}"
    );
    let actions = history(&env, &token, "phoenix").await;
    let crashed = actions.iter().position(|a| a == "instance_crashed");
    let back = actions.iter().position(|a| a == "instance_restarted");
    assert!(
        crashed.is_some() && back > crashed,
        "the crash, then the restart, are in the history: {actions:?}"
    );
    // The runtime log says what happened, in the instance's own words and the agent's.
    let log = env
        .get("/api/sandboxes/phoenix/logs?service=talker", Some(&token))
        .await;
    assert_eq!(log.status, 200, "{}", log.body);
    assert!(log.body.contains("tick 1"), "{}", log.body);
    assert!(log.body.contains("SIGKILL"), "{}", log.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_must_not_restart_stays_crashed_and_the_router_answers_503_instance_down()
{
    let env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "glass", &["fragile@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let sandbox_id = sandbox["id"].as_str().unwrap();
    assert_eq!(env.through_router("glass", "/fragile/x").await.status, 200);

    kill_group(process_group(&env, sandbox_id, "fragile"));

    let crashed = eventually("the service is crashed", || async {
        let s = env.sandbox_service(&token, "glass", "fragile").await;
        (s["state"] == "crashed").then_some(s)
    })
    .await;
    assert!(
        crashed["reason"].as_str().unwrap().contains("SIGKILL"),
        "{crashed}"
    );
    let last_lines = crashed["last_lines"].as_array().unwrap();
    assert!(
        last_lines
            .iter()
            .any(|l| l.as_str().unwrap().starts_with("tick ")),
        "{crashed}"
    );
    let down = eventually("the router says it is down", || async {
        let r = env.through_router("glass", "/fragile/x").await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(down.status, 503, "{}", down.body);
    let error = &down.json()["error"];
    assert_eq!(error["code"], "instance_down", "{}", down.body);
    assert_eq!(error["state"], "crashed", "{}", down.body);
    // It stays so: nothing restarts it behind the user's back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = env.sandbox_service(&token, "glass", "fragile").await;
    assert_eq!(later["state"], "crashed", "{later}");
    assert_eq!(later["restarts"], 0, "{later}");
    assert_eq!(env.through_router("glass", "/fragile/x").await.status, 503);
}

/// The `tick N` numbers in the sandbox's runtime log of `service`.
async fn ticks(env: &TestEnv, token: &str, sandbox: &str, service: &str) -> Vec<u64> {
    let log = env
        .get(
            &format!("/api/sandboxes/{sandbox}/logs?service={service}"),
            Some(token),
        )
        .await;
    assert_eq!(log.status, 200, "{}", log.body);
    log.body
        .lines()
        .filter_map(|l| {
            l.split_once("] tick ")
                .map(|(_, n)| n.trim().parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_line_an_instance_prints_before_during_and_after_an_agent_restart_is_in_the_runtime_log_once()
 {
    let mut env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (_, d) = env.deploy(&token, "steady", &["talker@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    eventually("lines reach the runtime log", || async {
        (ticks(&env, &token, "steady", "talker").await.len() > 20).then_some(())
    })
    .await;

    // Killed, not stopped: it gets no chance to tidy up.
    env.agents[0].kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    // The instance printed about 50 lines while its agent was away; then a few hundred more.
    let seen = eventually("lines printed after the restart arrive", || async {
        let seen = ticks(&env, &token, "steady", "talker").await;
        (seen.len() > 200).then_some(seen)
    })
    .await;

    let expected: Vec<u64> = (0..seen.len() as u64).collect();
    let missing: Vec<u64> = expected
        .iter()
        .filter(|n| !seen.contains(n))
        .copied()
        .collect();
    let mut sorted = seen.clone();
    sorted.dedup();
    assert!(
        missing.is_empty() && sorted.len() == seen.len() && seen == expected,
        "every line once and in order: missing {missing:?}, {} lines for {} numbers",
        seen.len(),
        sorted.len()
    );
    assert_eq!(
        env.sandbox_service(&token, "steady", "talker").await["state"],
        "running"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chatty_service_does_not_grow_the_runtime_log_past_its_limit() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    env.restart_server_with("max_runtime_log_size = \"64KiB\"", "");
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "loud", &["torrent@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let id = sandbox["id"].as_str().unwrap();
    let dir = env.server_data_dir().join("runtime");
    let size = |name: String| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    // Rotated at least once: the flood printed past the limit.
    eventually("the runtime log is rotated", || async {
        (size(format!("{id}.log.1")) > 0).then_some(())
    })
    .await;
    for _ in 0..20 {
        let (current, rotated) = (size(format!("{id}.log")), size(format!("{id}.log.1")));
        assert!(
            current <= 64 * 1024 && rotated <= 64 * 1024,
            "the log holds {current} and {rotated} bytes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The newest lines are there to read.
    let tail = env
        .get("/api/sandboxes/loud/logs?tail=5", Some(&token))
        .await;
    assert_eq!(tail.status, 200, "{}", tail.body);
    assert_eq!(tail.body.lines().count(), 5, "{}", tail.body);

    env.delete_sandbox(&token, "loud").await;
    eventually("the runtime log is deleted with its sandbox", || async {
        (size(format!("{id}.log")) == 0 && size(format!("{id}.log.1")) == 0).then_some(())
    })
    .await;
}

/// The docker runtime's container of `service` in `sandbox_id`.
fn container(env: &TestEnv, sandbox_id: &str, service: &str) -> String {
    format!("sdp_{sandbox_id}_{service}_{}", env.micro[0])
}

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sandbox (named `prefix` and a random tail: the engine is shared) of `service` on
/// `branch` in the docker runtime: its environment, a session, its name and its container.
async fn in_docker(prefix: &str, service: &str, branch: &str) -> (TestEnv, String, String, String) {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .runtime("docker")
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (sandbox, d) = env
        .deploy(&token, &name, &[&format!("{service}@{branch}")])
        .await;
    assert_eq!(d["state"], "ready", "{d}");
    let container = container(&env, sandbox["id"].as_str().unwrap(), service);
    (env, token, name, container)
}

/// `kill -9` of a container's first process, from the host.
fn kill_container(inspected: &Value) {
    let pid = inspected["State"]["Pid"].as_i64().unwrap();
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_container_is_restarted_and_one_stopped_behind_the_agents_back_is_restored() {
    if !docker_available() {
        return;
    }
    let (env, token, name, container) = in_docker("dock", "orders", "feature/x").await;
    let answer = format!("orders on feature/x in {name}\n");
    let ok = env.through_router(&name, "/orders/1").await;
    assert_eq!((ok.status, ok.body.as_str()), (200, answer.as_str()));
    let inspected = docker_inspect(&container).unwrap();
    assert_eq!(
        inspected["HostConfig"]["RestartPolicy"]["Name"], "unless-stopped",
        "the engine brings it back after its own restart"
    );

    kill_container(&inspected);
    eventually("the container runs again after the kill", || async {
        let s = env.sandbox_service(&token, &name, "orders").await;
        (s["state"] == "running" && s["restarts"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let again = eventually("the router answers again", || async {
        let r = env.through_router(&name, "/orders/2").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(again.body, answer);
    let restarts = env.sandbox_service(&token, &name, "orders").await["restarts"]
        .as_u64()
        .unwrap();

    // Stopped behind the agent's back: the engine leaves it stopped; the agent does not.
    docker(&["stop", "-t", "1", &container]);
    eventually("the stopped container is restored", || async {
        let s = env.sandbox_service(&token, &name, "orders").await;
        (s["state"] == "running" && s["restarts"].as_u64() > Some(restarts)).then_some(())
    })
    .await;
    let restored = eventually("the router answers after the restore", || async {
        let r = env.through_router(&name, "/orders/3").await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(restored.body, answer);
    assert_eq!(
        docker_inspect(&container).unwrap()["State"]["Running"],
        true
    );
    env.delete_sandbox(&token, &name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_sandbox_sleeps_and_a_request_through_the_router_wakes_it_without_a_rebuild() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    env.restart_server_with("idle_after = \"2s\"", "");
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "nap", &["orders@feature/x"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let before = sandbox["services"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_owned();
    let binary = env
        .agent_work_dir("micro-0")
        .join("checkouts")
        .join(sandbox["id"].as_str().unwrap())
        .join("orders/.sdp/bin/app");
    let built = std::fs::metadata(&binary).unwrap().modified().unwrap();

    let asleep = eventually("the idle sandbox sleeps", || async {
        let s = env.get("/api/sandboxes/nap", Some(&token)).await.json();
        (s["state"] == "sleeping").then_some(s)
    })
    .await;
    assert_eq!(asleep["services"][0]["state"], "sleeping", "{asleep}");
    eventually("its instance is stopped", || async {
        reqwest::get(format!("http://{before}/orders/1"))
            .await
            .is_err()
            .then_some(())
    })
    .await;

    // The request waits while the sandbox wakes, and gets the service's own answer.
    let woken = env.through_router("nap", "/orders/1").await;
    assert_eq!(
        (woken.status, woken.body.as_str()),
        (200, "orders on feature/x in nap\n"),
        "{:?}",
        woken.headers
    );
    let awake = env.get("/api/sandboxes/nap", Some(&token)).await.json();
    assert_eq!(awake["state"], "ready", "{awake}");
    assert_eq!(awake["services"][0]["state"], "running", "{awake}");
    // Started again from what was built: no deployment, no build.
    assert_eq!(
        std::fs::metadata(&binary).unwrap().modified().unwrap(),
        built,
        "the binary was not rebuilt"
    );
    let deployments = env
        .get("/api/deployments?limit=10", Some(&token))
        .await
        .json();
    assert_eq!(
        deployments["items"].as_array().unwrap().len(),
        1,
        "{deployments}"
    );
    let actions = history(&env, &token, "nap").await;
    for action in ["sleep", "wake"] {
        assert!(
            actions.iter().any(|a| a == action),
            "{action} is in the history: {actions:?}"
        );
    }
    let log = env
        .get("/api/sandboxes/nap/logs?service=orders", Some(&token))
        .await;
    assert!(!log.body.contains("building"), "{}", log.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_container_that_must_not_restart_stays_crashed_and_the_router_answers_503() {
    if !docker_available() {
        return;
    }
    let (env, token, name, container) = in_docker("glass", "brittle", "main").await;
    assert_eq!(env.through_router(&name, "/brittle/1").await.status, 200);
    let inspected = docker_inspect(&container).unwrap();
    assert_eq!(inspected["HostConfig"]["RestartPolicy"]["Name"], "no");

    kill_container(&inspected);
    let crashed = eventually("the service is crashed", || async {
        let s = env.sandbox_service(&token, &name, "brittle").await;
        (s["state"] == "crashed").then_some(s)
    })
    .await;
    assert!(
        crashed["reason"].as_str().unwrap().contains("SIGKILL"),
        "{crashed}"
    );
    let down = eventually("the router says it is down", || async {
        let r = env.through_router(&name, "/brittle/2").await;
        (r.status == 503).then_some(r)
    })
    .await;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(down.json()["error"]["code"], "instance_down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = env.sandbox_service(&token, &name, "brittle").await;
    assert_eq!(
        (later["state"].as_str(), later["restarts"].as_u64()),
        (Some("crashed"), Some(0)),
        "{later}"
    );
    assert_eq!(
        docker_inspect(&container).unwrap()["State"]["Running"],
        false
    );
    env.delete_sandbox(&token, &name).await;
}
