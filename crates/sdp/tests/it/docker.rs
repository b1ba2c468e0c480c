//! The deploy pipeline with the Docker runtime, against this machine's real Docker Engine:
//! the Go service is built on the host and runs in a container of an image made offline.

use std::process::Command;

use sdp_testkit::{
    AGENT_TOKEN, EnvBuilder, TestEnv, docker_available, docker_image, docker_inspect, run_as_ids,
    step_state, wait_until,
};

use crate::SDP;

/// The docker runtime, with the Go services' repository.
fn docker_env() -> EnvBuilder {
    TestEnv::builder(SDP).repos(&["orders"]).runtime("docker")
}

/// A sandbox name no other test on this engine uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_branch_runs_in_a_labelled_limited_container_and_teardown_removes_everything() {
    if !docker_available() {
        return;
    }
    let env = docker_env().gateway(true).start().await;
    let canary = format!("canary-{:032x}", rand::random::<u128>());
    env.git.add_user("dora", &canary);
    let token = env.login_as("dora", &canary).await.json()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let name = unique("dock");
    let (sandbox, deployment) = env.deploy(&token, &name, &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let upstream = sandbox["services"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        env.answer(&upstream).await,
        format!("orders on feature/x in {name}\n")
    );

    let agent = &env.micro[0];
    let sandbox_id = sandbox["id"].as_str().unwrap();
    let container_name = format!("sdp_{sandbox_id}_orders_{agent}");
    let network_name = format!("sdp_{sandbox_id}_{agent}");
    let container = docker_inspect(&container_name).expect("the container exists");
    let labels = &container["Config"]["Labels"];
    assert_eq!(labels["sdp.sandbox"], sandbox_id);
    assert_eq!(labels["sdp.sandbox_name"], name.as_str());
    assert_eq!(labels["sdp.service"], "orders");
    assert_eq!(labels["sdp.deployment"], deployment["id"]);
    let host = &container["HostConfig"];
    assert_eq!(host["Memory"], 256 << 20);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["PidsLimit"], 128);
    assert_eq!(host["NetworkMode"], network_name.as_str());
    // User code's user, no capabilities, no way to gain privileges.
    assert_eq!(container["Config"]["User"], run_as_ids(), "{container}");
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]));
    assert_eq!(
        host["SecurityOpt"],
        serde_json::json!(["no-new-privileges"])
    );
    let mount = &container["Mounts"][0];
    assert_eq!(mount["Destination"], "/src");
    assert_eq!(mount["RW"], false);
    assert_eq!(container["Config"]["WorkingDir"], "/src");
    let env_vars: Vec<&str> = container["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for expected in ["PORT=8080", "SDP_SERVICE=orders", "GREETING=hi"] {
        assert!(
            env_vars.contains(&expected),
            "{expected} missing from {env_vars:?}"
        );
    }
    assert!(env_vars.contains(&format!("SDP_SANDBOX={name}").as_str()));
    assert!(
        docker_inspect(&network_name).is_some(),
        "the sandbox's network exists"
    );

    let id = deployment["id"].as_str().unwrap();
    let text = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&token))
        .await
        .body;
    assert!(
        text.contains("[orders/stdout] orders listening on 8080"),
        "{text}"
    );
    assert!(
        text.contains("[orders/stderr] orders says hello on stderr"),
        "{text}"
    );

    let frames = env.log_frames(&token, id, 1).await;
    let seqs: Vec<u64> = frames.iter().map(|f| f["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(frames.last().unwrap()["type"], "end");

    // The same commit again: no rebuild, a new container.
    let again = env
        .redeploy_and_wait(&token, &name, &["orders@feature/x"])
        .await;
    assert_eq!(again["state"], "ready", "{again}");
    assert_eq!(step_state(&again, "building"), "skipped", "{again}");
    let container = docker_inspect(&container_name).expect("the new container exists");
    assert_eq!(container["Config"]["Labels"]["sdp.deployment"], again["id"]);

    let reply = env
        .http
        .delete(format!("{}/api/sandboxes/{name}", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    let checkout = env
        .agent_work_dir(&env.micro[0])
        .join("checkouts")
        .join(sandbox_id);
    wait_until("the container is removed", || {
        docker_inspect(&container_name).is_none()
    })
    .await;
    wait_until("the network is removed", || {
        docker_inspect(&network_name).is_none()
    })
    .await;
    wait_until("the checkout is deleted", || !checkout.exists()).await;
    env.assert_secret_nowhere(&canary);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unhealthy_container_fails_at_starting_and_is_removed() {
    if !docker_available() {
        return;
    }
    let env = docker_env().health_timeout("3s").start().await;
    let token = env.login().await;
    let name = unique("sick");
    let (sandbox, deployment) = env.deploy(&token, &name, &["orders@unhealthy"]).await;
    assert_eq!(deployment["state"], "failed", "{deployment}");
    assert_eq!(deployment["services"][0]["step"], "starting");
    let container_name = format!(
        "sdp_{}_orders_{}",
        sandbox["id"].as_str().unwrap(),
        env.micro[0]
    );
    wait_until("the container is removed", || {
        docker_inspect(&container_name).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_finds_its_containers_at_start_and_leftovers_of_ended_sandboxes_are_removed() {
    if !docker_available() {
        return;
    }
    let mut env = docker_env().no_agents().start().await;
    let agent = format!("dock-{:08x}-0", rand::random::<u32>());
    env.micro.push(agent.clone());
    // A container this agent started in an earlier life, of a sandbox no longer known.
    let ghost = format!("sbx_{:016x}", rand::random::<u64>());
    let image = docker_image();
    let out = Command::new("docker")
        .args(["run", "-d", "--name", &format!("sdp-{ghost}-orders")])
        .args(["--label", &format!("sdp.sandbox={ghost}")])
        .args(["--label", "sdp.service=orders"])
        .args(["--label", &format!("sdp.agent={agent}")])
        .args([image, "sleep", "600"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    env.start_agent(&agent, "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    wait_until("the leftover container is removed", || {
        docker_inspect(&format!("sdp-{ghost}-orders")).is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_of_two_services_starts_both_containers_side_by_side_on_its_one_network() {
    if !docker_available() {
        return;
    }
    let env = TestEnv::builder(SDP)
        .repos(&["orders", "billing"])
        .runtime("docker")
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let name = unique("pair");
    let (sandbox, deployment) = env
        .deploy(&token, &name, &["orders@main", "billing@main"])
        .await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    let sandbox_id = sandbox["id"].as_str().unwrap();
    let agent = &env.micro[0];
    let network_name = format!("sdp_{sandbox_id}_{agent}");
    let networks = Command::new("docker")
        .args(["network", "ls", "--quiet", "--filter"])
        .arg(format!("name=^{network_name}$"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&networks.stdout).lines().count(),
        1,
        "one network for the sandbox"
    );
    for service in ["orders", "billing"] {
        let container = docker_inspect(&format!("sdp_{sandbox_id}_{service}_{agent}"))
            .expect("the container exists");
        assert_eq!(
            container["HostConfig"]["NetworkMode"],
            network_name.as_str()
        );
        let entry = sandbox["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"] == service)
            .unwrap();
        let answer = env.answer(entry["upstream"].as_str().unwrap()).await;
        assert_eq!(answer, format!("{service} on main in {name}\n"));
    }
    let reply = env.delete_sandbox(&token, &name).await;
    assert!(reply.status < 300, "{} {}", reply.status, reply.body);
    wait_until("the sandbox's containers are gone", || {
        docker_inspect(&format!("sdp_{sandbox_id}_orders_{agent}")).is_none()
            && docker_inspect(&format!("sdp_{sandbox_id}_billing_{agent}")).is_none()
    })
    .await;
}
