//! The deploy pipeline with the process runtime: a real Go service on the test git server,
//! fetched, built with the real Go toolchain and run by a real agent. What is the control
//! plane's alone (validation, ownership, one deployment at a time, listings, no agent) runs
//! in-process, with scripted agents.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use sdp_api::{Deployment, Page, Sandbox};
use sdp_testkit::{Deploys, InProcessEnv, Reply, TestEnv, USER, step_state, wait_until};

use crate::SDP;

/// Processes whose working directory is under `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cwd = std::fs::read_link(e.path().join("cwd")).ok()?;
            cwd.starts_with(&dir).then(|| {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            })
        })
        .collect()
}

fn seqs(frames: &[Value]) -> Vec<u64> {
    frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_is_fetched_built_run_and_answers_from_that_branch() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "feat", &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    assert_eq!(sandbox["state"], "ready", "{sandbox}");
    assert_eq!(sandbox["owner"], USER);

    let heads = env.git.heads("orders");
    let tip = &heads.iter().find(|(b, _)| b == "feature/x").unwrap().1;
    let service = &sandbox["services"][0];
    assert_eq!(service["commit"], tip.as_str(), "{sandbox}");
    assert_eq!(deployment["services"][0]["commit"], tip.as_str());
    let upstream = service["upstream"].as_str().unwrap();
    assert_eq!(env.answer(upstream).await, "orders on feature/x in feat\n");

    let steps: Vec<(&str, &str)> = deployment["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("fetching", "done"),
            ("building", "done"),
            ("starting", "done"),
            ("healthy", "done"),
            ("routing", "done")
        ]
    );
    for step in deployment["steps"].as_array().unwrap() {
        assert!(step["ended_at"].as_str().is_some(), "{step}");
    }

    let id = deployment["id"].as_str().unwrap();
    let text = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&token))
        .await;
    assert_eq!(text.status, 200);
    assert!(
        text.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    for expected in [
        "[orders/stdout] building orders",
        "[orders/stdout] orders listening on",
        "[orders/stderr] orders says hello on stderr",
        "deployment ready",
    ] {
        assert!(
            text.body.contains(expected),
            "{expected:?} missing from:\n{}",
            text.body
        );
    }
    let file = env.server_data_dir().join("logs").join(format!("{id}.log"));
    assert_eq!(
        std::fs::read_to_string(file).unwrap().lines().count(),
        seqs(&env.log_frames(&token, id, 1).await).len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_log_socket_replays_every_frame_in_order_from_any_seq_then_ends() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let reply = env.create_sandbox(&token, "live", &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // One viewer from the start, live; then two after the end, replaying.
    let live = env.log_frames(&token, &id, 1).await;
    let replay = env.log_frames(&token, &id, 1).await;
    let from_third = env.log_frames(&token, &id, 3).await;

    let n = replay.len() as u64;
    assert!(n >= 8, "{replay:?}");
    assert_eq!(seqs(&replay), (1..=n).collect::<Vec<_>>());
    assert_eq!(seqs(&live), seqs(&replay));
    assert_eq!(seqs(&from_third), (3..=n).collect::<Vec<_>>());
    let end = replay.last().unwrap();
    assert_eq!(end["type"], "end", "{end}");
    assert_eq!(end["state"], "ready");
    assert!(end["error"].is_null());
    for frame in &replay[..replay.len() - 1] {
        assert!(
            matches!(frame["type"].as_str(), Some("log" | "step")),
            "{frame}"
        );
        assert!(frame["ts"].as_str().unwrap().contains('T'));
    }
    let step = replay.iter().find(|f| f["type"] == "step").unwrap();
    assert_eq!(step["service"], "orders");
    assert_eq!(step["step"], "fetching");
    let log = replay.iter().find(|f| f["type"] == "log").unwrap();
    assert!(
        log["stream"].is_string() && log["line"].is_string(),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redeploy_of_the_same_commit_does_not_rebuild_and_a_new_commit_does() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (_, first) = env.deploy(&token, "again", &["orders@main"]).await;
    assert_eq!(first["state"], "ready", "{first}");

    let second = env
        .redeploy_and_wait(&token, "again", &["orders@main"])
        .await;
    assert_eq!(second["state"], "ready", "{second}");
    assert_eq!(step_state(&second, "building"), "skipped", "{second}");
    let id = second["id"].as_str().unwrap();
    let text = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&token))
        .await
        .body;
    assert!(text.contains("was built already: not rebuilding"), "{text}");
    assert!(!text.contains("building orders"), "{text}");

    env.git.push_change("orders", "main", "a new commit\n");
    let third = env
        .redeploy_and_wait(&token, "again", &["orders@main"])
        .await;
    assert_eq!(step_state(&third, "building"), "done", "{third}");
    let sandbox = env.get("/api/sandboxes/again", Some(&token)).await.json();
    let tip = env
        .git
        .heads("orders")
        .into_iter()
        .find(|(b, _)| b == "main")
        .unwrap()
        .1;
    assert_eq!(sandbox["services"][0]["commit"], tip.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn teardown_leaves_no_process_and_no_checkout() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, _) = env.deploy(&token, "gone", &["orders@main"]).await;
    let upstream = sandbox["services"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_owned();
    let work = env.agent_work_dir("micro-0");
    assert!(
        !processes_under(&work).is_empty(),
        "the service should run under the agent's work dir"
    );

    let reply = env
        .http
        .delete(format!("{}/api/sandboxes/gone", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    let body: Value = reply.json().await.unwrap();
    assert_eq!(body["state"], "deleted");

    let checkout = work.join("checkouts").join(sandbox["id"].as_str().unwrap());
    wait_until("the checkout is deleted", || !checkout.exists()).await;
    wait_until("no process is left", || processes_under(&work).is_empty()).await;
    assert!(
        env.http
            .get(format!("http://{upstream}/"))
            .send()
            .await
            .is_err()
    );
    let after = env.get("/api/sandboxes/gone", Some(&token)).await.json();
    assert_eq!(after["state"], "deleted");
    assert!(after["services"][0]["upstream"].is_null(), "{after}");
    let again = env
        .http
        .delete(format!("{}/api/sandboxes/gone", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    // The name is free again.
    let (_, redo) = env.deploy(&token, "gone", &["orders@main"]).await;
    assert_eq!(redo["state"], "ready", "{redo}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_fails_fails_the_deployment_at_building_with_its_exit_code() {
    let env = TestEnv::builder(SDP).repos(&["orders"]).start().await;
    let token = env.login().await;
    let (sandbox, deployment) = env.deploy(&token, "broken", &["orders@broken"]).await;
    assert_eq!(deployment["state"], "failed", "{deployment}");
    // go build exits with 2 on a compile error.
    let error = deployment["error"].as_str().unwrap();
    assert!(
        error.contains("the build of orders failed with exit code 2"),
        "{error}"
    );
    assert_eq!(deployment["services"][0]["step"], "building");
    assert_eq!(deployment["services"][0]["state"], "failed");
    assert_eq!(sandbox["state"], "failed");
    let id = deployment["id"].as_str().unwrap();
    let frames = env.log_frames(&token, id, 1).await;
    let end = frames.last().unwrap();
    assert_eq!(end["state"], "failed");
    assert!(
        end["error"].as_str().unwrap().contains("exit code 2"),
        "{end}"
    );
    assert!(
        frames.iter().any(
            |f| f["stream"] == "stderr" && f["line"].as_str().unwrap().contains("syntax error")
        ),
        "the compiler's complaint is in the log: {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_that_never_becomes_healthy_fails_at_starting_and_is_removed() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .health_timeout("3s")
        .start()
        .await;
    let token = env.login().await;
    let (_, deployment) = env.deploy(&token, "sick", &["orders@unhealthy"]).await;
    assert_eq!(deployment["state"], "failed", "{deployment}");
    assert_eq!(deployment["services"][0]["step"], "starting");
    let error = deployment["error"].as_str().unwrap();
    assert!(
        error.contains("did not become healthy within 3s"),
        "{error}"
    );
    assert!(error.contains("status 500"), "{error}");
    let work = env.agent_work_dir("micro-0");
    wait_until("the unhealthy instance is removed", || {
        processes_under(&work).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_is_refused_with_400_and_creates_nothing() {
    let env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    let many: Vec<Value> = (0..17)
        .map(|i| json!({"service": "orders", "branch": format!("b{i}")}))
        .collect();
    let cases = [
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "--upload-pack=touch /tmp/pwned"}]}),
            "invalid_branch",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "../x"}]}),
            "invalid_branch",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "a b"}]}),
            "invalid_branch",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "a\u{1}b"}]}),
            "invalid_branch",
        ),
        (
            json!({"name": "ok", "services": [{"service": "nope", "branch": "main"}]}),
            "unknown_service",
        ),
        (
            json!({"name": "Not_A_Label", "services": [{"service": "orders", "branch": "main"}]}),
            "invalid_sandbox_name",
        ),
        (
            json!({"name": "a.b", "services": [{"service": "orders", "branch": "main"}]}),
            "invalid_sandbox_name",
        ),
        (json!({"name": "ok", "services": many}), "too_many_services"),
        (json!({"name": "ok", "services": []}), "no_services"),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "main"}, {"service": "orders", "branch": "x"}]}),
            "duplicate_service",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "main"}], "ttl": "forever"}),
            "invalid_ttl",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders", "branch": "main"}], "ttl": "400d"}),
            "invalid_ttl",
        ),
        (
            json!({"name": "ok", "services": [{"service": "orders"}]}),
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let reply = env
            .post_json("/api/sandboxes", Some(&token), body.clone())
            .await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.error_code(), code, "{body}");
    }
    for table in [
        "sandboxes",
        "deployments",
        "sandbox_services",
        "deployment_services",
    ] {
        assert_eq!(env.count_rows(table), 0, "{table}");
    }
    // Nothing reached the agent.
    assert!(env.script.jobs("deploy").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn owners_change_their_own_sandboxes_and_everyone_can_read() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    env.script.add_user("bob", "bobs password");
    let alice = env.login().await;
    let bob = env.login_as("bob", "bobs password").await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, d) = env.deploy(&alice, "mine", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(env.get("/api/sandboxes/mine", Some(&bob)).await.status, 200);
    let attempts = [
        env.redeploy(&bob, "mine", &["orders@main"]).await,
        env.post_json(
            "/api/sandboxes/mine/extend",
            Some(&bob),
            json!({"ttl": "2h"}),
        )
        .await,
        Reply::from(
            env.http
                .delete(format!("{}/api/sandboxes/mine", env.url))
                .bearer_auth(&bob)
                .send()
                .await
                .unwrap(),
        )
        .await,
    ];
    for reply in attempts {
        assert_eq!(reply.status, 403, "{}", reply.body);
        assert_eq!(reply.error_code(), "not_owner");
    }
    let extended = env
        .post_json(
            "/api/sandboxes/mine/extend",
            Some(&alice),
            json!({"ttl": "48h"}),
        )
        .await;
    assert_eq!(extended.status, 200, "{}", extended.body);
    let expires = time::OffsetDateTime::parse(
        extended.json()["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let hours = (expires - time::OffsetDateTime::now_utc()).whole_hours();
    assert!((47..=48).contains(&hours), "{hours}");
    // Every mutation is in the audit trail; refused ones are not.
    assert_eq!(
        env.audit_actions(),
        "login,login,create_sandbox,extend_sandbox"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_deployment_of_a_busy_sandbox_is_refused_with_409() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    // The agent holds the deployment until the test has tried the others.
    env.script.set_deploys(Deploys::Held);
    let token = env.login().await;
    let reply = env.create_sandbox(&token, "busy", &["orders@main"]).await;
    assert_eq!(reply.status, 202);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = env.redeploy(&token, "busy", &["orders@main"]).await;
    assert_eq!(second.status, 409, "{}", second.body);
    assert_eq!(second.error_code(), "deployment_in_progress");
    let taken = env.create_sandbox(&token, "busy", &["orders@main"]).await;
    assert_eq!(taken.status, 409, "{}", taken.body);
    assert_eq!(taken.error_code(), "sandbox_exists");
    env.script.release();
    assert_eq!(env.wait_deployment(&token, &id).await["state"], "ready");
    assert_eq!(env.count_rows("deployments"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_micro_agent_a_deployment_fails_at_once_saying_so() {
    let mut env = InProcessEnv::builder().start().await;
    // Log in through an agent, then let it go.
    let token = env.login().await;
    env.agents.clear();
    env.wait_for_agents(0).await;

    let reply = env.create_sandbox(&token, "lonely", &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = env.wait_deployment(&token, &id).await;
    assert_eq!(d["state"], "failed");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("no micro agent is connected"),
        "{d}"
    );
    let frames = env.log_frames(&token, &id, 1).await;
    assert_eq!(seqs(&frames), [1, 2]);
    assert_eq!(frames[1]["type"], "end");
}

#[tokio::test(flavor = "multi_thread")]
async fn listings_are_newest_first_paginated_and_filtered() {
    let mut env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    env.agents.clear();
    env.wait_for_agents(0).await;
    for name in ["one", "two", "three"] {
        let reply = env.create_sandbox(&token, name, &["payments@main"]).await;
        assert_eq!(reply.status, 202, "{}", reply.body);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Read as the API's own types: a field missing or of another shape fails here.
    let names = |page: &Page<Sandbox>| -> Vec<String> {
        page.items.iter().map(|s| s.name.clone()).collect()
    };
    let page: Page<Sandbox> = env
        .get("/api/sandboxes?limit=2", Some(&token))
        .await
        .typed();
    assert_eq!(names(&page), ["three", "two"]);
    let cursor = page.next.as_deref().unwrap();
    let rest: Page<Sandbox> = env
        .get(
            &format!("/api/sandboxes?limit=2&cursor={cursor}"),
            Some(&token),
        )
        .await
        .typed();
    assert_eq!(names(&rest), ["one"]);
    assert!(rest.next.is_none());

    let mine: Page<Deployment> = env
        .get(&format!("/api/deployments?owner={}", USER), Some(&token))
        .await
        .typed();
    assert_eq!(mine.items.len(), 3);
    assert!(mine.items.iter().all(|d| d.requested_by == USER));
    let nobody: Page<Sandbox> = env
        .get("/api/sandboxes?owner=nobody", Some(&token))
        .await
        .typed();
    assert!(nobody.items.is_empty());
    // A sandbox's own deployments, by its name or its id.
    let of_two: Page<Deployment> = env
        .get("/api/sandboxes/two/deployments", Some(&token))
        .await
        .typed();
    assert_eq!(of_two.items.len(), 1);
    let two_id = &of_two.items[0].sandbox_id;
    assert_eq!(
        mine.items
            .iter()
            .filter(|d| &d.sandbox_id == two_id)
            .count(),
        1
    );
    let by_id: Page<Deployment> = env
        .get(
            &format!("/api/sandboxes/{two_id}/deployments?limit=1"),
            Some(&token),
        )
        .await
        .typed();
    assert_eq!(by_id.items[0].id, of_two.items[0].id);
    let unknown = env
        .get("/api/sandboxes/nine/deployments", Some(&token))
        .await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(unknown.error_code(), "unknown_sandbox");
    // Every deployment failed at once: no agent.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let failed = env
            .get("/api/deployments?state=failed", Some(&token))
            .await
            .json();
        if failed["items"].as_array().unwrap().len() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{failed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bad in [
        "/api/sandboxes?state=sleepy",
        "/api/sandboxes?limit=0",
        "/api/sandboxes?cursor=zzz",
        "/api/sandboxes?limit=many",
        "/api/deployments?limit=1000",
        "/api/deployments?limit=-1",
        "/api/sandboxes/one/deployments?state=sleepy",
    ] {
        let reply = env.get(bad, Some(&token)).await;
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        reply.error_code();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_sandbox_is_torn_down_by_itself() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (created, d) = env.deploy(&token, "brief", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    // Shortened to a second from now: the sweeper ends it.
    let reply = env
        .post_json(
            "/api/sandboxes/brief/extend",
            Some(&token),
            json!({"ttl": "1s"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sandbox = env.get("/api/sandboxes/brief", Some(&token)).await.json();
        if sandbox["state"] == "expired" {
            break;
        }
        assert!(Instant::now() < deadline, "{sandbox}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let work = env.agent_work_dir("micro-0");
    wait_until("the expired sandbox's process is gone", || {
        processes_under(&work).is_empty()
    })
    .await;
    wait_until("its checkout is gone", || {
        !work
            .join("checkouts")
            .join(created["id"].as_str().unwrap())
            .exists()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_leaves_the_password_in_no_file_log_or_git_config() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let canary = format!("canary-{:032x}", rand::random::<u128>());
    env.git.add_user("dora", &canary);
    let token = env.login_as("dora", &canary).await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (canary, stop) = (canary.clone().into_bytes(), stop.clone());
        std::thread::spawn(move || crate::canary::sample_cmdlines(canary, stop))
    };
    let (sandbox, d) = env.deploy(&token, "secret", &["orders@feature/x"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    // A second deploy of a new commit fetches (not clones) with the credentials.
    env.git.push_change("orders", "feature/x", "fetch again\n");
    let again = env
        .redeploy_and_wait(&token, "secret", &["orders@feature/x"])
        .await;
    assert_eq!(again["state"], "ready", "{again}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (hits, git_seen) = sampler.join().unwrap();
    assert!(
        git_seen > 0,
        "the sampler never saw git talk to the server, so it proves nothing"
    );
    assert!(
        hits.is_empty(),
        "the password is on a command line: {hits:?}"
    );
    // The working tree has no git metadata; the repository's only config is its mirror's,
    // which `assert_secret_nowhere` reads too.
    let work_dir = env.agent_work_dir("micro-0");
    let checkout = work_dir
        .join("checkouts")
        .join(sandbox["id"].as_str().unwrap());
    assert!(checkout.join("orders/main.go").exists());
    assert!(!checkout.join("orders/.git").exists());
    let mirrors: Vec<_> = std::fs::read_dir(work_dir.join("git/mirrors"))
        .unwrap()
        .flatten()
        .filter(|m| m.path().join("config").exists())
        .collect();
    assert_eq!(mirrors.len(), 1, "one mirror of orders");
    env.assert_secret_nowhere(&canary);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_plane_restart_mid_deployment_loses_no_log_line_and_the_deployment_finishes() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let reply = env
        .create_sandbox(&token, "restart", &["orders@main"])
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Restart while the agent builds (the Go build takes seconds), on the same address.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = env
            .get(&format!("/api/deployments/{id}"), Some(&token))
            .await
            .json();
        if d["services"][0]["step"] == "building" {
            break;
        }
        assert!(Instant::now() < deadline, "never reached building: {d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = env.url.trim_start_matches("http://").to_owned();
    env.stop_server();
    env.start_server(&addr);
    env.wait_for_agents(1).await;

    let d = env.wait_deployment(&token, &id).await;
    assert_eq!(d["state"], "ready", "{d}");
    let frames = env.log_frames(&token, &id, 1).await;
    let n = frames.len() as u64;
    assert_eq!(seqs(&frames), (1..=n).collect::<Vec<_>>());
    let lines: Vec<&str> = frames.iter().filter_map(|f| f["line"].as_str()).collect();
    assert!(
        lines.iter().any(|l| l.contains("building orders")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("orders listening on")),
        "{lines:?}"
    );
    assert_eq!(frames.last().unwrap()["type"], "end");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_that_stops_reading_slows_nothing_and_still_gets_every_frame() {
    let env = TestEnv::builder(SDP)
        .repos(&["chatty"])
        .health_timeout("2s")
        .start()
        .await;
    let token = env.login().await;
    let reply = env.create_sandbox(&token, "flood", &["chatty@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // This viewer connects, then reads nothing until the deployment is over.
    let url = format!(
        "{}/ws/deployments/{id}?from=1",
        env.url.replacen("http://", "ws://", 1)
    );
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut asleep, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let awake = env.log_frames(&token, &id, 1);
    let (awake, d) = tokio::join!(awake, env.wait_deployment(&token, &id));
    // The build printed its 100,000 lines and the deployment ended without waiting for the
    // sleeping viewer (chatty's run command exits at once, so it ends failed at starting).
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["services"][0]["step"], "starting", "{d}");
    let n = awake.len() as u64;
    assert!(n > 100_000, "{n}");
    assert_eq!(seqs(&awake), (1..=n).collect::<Vec<_>>());

    let mut seen = Vec::new();
    while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut asleep).await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            seen.push(v["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        seen,
        (1..=n).collect::<Vec<_>>(),
        "the slow viewer lost or doubled frames"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_input_to_a_redeploy_is_refused_with_400_and_creates_nothing() {
    let mut env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    env.agents.clear();
    env.wait_for_agents(0).await;
    // Without an agent the first deployment fails at once: the sandbox exists, idle.
    let reply = env.create_sandbox(&token, "target", &["orders@main"]).await;
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(env.wait_deployment(&token, &id).await["state"], "failed");

    let cases = [
        (
            json!({"services": [{"service": "orders", "branch": "--upload-pack=touch /tmp/pwned"}]}),
            "invalid_branch",
        ),
        (
            json!({"services": [{"service": "orders", "branch": "a..b"}]}),
            "invalid_branch",
        ),
        (
            json!({"services": [{"service": "nope", "branch": "main"}]}),
            "unknown_service",
        ),
        (json!({"services": []}), "no_services"),
        (
            json!({"services": [{"service": "orders", "branch": "main"}], "extra": 1}),
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let reply = env
            .post_json("/api/sandboxes/target/deploy", Some(&token), body.clone())
            .await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.body);
        assert_eq!(reply.error_code(), code, "{body}");
    }
    let reply = env.redeploy(&token, "nothing-here", &["orders@main"]).await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    assert_eq!(env.count_rows("deployments"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_that_expires_within_the_hour_says_so_until_it_is_extended() {
    let env = InProcessEnv::builder().gateway(true).start().await;
    let token = env.login().await;
    let create = |name: &str, ttl: &str| sdp_api::CreateSandbox {
        name: name.to_owned(),
        services: vec![sdp_api::Selection {
            service: "payments".to_owned(),
            branch: "main".to_owned(),
            follow: None,
        }],
        ttl: Some(ttl.to_owned()),
    };
    let brief: sdp_api::Accepted = env
        .post("/api/sandboxes", Some(&token), &create("brief", "30m"))
        .await
        .typed();
    assert!(brief.sandbox.expires_soon, "{brief:?}");
    let long: sdp_api::Accepted = env
        .post("/api/sandboxes", Some(&token), &create("long", "3h"))
        .await
        .typed();
    assert!(!long.sandbox.expires_soon, "{long:?}");

    let extend = sdp_api::Extend { ttl: "2h".into() };
    let extended = env
        .post("/api/sandboxes/brief/extend", Some(&token), &extend)
        .await;
    assert_eq!(extended.status, 200, "{}", extended.body);
    assert!(!extended.typed::<Sandbox>().expires_soon);
    let listed: Page<Sandbox> = env.get("/api/sandboxes", Some(&token)).await.typed();
    assert!(listed.items.iter().all(|s| !s.expires_soon), "{listed:?}");

    // An ended sandbox expires no more.
    let deleted = Reply::from(
        env.http
            .delete(format!("{}/api/sandboxes/long", env.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!deleted.typed::<Sandbox>().expires_soon, "{}", deleted.body);
}
