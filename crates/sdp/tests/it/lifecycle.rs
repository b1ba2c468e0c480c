//! The lifecycle across processes: a sandbox is known by its id everywhere, so a name can be
//! reused at once; an agent that was away catches up; a log that cannot be stored fails its
//! deployment and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

use sdp_testkit::{
    AGENT_TOKEN, Api, FakeAgent, InProcessEnv, Reply, TestEnv, step_state, wait_until,
};

use crate::SDP;

async fn delete(env: &Api, token: &str, name: &str) -> Reply {
    Reply::from(
        env.http
            .delete(format!("{}/api/sandboxes/{name}", env.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn checkout_of(env: &TestEnv, agent: &str, sandbox: &Value) -> PathBuf {
    env.agent_work_dir(agent)
        .join("checkouts")
        .join(sandbox["id"].as_str().unwrap())
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_deleted_and_created_again_at_once_ends_ready_and_keeps_its_checkout() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (old, d) = env.deploy(&token, "again", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");

    // The new deployment starts while the delete's teardown runs on the one agent.
    let deleted = delete(&env, &token, "again").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    let created = env
        .create_sandbox(&token, "again", &["orders@feature/x"])
        .await;
    assert_eq!(created.status, 202, "{}", created.body);
    let new = created.json()["sandbox"].clone();
    assert_ne!(new["id"], old["id"]);
    let deployment = created.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let d = env.wait_deployment(&token, &deployment).await;
    assert_eq!(d["state"], "ready", "{d}");

    let old_checkout = checkout_of(&env, "micro-0", &old);
    wait_until("the old sandbox's checkout is removed", || {
        !old_checkout.exists()
    })
    .await;
    let new_checkout = checkout_of(&env, "micro-0", &new);
    assert!(
        new_checkout.join("orders/main.go").exists(),
        "the new checkout is whole"
    );
    let sandbox = env.get("/api/sandboxes/again", Some(&token)).await.json();
    assert_eq!(sandbox["id"], new["id"]);
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(
        env.answer(upstream).await,
        "orders on feature/x in again\n",
        "the new instance runs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_away_during_a_delete_reuses_nothing_of_that_sandbox_when_its_name_returns() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    env.git.add_user("bob", "bobs password");
    let alice = env.login().await;
    let bob = env.login_as("bob", "bobs password").await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (old, d) = env.deploy(&alice, "shared", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let old_checkout = checkout_of(&env, "micro-0", &old);
    assert!(old_checkout.join("orders").exists());

    env.agents[0].stop();
    let deleted = delete(&env, &alice, "shared").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    // Bob takes the name while the agent is away: his first deployment has nowhere to go.
    let (new, first) = env.deploy(&bob, "shared", &["orders@main"]).await;
    assert_eq!(first["state"], "failed", "{first}");
    assert_ne!(new["id"], old["id"]);
    assert!(
        old_checkout.exists(),
        "the agent was away: alice's checkout is still there"
    );

    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    wait_until("what is left of alice's sandbox is removed", || {
        !old_checkout.exists()
    })
    .await;
    let d = env
        .redeploy_and_wait(&bob, "shared", &["orders@main"])
        .await;
    assert_eq!(d["state"], "ready", "{d}");
    // Fetched afresh for bob's sandbox, with his credentials, and nothing of alice's sandbox
    // taken over: the build is the agent's shared copy of that commit's build, which bob may
    // have since he could fetch the commit, never alice's checkout.
    assert_eq!(step_state(&d, "fetching"), "done", "{d}");
    assert_eq!(step_state(&d, "building"), "skipped", "{d}");
    let id = d["id"].as_str().unwrap();
    let log = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&bob))
        .await
        .body;
    assert!(
        log.contains("was built already by another sandbox"),
        "{log}"
    );
    assert!(!log.contains("not rebuilding"), "{log}");
    let checkouts = env.agent_work_dir("micro-0").join("checkouts");
    assert_eq!(entries(&checkouts), vec![new["id"].as_str().unwrap()]);
    let sandbox = env.get("/api/sandboxes/shared", Some(&bob)).await.json();
    assert_eq!(sandbox["owner"], "bob");
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(env.answer(upstream).await, "orders on main in shared\n");
}

/// A tmpfs mounted over a folder for as long as it lives.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs on {}", dir.display());
        SmallDisk(dir.to_owned())
    }

    /// Fills what is left of it with one file.
    fn fill(&self) -> PathBuf {
        let filler = self.0.join("filler");
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("cat /dev/zero > {}", filler.display()))
            .status();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_cannot_be_stored_fails_its_deployment_and_the_next_deployment_proceeds() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let disk = SmallDisk::mount(&env.server_data_dir().join("logs"), "256k");
    let filler = disk.fill();

    let (_, d) = env.deploy(&token, "full", &["orders@main"]).await;
    assert_eq!(d["state"], "failed", "{d}");
    let error = d["error"].as_str().unwrap();
    assert!(
        error.contains("its log could not be stored") && error.contains("No space left"),
        "{error}"
    );

    // The agent carried on and started the instance: its outcome came after the deployment
    // had failed, and is recorded all the same, as it is what runs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let sandbox = env.get("/api/sandboxes/full", Some(&token)).await.json();
        if let Some(upstream) = sandbox["services"][0]["upstream"].as_str() {
            assert_eq!(sandbox["services"][0]["state"], "running", "{sandbox}");
            assert_eq!(env.answer(upstream).await, "orders on main in full\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late outcome was never recorded: {sandbox}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    std::fs::remove_file(filler).unwrap();
    // The agent let the failed deployment's events go: its next deployment is not stuck
    // behind them.
    let d = env
        .redeploy_and_wait(&token, "full", &["orders@main"])
        .await;
    assert_eq!(d["state"], "ready", "{d}");
    let frames = env.log_frames(&token, d["id"].as_str().unwrap(), 1).await;
    assert_eq!(frames.last().unwrap()["type"], "end", "{frames:?}");
    let sandbox = env.get("/api/sandboxes/full", Some(&token)).await.json();
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(env.answer(upstream).await, "orders on main in full\n");
}

/// An HTTP server on loopback that answers every request with `body`: an instance that runs.
async fn instance(body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The upstreams of `sandbox` in the last route table the scripted gateway applied.
fn routed(env: &InProcessEnv, sandbox: &str) -> Option<Value> {
    let tables = env.script.jobs("routes");
    let table = tables.last()?;
    table["job"]["sandboxes"]
        .as_array()?
        .iter()
        .find(|s| s["sandbox"] == sandbox)
        .map(|s| s["upstreams"].clone())
}

/// A control plane in this process (agents silent past `agent_timeout` are gone) whose only
/// micro agent is a [`FakeAgent`] named `agent`, which does what the test says, and a
/// sandbox `name` whose first deploy job it has been sent (not answered).
struct Deploying {
    env: InProcessEnv,
    token: String,
    agent: FakeAgent,
    job: Value,
    deployment: String,
    sandbox_id: String,
}

async fn deploying(agent: &str, name: &str, agent_timeout: &'static str) -> Deploying {
    let mut env = InProcessEnv::builder()
        .gateway(true)
        .agent_timeout(agent_timeout)
        .start()
        .await;
    let token = env.login().await;
    // The scripted agent that accepted the login goes: the fake is the only one left.
    env.agents.clear();
    let mut agent = FakeAgent::connect(&env, agent).await;
    let created = env.create_sandbox(&token, name, &["orders@main"]).await;
    assert_eq!(created.status, 202, "{}", created.body);
    let job = agent.next_job("deploy").await;
    let deployment = job["job"]["deployment"].as_str().unwrap().to_owned();
    let sandbox_id = job["job"]["sandbox_id"].as_str().unwrap().to_owned();
    Deploying {
        env,
        token,
        agent,
        job,
        deployment,
        sandbox_id,
    }
}

/// An `events` frame holding a deployment's outcome, as its agent's first event.
fn outcome(deployment: &str, ok: bool, upstream: Option<&str>) -> String {
    let (error, services) = match upstream {
        Some(upstream) => (
            Value::Null,
            json!([{"service": "orders", "commit": null, "upstream": upstream}]),
        ),
        None => (json!("branch main has no commit"), json!([])),
    };
    json!({"type": "events", "events": [{
        "deployment": deployment, "seq": 1, "ts": "2026-12-01T12:00:00Z",
        "kind": "outcome", "ok": ok, "error": error, "services": services,
    }]})
    .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_silent_past_agent_timeout_mid_deploy_that_reports_later_is_routed_to_what_runs() {
    let Deploying {
        env,
        token,
        mut agent,
        job,
        deployment,
        sandbox_id,
    } = deploying("quiet", "late", "1s").await;
    agent.reply(&job, json!({"outcome": "accepted"})).await;

    // Silent: no heartbeat, nothing read. The control plane lets the connection go after
    // `agent_timeout`, and fails the deployment when the agent is not back after another.
    let d = env.wait_deployment(&token, &deployment).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["error"].as_str().unwrap().contains("quiet went offline"),
        "{d}"
    );
    drop(agent);

    // The agent comes back: it went on with the deployment meanwhile, and its new instance
    // runs (the previous one, if any, it has stopped).
    let upstream = instance("the late instance").await;
    let mut agent = FakeAgent::come_back(&env, "quiet", &[&deployment], &[&sandbox_id]).await;
    agent
        .send_text(&outcome(&deployment, true, Some(&upstream)))
        .await;
    let ack = loop {
        let frame = agent.next_json().await;
        if frame["type"] == "ack" {
            break frame;
        }
    };
    assert_eq!(ack["deployment"], deployment.as_str(), "{ack}");

    // What runs is recorded, and the gateways route to it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let sandbox = loop {
        let sandbox = env.get("/api/sandboxes/late", Some(&token)).await.json();
        if sandbox["services"][0]["upstream"] == upstream.as_str() {
            break sandbox;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the late outcome was never recorded: {sandbox}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(sandbox["services"][0]["state"], "running", "{sandbox}");
    wait_until(
        "the gateway routes the sandbox to its running instance",
        || routed(&env, "late").is_some_and(|u| u["orders"] == upstream.as_str()),
    )
    .await;
    assert_eq!(env.answer(&upstream).await, "the late instance");
    // The deployment stays failed: it did not end as asked, only what runs is recorded.
    let d = env
        .get(&format!("/api/deployments/{deployment}"), Some(&token))
        .await
        .json();
    assert_eq!(d["state"], "failed", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_outcome_of_a_sandbox_that_ended_meanwhile_has_its_instances_removed() {
    let Deploying {
        env,
        token,
        mut agent,
        job,
        deployment,
        sandbox_id,
    } = deploying("quiet", "gone", "1s").await;
    agent.reply(&job, json!({"outcome": "accepted"})).await;
    let d = env.wait_deployment(&token, &deployment).await;
    assert_eq!(d["state"], "failed", "{d}");
    drop(agent);
    let tables = env.script.jobs("routes").len();
    let deleted = delete(&env, &token, "gone").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    // The delete's own teardown goes once the routes are without the sandbox, and finds the
    // agent away; only then does it come back.
    wait_until("the routes drop the sandbox", || {
        env.script.jobs("routes").len() > tables && routed(&env, "gone").is_none()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // It held nothing of the sandbox when it said hello (its fetch was still going), then
    // started an instance and says so.
    let mut agent = FakeAgent::come_back(&env, "quiet", &[&deployment], &[]).await;
    agent
        .send_text(&outcome(&deployment, true, Some("127.0.0.1:9")))
        .await;
    // The sandbox has ended: the agent is told to remove everything of it, by id.
    let teardown = agent.next_job("teardown").await;
    assert_eq!(
        teardown["job"]["sandbox_id"],
        sandbox_id.as_str(),
        "{teardown}"
    );
    let sandbox = env.get("/api/sandboxes/gone", Some(&token)).await.json();
    assert_eq!(sandbox["state"], "deleted", "{sandbox}");
    assert!(sandbox["services"][0]["upstream"].is_null(), "{sandbox}");
    assert!(routed(&env, "gone").is_none());
}

/// The frames an agent is sent within `within`.
async fn frames_for(agent: &mut FakeAgent, within: std::time::Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    let _ = tokio::time::timeout(within, async {
        loop {
            frames.push(agent.next_json().await);
        }
    })
    .await;
    frames
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outcome_that_comes_before_the_deploy_jobs_answer_tears_nothing_down() {
    let Deploying {
        env,
        token,
        mut agent,
        job,
        deployment,
        ..
    } = deploying("hasty", "hasty", "10s").await;
    // The agent's events and its answer to the job travel apart: here the failure is first.
    agent.send_text(&outcome(&deployment, false, None)).await;
    let d = env.wait_deployment(&token, &deployment).await;
    assert_eq!(d["state"], "failed", "{d}");
    agent.reply(&job, json!({"outcome": "accepted"})).await;
    let frames = frames_for(&mut agent, std::time::Duration::from_secs(1)).await;
    assert!(
        !frames
            .iter()
            .any(|f| f["type"] == "job" && f["job"]["name"] == "teardown"),
        "a live sandbox was torn down: {frames:?}"
    );
    let sandbox = env.get("/api/sandboxes/hasty", Some(&token)).await.json();
    assert_eq!(sandbox["state"], "failed", "{sandbox}");
    let d = env
        .get(&format!("/api/deployments/{deployment}"), Some(&token))
        .await
        .json();
    assert_eq!(d["agent"], "hasty", "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_job_whose_answer_was_lost_is_torn_down_on_the_agent_that_took_it() {
    let Deploying {
        env,
        token,
        agent,
        deployment,
        sandbox_id,
        ..
    } = deploying("cut-off", "cut", "10s").await;
    // The connection drops before the answer: the agent may well be running the job.
    drop(agent);
    let d = env.wait_deployment(&token, &deployment).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert!(
        d["error"].as_str().unwrap().contains("cut-off"),
        "the error names the agent: {d}"
    );

    let mut agent = FakeAgent::come_back(&env, "cut-off", &[&deployment], &[&sandbox_id]).await;
    let deleted = delete(&env, &token, "cut").await;
    assert_eq!(deleted.status, 202, "{}", deleted.body);
    let teardown = agent.next_job("teardown").await;
    assert_eq!(
        teardown["job"]["sandbox_id"],
        sandbox_id.as_str(),
        "{teardown}"
    );
}
