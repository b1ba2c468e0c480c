use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;

use sdp_testkit::{AGENT_TOKEN, TestEnv, files_containing};

use crate::SDP;

/// Reads every process's command line until told to stop; returns the ones holding
/// `canary` and how many command lines of git's HTTP helper it saw (to show it looked while
/// git talked to the server).
pub fn sample_cmdlines(canary: Vec<u8>, stop: Arc<AtomicBool>) -> (Vec<String>, usize) {
    let mut hits = Vec::new();
    let mut git_seen = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            break;
        };
        for entry in entries.flatten() {
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline
                .windows(canary.len())
                .any(|w| w == canary.as_slice())
            {
                hits.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
            }
            if cmdline.windows(11).any(|w| w == b"remote-http") {
                git_seen += 1;
            }
        }
    }
    (hits, git_seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_password_appears_in_no_file_no_log_and_no_command_line() {
    // Everything at trace level, so that nothing logged at any level can hide it, and
    // directives naming the frame-tracing libraries' own modules, which must not lift their
    // cap.
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .no_agents()
        .log("trace,tungstenite::protocol=trace,tokio_tungstenite=trace,hyper::proto=trace,reqwest::connect=trace")
        .start()
        .await;
    let canary = format!("canary-{:032x}", rand::random::<u128>());
    let wrong = format!("canary-wrong-{:032x}", rand::random::<u128>());
    env.git.add_user("carol", &canary);
    // A credential helper in git's home would store what it is given: the agent must switch
    // it off.
    let home = env.agent_work_dir("micro-0").join("git").join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join(".gitconfig"), "[credential]\n\thelper = store\n").unwrap();
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (canary, stop) = (canary.clone().into_bytes(), stop.clone());
        std::thread::spawn(move || sample_cmdlines(canary, stop))
    };
    // Two rounds: four login attempts stay within one user's burst (five).
    for _ in 0..2 {
        let reply = env.login_as("carol", &canary).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let token = reply.json()["token"].as_str().unwrap().to_owned();
        let branches = env.get("/api/services/orders/branches", Some(&token)).await;
        assert_eq!(branches.status, 200, "{}", branches.body);
        let refused = env.login_as("carol", &wrong).await;
        assert_eq!(refused.status, 401, "{}", refused.body);
    }
    stop.store(true, Ordering::Relaxed);
    let (hits, git_seen) = sampler.join().unwrap();
    assert!(
        git_seen > 0,
        "the sampler never saw git run, so it proves nothing"
    );
    assert!(
        hits.is_empty(),
        "the password is on a command line: {hits:?}"
    );

    assert!(home.exists(), "git's home is where the test expects it");
    let basic = |password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("carol:{password}"))
    };
    let agent_token = AGENT_TOKEN.to_owned();
    for secret in [&canary, &wrong, &agent_token] {
        for form in [secret.clone(), basic(secret), hex::encode(secret)] {
            let files = files_containing(env.dir.path(), form.as_bytes());
            assert!(files.is_empty(), "{form} is in files: {files:?}");
            for proc in env.server.iter().chain(env.agents.iter()) {
                assert!(
                    !proc.log_text().contains(&form),
                    "{form} is in the log of {}",
                    proc.label
                );
            }
        }
    }
}
