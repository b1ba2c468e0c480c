//! Builds shared between sandboxes, and a sandbox's services built side by side (issue 16):
//! the real binary, git server and Go toolchain, user code run as the test's `run_as` user.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sdp_testkit::users::{RUN_AS, run_as_ids};
use sdp_testkit::{TestEnv, step_state};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::SDP;

async fn log_of(env: &TestEnv, token: &str, deployment: &Value) -> String {
    let id = deployment["id"].as_str().unwrap();
    env.get(&format!("/api/deployments/{id}/logs"), Some(token))
        .await
        .body
}

async fn answer(env: &TestEnv, sandbox: &str) -> (u16, String) {
    let reply = reqwest::Client::new()
        .get(format!("{}/orders/1", env.router_url()))
        .header("X-SDP-Sandbox", sandbox)
        .send()
        .await
        .unwrap();
    (reply.status().as_u16(), reply.text().await.unwrap())
}

fn checkout(env: &TestEnv, sandbox: &Value, service: &str) -> PathBuf {
    env.agent_work_dir(&env.micro[0])
        .join("checkouts")
        .join(sandbox["id"].as_str().unwrap())
        .join(service)
}

/// Runs `script` through `sh -c` as user code's user; whether it succeeded.
fn as_user_code(script: &str) -> bool {
    let ids = run_as_ids();
    let (uid, gid) = ids.split_once(':').unwrap();
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .status()
        .unwrap()
        .success()
}

fn only_entry(dir: &Path) -> PathBuf {
    let entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    entries[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn another_users_sandbox_of_a_built_commit_runs_its_own_copy_of_that_build_which_nobody_can_change()
 {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let alice = env.login().await;
    let (first, d) = env.deploy(&alice, "first", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(step_state(&d, "building"), "done", "{d}");

    env.git.add_user("bob", "bobs password");
    let bob = env.token_for("bob", "bobs password").await;
    let (second, d) = env.deploy(&bob, "second", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    assert_eq!(step_state(&d, "building"), "skipped", "{d}");
    let log = log_of(&env, &bob, &d).await;
    assert!(
        log.contains("was built already by another sandbox: using a copy of that build"),
        "{log}"
    );
    assert!(
        !log.contains("building orders"),
        "the build did not run: {log}"
    );
    assert_eq!(
        answer(&env, "second").await,
        (200, "orders on main in second\n".into())
    );

    // The shared build is the agent's alone: user code can neither reach nor change it.
    let store = env.agent_work_dir(&env.micro[0]).join("builds");
    let meta = std::fs::metadata(&store).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o700));
    let shared_app = only_entry(&store).join(".sdp/bin/app");
    assert_eq!(std::fs::metadata(&shared_app).unwrap().uid(), 0);
    assert!(
        !as_user_code(&format!("echo changed >> {}", shared_app.display())),
        "{RUN_AS} wrote into the shared build"
    );
    assert!(!as_user_code(&format!("ls {}", store.display())));

    // Each sandbox's copy is its own: the first one's user code rewriting its binary changes
    // neither the shared build nor the second sandbox.
    let second_app = checkout(&env, &second, "orders").join(".sdp/bin/app");
    let (uid, _) = run_as_ids()
        .split_once(':')
        .map(|(u, g)| (u.to_owned(), g.to_owned()))
        .unwrap();
    assert_eq!(
        std::fs::metadata(&second_app).unwrap().uid().to_string(),
        uid
    );
    let original = std::fs::read(&second_app).unwrap();
    let first_app = checkout(&env, &first, "orders").join(".sdp/bin/app");
    assert!(as_user_code(&format!(
        "rm -f {app} && echo planted > {app}",
        app = first_app.display()
    )));
    assert_eq!(std::fs::read(&shared_app).unwrap(), original);
    assert_eq!(std::fs::read(&second_app).unwrap(), original);
    assert_eq!(answer(&env, "second").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_who_cannot_fetch_a_commit_never_gets_the_build_another_sandbox_made_of_it() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let alice = env.login().await;
    let (_, d) = env.deploy(&alice, "first", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");

    env.git.add_user("carol", "carols password");
    env.git.grant_only("orders", &[sdp_testkit::USER]);
    let carol = env.token_for("carol", "carols password").await;
    let (sandbox, d) = env.deploy(&carol, "second", &["orders@main"]).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["services"][0]["step"], "fetching", "{d}");
    let log = log_of(&env, &carol, &d).await;
    assert!(!log.contains("another sandbox"), "{log}");
    assert!(!checkout(&env, &sandbox, "orders").exists());
}

/// When each service's `building` step ran: (start, end).
fn building(deployment: &Value) -> Vec<(OffsetDateTime, OffsetDateTime)> {
    let at = |v: &Value| OffsetDateTime::parse(v.as_str().unwrap(), &Rfc3339).unwrap();
    deployment["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["step"] == "building")
        .map(|s| (at(&s["started_at"]), at(&s["ended_at"])))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandboxs_services_are_built_side_by_side_and_wait_their_turn_past_max_builds() {
    for (max_builds, together) in [("max_builds = 2\n", true), ("max_builds = 1\n", false)] {
        let env = TestEnv::builder(SDP)
            .repos(&["orders", "billing"])
            .gateway(true)
            .agent_extra(max_builds)
            .start()
            .await;
        let token = env.login().await;
        let (_, d) = env
            .deploy(&token, "pair", &["orders@main", "billing@main"])
            .await;
        assert_eq!(d["state"], "ready", "{d}");
        let steps = building(&d);
        assert_eq!(steps.len(), 2, "{d}");
        let log = log_of(&env, &token, &d).await;
        let waited = log.contains("waiting for a build slot: this agent builds at most 1 at once");
        assert_eq!(waited, !together, "{max_builds}: {log}");
        if together {
            let overlap = steps[0].0 < steps[1].1 && steps[1].0 < steps[0].1;
            assert!(overlap, "{max_builds}: {steps:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_build_stops_the_other_services_builds_and_starts_nothing() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "steady"])
        .gateway(true)
        .start()
        .await;
    // A build that would run until the build timeout (ten minutes).
    env.git.push_file(
        "steady",
        "main",
        "emit.py",
        "import time\nprint('building forever', flush=True)\nwhile True:\n    time.sleep(1)\n",
    );
    let token = env.login().await;
    let (sandbox, d) = env
        .deploy(&token, "doomed", &["orders@broken", "steady@main"])
        .await;
    assert_eq!(d["state"], "failed", "{d}");
    let error = d["error"].as_str().unwrap_or_default();
    assert!(error.contains("the build of orders failed"), "{d}");
    let log = log_of(&env, &token, &d).await;
    assert!(log.contains("building forever"), "{log}");
    assert!(
        log.contains("stopped: another service of this deployment failed"),
        "{log}"
    );
    let steps = d["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["step"] == "building"), "{d}");
    assert!(
        !steps.iter().any(|s| s["step"] == "starting"),
        "nothing started: {d}"
    );
    // The stopped build's process is gone with it.
    let steady = checkout(&env, &sandbox, "steady");
    sdp_testkit::wait_until("the stopped build has ended", || {
        !std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
            std::fs::read_link(p.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&steady))
        })
    })
    .await;
}
