//! The lifecycle across processes: a sandbox is known by its id everywhere, so a name can be
//! reused at once; an agent that was away catches up; a log that cannot be stored fails its
//! deployment and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::harness::{AGENT_TOKEN, Options, Reply, TestEnv, step_state, wait_until};

async fn delete(env: &TestEnv, token: &str, name: &str) -> Reply {
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
    let env = TestEnv::start(Options::default()).await;
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
    let mut env = TestEnv::start(Options::default()).await;
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
    // Fetched and built afresh for bob's sandbox, not taken over from alice's.
    assert_eq!(step_state(&d, "fetching"), "done", "{d}");
    assert_eq!(step_state(&d, "building"), "done", "{d}");
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
    let env = TestEnv::start(Options::default()).await;
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
