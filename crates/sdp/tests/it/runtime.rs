//! Running instances after `ready`: they outlive their agent.

use std::time::Duration;

use sdp_testkit::{AGENT_TOKEN, TestEnv, wait_until};

use crate::SDP;

/// The `tick` lines in an instance's stdout file.
fn ticks(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter(|l| l.starts_with("tick ")).count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_keeps_serving_and_printing_while_its_agent_restarts() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "chat", &["talker@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let upstream = sandbox["services"][0]["upstream"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(env.answer(&upstream).await, "talker on chat\n");
    let output = env
        .agent_work_dir("micro-0")
        .join("run")
        .join(sandbox["id"].as_str().unwrap())
        .join("talker.stdout.log");

    // The agent goes away while the instance prints a line every 20 ms: with its output on a
    // pipe to the agent, its next line would end it.
    env.agents[0].stop();
    let before = ticks(&output);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        ticks(&output) > before,
        "the instance went on printing without its agent"
    );
    assert_eq!(env.answer(&upstream).await, "talker on chat\n");

    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    let during = ticks(&output);
    wait_until("the instance prints on after the agent is back", || {
        ticks(&output) > during + 10
    })
    .await;
    assert_eq!(env.answer(&upstream).await, "talker on chat\n");
    let after = env.get("/api/sandboxes/chat", Some(&token)).await.json();
    assert_eq!(after["state"], "ready", "{after}");
    assert_eq!(after["services"][0]["upstream"], upstream.as_str());
}
