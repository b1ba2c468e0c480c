//! Following a branch (issue 15): a push to a followed branch, told by a signed Bitbucket
//! webhook or found by polling, redeploys the service with its owner's credentials; without
//! them the commit waits for the owner's login. The control plane's side runs in-process with
//! scripted agents; a real push to the test git server runs end to end.

use std::time::Duration;

use sdp_testkit::{
    Deploys, InProcessEnv, PASSWORD, TestEnv, USER, cloud_push, files_containing, server_push,
    wait_until, webhook_signature,
};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::SDP;
use crate::browser::Browser;

const OLD: &str = "1111111111111111111111111111111111111111";
const NEW: &str = "2222222222222222222222222222222222222222";
const NEWER: &str = "3333333333333333333333333333333333333333";
const NEWEST: &str = "4444444444444444444444444444444444444444";

/// A server with push webhooks on, pushes gathered for `debounce`, and a gateway.
async fn env_with(debounce: &'static str) -> InProcessEnv {
    let env = InProcessEnv::builder()
        .gateway(true)
        .webhooks("0", debounce)
        .start()
        .await;
    env.script.set_branches(&[("main", OLD), ("other", OLD)]);
    env
}

async fn sandbox(env: &InProcessEnv, token: &str, name: &str) -> Value {
    let reply = env
        .get(&format!("/api/sandboxes/{name}"), Some(token))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

/// Waits (generously) until `check` holds of sandbox `name`; returns it.
async fn wait_sandbox(
    env: &InProcessEnv,
    token: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = sandbox(env, token, name).await;
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn service<'a>(sandbox: &'a Value, name: &str) -> &'a Value {
    sandbox["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == name))
        .unwrap_or_else(|| panic!("no service {name} in {sandbox}"))
}

fn is_ready_at(commit: &'static str) -> impl Fn(&Value) -> bool {
    move |s| s["state"] == "ready" && service(s, "orders")["commit"] == commit
}

/// A sandbox `name` whose `orders` follows `main`, deployed and ready at [`OLD`].
async fn following(env: &InProcessEnv, token: &str, name: &str) {
    let reply = env.create_following(token, name, &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(reply.json()["sandbox"]["services"][0]["follow"], true);
    wait_sandbox(
        env,
        token,
        name,
        "ready at the old commit",
        is_ready_at(OLD),
    )
    .await;
}

fn orders_push(env: &InProcessEnv, to: &str) -> Value {
    server_push(&env.repo_url("orders"), "main", OLD, to)
}

fn deploy_jobs(env: &InProcessEnv) -> usize {
    env.script.jobs("deploy").len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_push_to_a_followed_branch_redeploys_that_service_at_the_new_commit() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    // Another sandbox deploys the same branch without following it: it stays as it is.
    env.deploy(&token, "still", &["orders@main", "payments@main"])
        .await;

    env.script.set_branches(&[("main", NEW)]);
    let reply = env
        .deliver_signed("repo:refs_changed", "req-1", &orders_push(&env, NEW))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let delivery: sdp_api::Delivery = reply.typed();
    assert_eq!(delivery.signature, "valid");
    assert_eq!(delivery.outcome, "redeploying orders in demo");
    // The kit's `brittle` is built from the same repository: both are considered.
    assert_eq!(delivery.services, ["orders", "brittle"]);
    assert_eq!(delivery.refs[0].branch, "main");
    assert_eq!(delivery.refs[0].commit.as_deref(), Some(NEW));

    let s = wait_sandbox(&env, &token, "demo", "redeployed", is_ready_at(NEW)).await;
    assert_eq!(service(&s, "orders")["follow"], true);
    assert!(service(&s, "orders")["pending"].is_null(), "{s}");
    // Only the pushed service of only the following sandbox was deployed again, with the
    // owner's own credentials.
    let jobs = env.script.jobs("deploy");
    assert_eq!(jobs.len(), 3, "{jobs:?}");
    let last = &jobs[2]["job"];
    assert_eq!(last["sandbox"], "demo");
    assert_eq!(last["services"].as_array().unwrap().len(), 1);
    assert_eq!(last["credentials"]["username"], USER);
    let still = sandbox(&env, &token, "still").await;
    assert_eq!(service(&still, "orders")["commit"], OLD);
    assert!(
        env.audit_actions().contains("follow_redeploy"),
        "{}",
        env.audit_actions()
    );

    // The delivery log says what came and what it did.
    let log = env.deliveries(&token).await;
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].delivery_id.as_deref(), Some("req-1"));
    assert_eq!(log[0].event.as_deref(), Some("repo:refs_changed"));
    assert_eq!(log[0].source, "webhook");
    assert_eq!(
        log[0].repository.as_deref(),
        Some(
            env.repo_url("orders")
                .trim_start_matches("http://")
                .trim_end_matches(".git")
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloud_push_is_matched_to_the_catalog_by_its_repositorys_link() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    env.script.set_branches(&[("main", NEW)]);
    // Cloud's html link has no `.git` and may differ in case.
    let html = env
        .repo_url("orders")
        .trim_end_matches(".git")
        .replace("orders", "Orders");
    let reply = env
        .deliver_signed(
            "repo:push",
            "{hook-uuid-1}",
            &cloud_push(&html, "main", NEW),
        )
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        reply.typed::<sdp_api::Delivery>().outcome,
        "redeploying orders in demo"
    );
    wait_sandbox(&env, &token, "demo", "redeployed", is_ready_at(NEW)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_or_missing_signature_gets_401_and_triggers_nothing() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    let before = deploy_jobs(&env);
    let body = orders_push(&env, NEW);

    let forged = env
        .deliver(
            "repo:refs_changed",
            "req-forged",
            &body,
            Some(&format!("sha256={}", "0".repeat(64))),
        )
        .await;
    assert_eq!(forged.status, 401, "{}", forged.body);
    assert_eq!(forged.error_code(), "invalid_signature");
    // Signed, but over another body: what was signed is not what came.
    let tampered = env
        .deliver(
            "repo:refs_changed",
            "req-tampered",
            &orders_push(&env, NEWER),
            Some(&webhook_signature(body.to_string().as_bytes())),
        )
        .await;
    assert_eq!(tampered.status, 401, "{}", tampered.body);
    let unsigned = env
        .deliver("repo:refs_changed", "req-unsigned", &body, None)
        .await;
    assert_eq!(unsigned.status, 401, "{}", unsigned.body);

    // Recorded, without what they claimed: they were not read.
    let log = env.deliveries(&token).await;
    let seen: Vec<(&str, Option<&str>)> = log
        .iter()
        .map(|d| (d.signature.as_str(), d.repository.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [("missing", None), ("invalid", None), ("invalid", None)]
    );
    assert!(
        log.iter()
            .all(|d| d.refs.is_empty() && d.outcome.starts_with("refused"))
    );
    let metrics = env.get("/metrics", None).await.body;
    for counted in [
        "sdp_webhook_deliveries_total{result=\"invalid\"} 2",
        "sdp_webhook_deliveries_total{result=\"missing\"} 1",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
    // A valid delivery afterwards still works: nothing was taken from the refused ones.
    let valid = env
        .deliver_signed("repo:refs_changed", "req-forged", &body)
        .await;
    assert_eq!(valid.status, 202, "{}", valid.body);
    wait_until("the valid delivery redeploys", || {
        deploy_jobs(&env) == before + 1
    })
    .await;
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(s["services"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_delivery_id_triggers_nothing() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    env.script.set_branches(&[("main", NEW)]);
    let body = orders_push(&env, NEW);
    let first = env
        .deliver_signed("repo:refs_changed", "req-7", &body)
        .await;
    assert_eq!(first.status, 202, "{}", first.body);
    wait_sandbox(&env, &token, "demo", "redeployed", is_ready_at(NEW)).await;
    let jobs = deploy_jobs(&env);

    // Bitbucket retries with the same id; so does an attacker replaying a captured one.
    env.script.set_branches(&[("main", NEWER)]);
    let again = env
        .deliver_signed("repo:refs_changed", "req-7", &body)
        .await;
    assert_eq!(again.status, 202, "{}", again.body);
    let again: sdp_api::Delivery = again.typed();
    assert_eq!(again.outcome, "duplicate delivery: nothing triggered");
    // Longer than the debounce: a redeploy would have gone out by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deploy_jobs(&env), jobs);
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["commit"], NEW);
    let log = env.deliveries(&token).await;
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].outcome, "duplicate delivery: nothing triggered");

    // Told again under another id (a poll found it first, say): it runs that commit already.
    let told = env
        .deliver_signed("repo:refs_changed", "req-8", &body)
        .await
        .typed::<sdp_api::Delivery>();
    assert!(
        told.outcome
            .starts_with("orders in demo runs 222222222222 already"),
        "{}",
        told.outcome
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deploy_jobs(&env), jobs);
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_in_quick_succession_are_one_deployment_of_the_newest_commit() {
    let env = env_with("1s").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    let before = deploy_jobs(&env);
    for (i, commit) in [NEW, NEWER, NEWEST].into_iter().enumerate() {
        env.script.set_branches(&[("main", commit)]);
        let reply = env
            .deliver_signed(
                "repo:refs_changed",
                &format!("req-{i}"),
                &orders_push(&env, commit),
            )
            .await;
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
    wait_sandbox(
        &env,
        &token,
        "demo",
        "at the newest commit",
        is_ready_at(NEWEST),
    )
    .await;
    assert_eq!(
        deploy_jobs(&env),
        before + 1,
        "{:?}",
        env.script.jobs("deploy")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_in_progress_is_superseded_by_the_newest_commit() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    env.script.set_deploys(Deploys::Held);

    env.script.set_branches(&[("main", NEW)]);
    env.deliver_signed("repo:refs_changed", "req-1", &orders_push(&env, NEW))
        .await;
    wait_until("the first redeploy is taken", || deploy_jobs(&env) == 2).await;
    let first = env.script.jobs("deploy")[1]["job"]["deployment"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("the first redeploy runs", || {
        env.database()
            .query(&format!(
                "SELECT state FROM deployments WHERE id = '{first}'"
            ))
            .trim()
            == "running"
    })
    .await;

    env.script.set_branches(&[("main", NEWER)]);
    env.deliver_signed("repo:refs_changed", "req-2", &orders_push(&env, NEWER))
        .await;
    wait_until("the second redeploy is sent", || deploy_jobs(&env) == 3).await;
    let second = env.script.jobs("deploy")[2]["job"].clone();
    // The agent is told which deployment to stop first.
    assert_eq!(second["supersedes"], first.as_str(), "{second}");
    let old = env.wait_deployment(&token, &first).await;
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(old["error"], "superseded by a new commit of orders");
    let frames = env.log_frames(&token, &first, 1).await;
    let end = frames.last().unwrap();
    assert_eq!(end["type"], "end", "{frames:?}");
    assert_eq!(end["state"], "cancelled");
    assert_eq!(end["error"], "superseded by a new commit of orders");

    env.script.release();
    let newest = env
        .wait_deployment(&token, second["deployment"].as_str().unwrap())
        .await;
    assert_eq!(newest["state"], "ready", "{newest}");
    wait_sandbox(
        &env,
        &token,
        "demo",
        "at the newer commit",
        is_ready_at(NEWER),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_while_the_owners_credentials_are_gone_waits_and_their_login_deploys_it() {
    let mut env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    // A restart forgets every password; the session row (and the token) live on.
    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    let before = deploy_jobs(&env);

    env.script.set_branches(&[("main", NEW)]);
    let reply = env
        .deliver_signed("repo:refs_changed", "req-1", &orders_push(&env, NEW))
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        reply.typed::<sdp_api::Delivery>().outcome,
        format!("orders in demo waits for {USER}'s login")
    );
    let s = wait_sandbox(&env, &token, "demo", "waiting", |s| {
        !service(s, "orders")["pending"].is_null()
    })
    .await;
    assert_eq!(
        service(&s, "orders")["pending"],
        json!({"commit": NEW, "reason": "log in to deploy it"})
    );
    assert_eq!(service(&s, "orders")["commit"], OLD);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        deploy_jobs(&env),
        before,
        "nothing deploys without the owner"
    );
    // No password was kept for it: no file of the control plane holds one.
    let holding = files_containing(&env.server_data_dir(), PASSWORD.as_bytes());
    assert!(holding.is_empty(), "{holding:?}");

    // The owner's login deploys what waited, with the credentials just given.
    env.login().await;
    let s = wait_sandbox(
        &env,
        &token,
        "demo",
        "deployed after the login",
        is_ready_at(NEW),
    )
    .await;
    assert!(service(&s, "orders")["pending"].is_null(), "{s}");
    assert_eq!(deploy_jobs(&env), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn following_is_turned_on_and_off_by_the_owner_only_and_off_forgets_a_waiting_commit() {
    let mut env = env_with("100ms").await;
    let token = env.login().await;
    env.deploy(&token, "demo", &["orders@main", "payments@main"])
        .await;
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["follow"], false);

    // Not followed: a push does nothing, and says so.
    let reply = env
        .deliver_signed("repo:refs_changed", "req-1", &orders_push(&env, NEW))
        .await;
    assert_eq!(
        reply.typed::<sdp_api::Delivery>().outcome,
        // The kit's `brittle` is built from the same repository.
        "no sandbox follows orders@main or brittle@main"
    );

    let on = env.set_follow(&token, "demo", "orders", true).await;
    assert_eq!(on.status, 200, "{}", on.body);
    assert_eq!(service(&on.json(), "orders")["follow"], true);
    assert_eq!(service(&on.json(), "payments")["follow"], false);

    env.script.add_user("bob", "bobs-password");
    let bob = env.login_as("bob", "bobs-password").await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let theirs = env.set_follow(&bob, "demo", "orders", false).await;
    assert_eq!(theirs.status, 403, "{}", theirs.body);
    assert_eq!(theirs.error_code(), "not_owner");
    let unknown = env.set_follow(&token, "demo", "billing", true).await;
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert_eq!(unknown.error_code(), "unknown_service");
    let bad = env
        .http
        .patch(format!("{}/api/sandboxes/demo/services/orders", env.url))
        .bearer_auth(&token)
        .json(&json!({"follow": "yes"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["follow"], true);

    // A commit waiting for the login is forgotten when following stops.
    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    env.deliver_signed("repo:refs_changed", "req-2", &orders_push(&env, NEW))
        .await;
    wait_sandbox(&env, &token, "demo", "waiting", |s| {
        !service(s, "orders")["pending"].is_null()
    })
    .await;
    let off = env.set_follow(&token, "demo", "orders", false).await;
    assert_eq!(off.status, 200, "{}", off.body);
    assert!(service(&off.json(), "orders")["pending"].is_null());
    let actions = env.audit_actions();
    assert!(
        actions.contains("follow") && actions.contains("unfollow"),
        "{actions}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleted_branches_tags_other_events_and_unknown_repositories_trigger_nothing_and_say_why() {
    let env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    let before = deploy_jobs(&env);
    let outcome = |reply: sdp_testkit::Reply| {
        assert_eq!(reply.status, 202, "{}", reply.body);
        reply.typed::<sdp_api::Delivery>()
    };

    let mut deleted = orders_push(&env, &"0".repeat(40));
    deleted["changes"][0]["type"] = json!("DELETE");
    let d = outcome(
        env.deliver_signed("repo:refs_changed", "r1", &deleted)
            .await,
    );
    assert_eq!(d.outcome, "branch main deleted: nothing to deploy");
    assert_eq!(d.refs[0].change, "delete");

    let mut tag = orders_push(&env, NEW);
    tag["changes"][0]["ref"] = json!({"id": "refs/tags/v1", "displayId": "v1", "type": "TAG"});
    let d = outcome(env.deliver_signed("repo:refs_changed", "r2", &tag).await);
    assert_eq!(d.outcome, "a ref that is not a branch: ignored");

    let elsewhere = server_push(
        "https://elsewhere.example.com/scm/x/secret-project.git",
        "main",
        OLD,
        NEW,
    );
    let d = outcome(
        env.deliver_signed("repo:refs_changed", "r3", &elsewhere)
            .await,
    );
    assert_eq!(
        d.outcome,
        "no catalog service has this repository: nothing triggered"
    );
    // What the catalog does not know is not kept.
    assert_eq!(d.repository, None);
    assert!(d.refs.is_empty());

    let d = outcome(env.deliver_signed("pr:opened", "r4", &json!({})).await);
    assert_eq!(
        d.outcome,
        "event pr:opened is not a push: nothing triggered"
    );

    let broken = env
        .deliver_signed("repo:refs_changed", "r5", &json!({"changes": "no"}))
        .await;
    assert_eq!(broken.status, 400, "{}", broken.body);
    assert_eq!(broken.error_code(), "invalid_payload");

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(deploy_jobs(&env), before);
    let log = env.deliveries(&token).await;
    assert_eq!(log.len(), 5);
    let page = env
        .get("/api/hooks/deliveries?limit=2", Some(&token))
        .await
        .typed::<sdp_api::Page<sdp_api::Delivery>>();
    assert_eq!(page.items.len(), 2);
    let next = page.next.expect("a next page");
    let rest = env
        .get(
            &format!("/api/hooks/deliveries?limit=10&cursor={next}"),
            Some(&token),
        )
        .await
        .typed::<sdp_api::Page<sdp_api::Delivery>>();
    assert_eq!(rest.items.len(), 3);
    assert_eq!(rest.items[2].delivery_id.as_deref(), Some("r1"));
    let unauthenticated = env.get("/api/hooks/deliveries", None).await;
    assert_eq!(unauthenticated.status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_finds_a_push_to_a_followed_branch_without_any_webhook() {
    let env = InProcessEnv::builder()
        .gateway(true)
        .webhooks("1s", "100ms")
        .start()
        .await;
    env.script.set_branches(&[("main", OLD)]);
    let token = env.login().await;
    following(&env, &token, "demo").await;

    env.script.set_branches(&[("main", NEW)]);
    wait_sandbox(
        &env,
        &token,
        "demo",
        "redeployed by polling",
        is_ready_at(NEW),
    )
    .await;
    let log = env.deliveries(&token).await;
    let poll = log
        .iter()
        .find(|d| d.source == "poll")
        .expect("a poll in the log");
    assert_eq!(poll.signature, "none");
    assert_eq!(poll.outcome, "redeploying orders in demo");
    assert_eq!(poll.refs[0].commit.as_deref(), Some(NEW));
    // The tip is polled with the owner's own credentials.
    let lists = env.script.jobs("list_branches");
    assert!(
        lists
            .iter()
            .all(|j| j["job"]["credentials"]["username"] == USER)
    );
}

/// Pushes a commit to `main` of the test git server's `orders`; returns the new tip.
fn push(env: &TestEnv, message: &str) -> String {
    env.git.push_file("orders", "main", "message.txt", message)
}

/// Creates sandbox `demo` of `orders@main` following its branch, and waits until it is ready;
/// returns its first deployment.
async fn following_demo(env: &TestEnv, token: &str) -> serde_json::Value {
    let reply = env.create_following(token, "demo", &["orders@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = env.wait_deployment(token, &id).await;
    assert_eq!(first["state"], "ready", "{first}");
    first
}

/// Waits (two minutes at most) until sandbox `demo` is ready at `commit`.
async fn wait_for_commit(env: &TestEnv, token: &str, commit: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = env.get("/api/sandboxes/demo", Some(token)).await.json();
        if s["state"] == "ready" && s["services"][0]["commit"] == commit {
            break;
        }
        assert!(Instant::now() < deadline, "never at {commit}: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// End to end: a real commit pushed to the test git server, then a delivery signed and
/// shaped as Bitbucket Server's: the following sandbox runs the new commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_push_then_a_signed_delivery_redeploys_the_new_commit() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .catalog(&["orders"])
        .gateway(true)
        .webhooks("0", "200ms")
        .start()
        .await;
    let token = env.login().await;
    let first = following_demo(&env, &token).await;
    let before = first["services"][0]["commit"].as_str().unwrap().to_owned();

    let after = push(&env, "the second version");
    assert_ne!(before, after);
    let body = server_push(&env.git.url("orders"), "main", &before, &after);
    let reply = env
        .deliver_signed("repo:refs_changed", "real-1", &body)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    assert_eq!(
        reply.typed::<sdp_api::Delivery>().outcome,
        "redeploying orders in demo"
    );
    wait_for_commit(&env, &token, &after).await;
}

/// End to end: polling with `git ls-remote` finds a real push with no webhook at all.
#[tokio::test(flavor = "multi_thread")]
async fn polling_finds_a_real_push_without_any_webhook() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .catalog(&["orders"])
        .gateway(true)
        .webhooks("1s", "200ms")
        .start()
        .await;
    let token = env.login().await;
    following_demo(&env, &token).await;

    let after = push(&env, "the third version");
    wait_for_commit(&env, &token, &after).await;
    let log = env.deliveries(&token).await;
    assert!(log.iter().any(|d| d.source == "poll"), "{log:?}");
}

/// The dashboard: a waiting commit shows on the sandbox's page, the owner turns following off
/// there, and the Deliveries page says why the push did not deploy.
#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_shows_a_waiting_commit_turns_following_off_and_lists_the_delivery() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let mut env = env_with("100ms").await;
    let token = env.login().await;
    following(&env, &token, "demo").await;
    browser.open(&format!("{}/sandboxes/demo", env.url)).await;
    crate::browser::sign_in(&browser).await;
    // The session lives on in the browser; the restart forgets its password.
    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    env.deliver_signed("repo:refs_changed", "req-ui", &orders_push(&env, NEW))
        .await;

    browser.open(&format!("{}/sandboxes/demo", env.url)).await;
    let notice = browser
        .wait_for(
            "the waiting commit",
            "var p = document.querySelector('[data-pending=\"orders\"]'); return p && p.textContent",
        )
        .await;
    assert_eq!(notice, "new commit 2222222 waiting: log in to deploy it");
    let checked = browser
        .eval("return document.querySelector('[data-follow=\"orders\"]').checked")
        .await;
    assert_eq!(checked, true);
    browser.screenshot("follow-waiting").await;
    browser.click("[data-follow=\"orders\"]").await;
    browser
        .wait_for(
            "following off, and the notice gone",
            "var b = document.querySelector('[data-follow=\"orders\"]'); return b && !b.checked && !document.querySelector('[data-pending]')",
        )
        .await;
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["follow"], false);

    browser.click("#nav a[href=\"/hooks\"]").await;
    let outcome = browser
        .wait_for(
            "the delivery in the log",
            "var d = document.querySelector('[data-delivery] [data-outcome]'); return d && d.textContent",
        )
        .await;
    assert_eq!(outcome, format!("orders in demo waits for {USER}'s login"));
    browser.screenshot("follow-deliveries").await;
    browser.quit().await;
}

/// `sdp` against the in-process server, with `token` as the session.
async fn cli(env: &InProcessEnv, token: &str, args: &[&str]) -> (i32, String, String) {
    let (url, token) = (env.url.clone(), token.to_owned());
    let home = env.dir.path().join("cli-config");
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::run_sdp(
            &args,
            &[
                ("SDP_SERVER", &url),
                ("SDP_TOKEN", &token),
                ("XDG_CONFIG_HOME", home.to_str().unwrap()),
            ],
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_line_deploys_following_shows_a_waiting_commit_and_turns_following_off() {
    let mut env = env_with("100ms").await;
    let token = env.login().await;
    let (code, out, err) = cli(
        &env,
        &token,
        &[
            "deploy",
            "demo",
            "orders@main",
            "--follow-branch",
            "--follow",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["follow"], true);
    let (code, out, err) = cli(&env, &token, &["status", "demo"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("FOLLOW"), "{out}");

    env.restart_server_with("", "").await;
    env.wait_for_agents(1).await;
    env.deliver_signed("repo:refs_changed", "req-cli", &orders_push(&env, NEW))
        .await;
    let (code, out, err) = cli(&env, &token, &["status", "demo"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        format!("{out}{err}")
            .contains("orders: new commit 2222222222 waiting: log in to deploy it"),
        "{out}{err}"
    );

    let (code, out, err) = cli(&env, &token, &["follow", "demo", "orders", "--off"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no longer follows"), "{out}");
    let s = sandbox(&env, &token, "demo").await;
    assert_eq!(service(&s, "orders")["follow"], false);
    assert!(service(&s, "orders")["pending"].is_null(), "{s}");
    let (code, _, err) = cli(&env, &token, &["follow", "demo", "billing"]).await;
    assert_eq!(code, 1, "a service the sandbox does not run: {err}");
    assert!(err.contains("has no service"), "{err}");
}

#[test]
fn the_webhook_secret_comes_from_the_environment_and_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        "[git]\nprobe_repo = \"https://git.example.com/p.git\"\n\n[webhooks]\npoll_interval = \"5m\"\n",
    )
    .unwrap();
    let (code, out, err) = crate::run_sdp(
        &["config", "print", "--config", path.to_str().unwrap()],
        &[
            ("SDP_AGENT_TOKEN", "x"),
            ("SDP_WEBHOOKS__SECRET", "hook-secret-value"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[webhooks]"), "{out}");
    assert!(out.contains("secret = \"[REDACTED]\""), "{out}");
    assert!(out.contains("poll_interval = \"5m\""), "{out}");
    assert!(!out.contains("hook-secret-value") && !err.contains("hook-secret-value"));
    std::fs::write(
        &path,
        "[git]\nprobe_repo = \"https://git.example.com/p.git\"\n\n[webhooks]\npoll_interval = \"100ms\"\n",
    )
    .unwrap();
    let (code, _, err) = crate::run_sdp(
        &["config", "print", "--config", path.to_str().unwrap()],
        &[("SDP_AGENT_TOKEN", "x")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("poll_interval"), "{err}");
}

/// A service of its own repository whose build is that repository's `build.sh`, so that a
/// commit can make it slow; it serves `/` with Python.
const SLOW_SERVICE: &str = r#"
import http.server, os

class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Ok).serve_forever()
"#;

/// End to end, with a real agent: a push while a follow-redeploy is building cancels that
/// build (its deployment `cancelled`, superseded) and deploys the newest commit.
#[tokio::test(flavor = "multi_thread")]
async fn a_real_agent_stops_a_superseded_build_and_deploys_the_newest_commit() {
    let mut env = TestEnv::builder(SDP)
        .catalog(&["payments"])
        .gateway(true)
        .webhooks("0", "200ms")
        .start()
        .await;
    env.git.create_repo_with("slow", &["main"], |_| {
        vec![
            ("build.sh".into(), "echo quick build\n".into()),
            ("serve.py".into(), SLOW_SERVICE.into()),
        ]
    });
    let entry = format!(
        "[[services]]\nname = \"slow\"\nrepo = \"{}\"\nbuild = \"sh build.sh\"\nrun = \"python3 serve.py\"\nport = 8080\nhealth = \"/\"\nroutes = [\"/slow\"]\n",
        env.git.url("slow")
    );
    env.restart_server_with("", &entry);
    env.wait_for_connected_agents(2).await;
    let token = env.login().await;
    let reply = env.create_following(&token, "demo", &["slow@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let first = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(env.wait_deployment(&token, &first).await["state"], "ready");

    let slow = env
        .git
        .push_file("slow", "main", "build.sh", "echo slow build\nsleep 120\n");
    let body = server_push(&env.git.url("slow"), "main", OLD, &slow);
    let reply = env
        .deliver_signed("repo:refs_changed", "slow-1", &body)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    // The slow build is under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    let building = loop {
        let page = env
            .get("/api/sandboxes/demo/deployments", Some(&token))
            .await
            .json();
        let newest = page["items"][0].clone();
        if newest["id"] != first.as_str()
            && newest["services"][0]["step"] == "building"
            && newest["state"] == "running"
        {
            break newest["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "never building: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let quick = env
        .git
        .push_file("slow", "main", "build.sh", "echo quick again\n");
    let body = server_push(&env.git.url("slow"), "main", &slow, &quick);
    let reply = env
        .deliver_signed("repo:refs_changed", "slow-2", &body)
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let old = env.wait_deployment(&token, &building).await;
    assert_eq!(old["state"], "cancelled", "{old}");
    assert_eq!(old["error"], "superseded by a new commit of slow");
    // Long before the slow build could have ended: the agent stopped it.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = env.get("/api/sandboxes/demo", Some(&token)).await.json();
        if s["state"] == "ready" && s["services"][0]["commit"] == quick.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "never at {quick}: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = env
        .get("/api/sandboxes/demo/deployments", Some(&token))
        .await
        .json();
    assert_eq!(page["items"][0]["state"], "ready", "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "{page}");
}
