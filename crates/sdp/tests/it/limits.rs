//! No user can exhaust the control plane's host (SPEC §6): login floods, logs past their cap,
//! a nearly full disk, viewers that stop reading, connections that never send a request, and
//! the data directory's path. Each test carries out the flood or the fault for real.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use sdp_testkit::{AGENT_TOKEN, Api, InProcessEnv, Proc, Reply, TestEnv, USER};

use crate::{SDP, run_sdp as sdp};

/// How the notice of a cut log begins.
const CUT_NOTICE: &str = "the log was cut here";

/// Starts the gateway agent and one micro agent, and waits for both.
async fn start_agents(env: &mut TestEnv) {
    env.start_gateway();
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.micro.push("micro-0".into());
    env.wait_for_agents(1).await;
}

/// A catalog entry whose build prints `lines` lines, then serves `/` with Python's own HTTP
/// server: a deployment that is loud, quick to build, and ends `ready`.
fn loud_service(env: &TestEnv, name: &str, lines: u32) -> String {
    format!(
        "[[services]]\nname = \"{name}\"\nrepo = \"{}\"\nbuild = \"seq -f 'line %g of a loud build' 1 {lines}\"\nrun = \"exec python3 -m http.server $PORT --bind 127.0.0.1\"\nport = 8080\nhealth = \"/\"\nroutes = [\"/{name}\"]\n",
        env.git.url("payments")
    )
}

/// `POST /api/login` as if from `address`, through a trusted proxy (the test itself).
async fn login_from(env: &TestEnv, address: &str, user: &str, password: &str) -> Reply {
    let response = env
        .http
        .post(format!("{}/api/login", env.url))
        .header("x-forwarded-for", address)
        .json(&json!({"username": user, "password": password}))
        .send()
        .await
        .unwrap();
    Reply::from(response).await
}

/// Checks every answer of a flood (401 for a wrong password, or 429 with `Retry-After` and a
/// message naming `refused_for`), and returns how many were not refused.
fn let_through(replies: &[Reply], refused_for: &str) -> usize {
    for reply in replies {
        match reply.status {
            401 => assert_eq!(reply.error_code(), "invalid_credentials"),
            429 => {
                assert_eq!(reply.error_code(), "too_many_logins");
                let retry_after: u64 = reply.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(retry_after >= 1, "{retry_after}");
                let message = reply.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                assert!(
                    message.contains(refused_for) && message.contains("try again in"),
                    "{message}"
                );
            }
            other => panic!("a flooded login answered {other}: {}", reply.body),
        }
    }
    replies.iter().filter(|r| r.status != 429).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_flood_gets_429s_before_reaching_git_and_another_user_still_logs_in() {
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    // The test is the proxy: its X-Forwarded-For gives each request its client address.
    env.restart_server_with("trusted_proxies = [\"127.0.0.1/32\"]", "");
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    env.git.add_user("bob", "bob's own password");
    let probes_before = env.git.contacts("probe");

    let started = Instant::now();
    // One user from one address, and 80 users from another, all at once.
    let guesses: Vec<String> = (0..60).map(|i| format!("guess {i}")).collect();
    let names: Vec<String> = (0..80).map(|i| format!("user{i}")).collect();
    let one_user = join_all(
        guesses
            .iter()
            .map(|guess| login_from(&env, "203.0.113.1", USER, guess)),
    );
    let many_users = join_all(
        names
            .iter()
            .map(|name| login_from(&env, "203.0.113.2", name, "guess")),
    );
    let (one_user, many_users) = tokio::join!(one_user, many_users);
    let elapsed = started.elapsed().as_secs() as usize;

    // The limits in the README: 5 attempts per user at once, then one every 12 s; 20 per
    // address at once, then one every 3 s. However slow this machine, no more got through
    // than the time taken allows.
    let alice_through = let_through(&one_user, USER);
    assert!(
        (5..=5 + elapsed / 12).contains(&alice_through),
        "{alice_through} of alice's attempts got through in {elapsed}s"
    );
    let names_through = let_through(&many_users, "from your address");
    assert!(
        (20..=20 + elapsed / 3).contains(&names_through),
        "{names_through} attempts of one address got through in {elapsed}s"
    );
    // Only the attempts let through reached git.
    assert_eq!(
        env.git.contacts("probe") - probes_before,
        alice_through + names_through
    );

    // Another user from another address is not held up by either flood.
    let bob = login_from(&env, "198.51.100.9", "bob", "bob's own password").await;
    assert_eq!(bob.status, 200, "{}", bob.body);
    assert_eq!(
        env.git.contacts("probe") - probes_before,
        alice_through + names_through + 1
    );
    assert_eq!(env.count_rows("sessions"), 1);
}

/// Everything the server sends on `conn` until it closes it; fails if it stays open.
async fn read_until_closed(what: &str, mut conn: tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("the {what} connection was still open after 30s"))
        .unwrap_or_else(|e| panic!("the {what} connection failed: {e}"));
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_send_half_a_request_head_or_nothing_or_idle_or_no_body_are_closed() {
    let env = InProcessEnv::builder()
        .no_agents()
        .server_keys("http_header_timeout = \"1s\"")
        .start()
        .await;
    let addr = env.url.trim_start_matches("http://").to_owned();

    let mut half = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half.write_all(b"GET /api/health HTTP/1.1\r\nHost: sdp\r\nX-Slow: ")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /api/health HTTP/1.1\r\nHost: sdp\r\n\r\n")
        .await
        .unwrap();
    // A whole head announcing a body that never comes.
    let mut bodiless = tokio::net::TcpStream::connect(&addr).await.unwrap();
    bodiless
        .write_all(b"POST /api/login HTTP/1.1\r\nHost: sdp\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();

    let half = read_until_closed("half a head", half).await;
    assert!(!half.contains(" 200 "), "{half}");
    let silent = read_until_closed("silent", silent).await;
    assert!(!silent.contains(" 200 "), "{silent}");
    // Answered, then closed as idle rather than kept alive for ever.
    let idle = read_until_closed("idle keep-alive", idle).await;
    assert!(idle.starts_with("HTTP/1.1 200 "), "{idle}");
    let bodiless = read_until_closed("a body announced and never sent", bodiless).await;
    assert!(!bodiless.contains(" 200 "), "{bodiless}");
    // The server itself is fine. Asked on a new connection: the kit's client may hold one
    // from the start that the server has just closed as idle (after 1 s here), and a request
    // sent on it as it closes is reset.
    assert_eq!(Api::new(&env.url).health().await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_that_prints_past_max_log_size_is_cut_with_a_notice_and_still_ends_ready() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["payments"])
        .no_agents()
        .start()
        .await;
    let loud = loud_service(&env, "loud", 20_000);
    // A header timeout far shorter than the deployment: upgraded connections (the agents',
    // the viewers') are not bound by it.
    env.restart_server_with(
        "max_log_size = \"256KiB\"\nhttp_header_timeout = \"1s\"",
        &loud,
    );
    start_agents(&mut env).await;
    let token = env.login().await;
    let reply = env.create_sandbox(&token, "loud", &["loud@main"]).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let live_viewer = {
        let api = Api::new(&env.url);
        let (token, id) = (token.clone(), id.clone());
        tokio::spawn(async move { api.log_frames(&token, &id, 1).await })
    };
    let d = env.wait_deployment(&token, &id).await;
    assert_eq!(d["state"], "ready", "{d}");

    // About 2.5 MB of output; the file holds the cap, the notice, the steps and the end.
    let path = env.server_data_dir().join("logs").join(format!("{id}.log"));
    let size = std::fs::metadata(&path).unwrap().len();
    let cap = 256 * 1024;
    assert!(size > cap - 8192 && size < cap + 8192, "{size} bytes");
    let file = std::fs::read_to_string(&path).unwrap();
    assert_eq!(file.matches(CUT_NOTICE).count(), 1);
    assert!(file.contains("max_log_size (256KiB)"));

    let text = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&token))
        .await;
    assert_eq!(text.status, 200, "{}", text.body);
    assert!(text.body.contains("line 1 of a loud build"));
    assert!(!text.body.contains("line 20000 of a loud build"));
    assert_eq!(text.body.matches(CUT_NOTICE).count(), 1);
    assert!(
        text.body.trim_end().ends_with("deployment ready"),
        "{}",
        &text.body[text.body.len().saturating_sub(500)..]
    );

    // The viewer that watched it live and one that came after see the same.
    for frames in [
        live_viewer.await.unwrap(),
        env.log_frames(&token, &id, 1).await,
    ] {
        let notice = frames
            .iter()
            .position(|f| {
                f["line"]
                    .as_str()
                    .is_some_and(|l| l.starts_with(CUT_NOTICE))
            })
            .expect("the cut notice");
        let last = frames.last().unwrap();
        assert_eq!(
            (&last["type"], &last["state"]),
            (&json!("end"), &json!("ready"))
        );
        // After the notice no output, but the steps to the end.
        let after: Vec<&Value> = frames[notice + 1..].iter().collect();
        assert!(after.iter().all(|f| f["stream"] != "stdout"), "{after:?}");
        let steps: Vec<(&str, &str)> = after
            .iter()
            .filter(|f| f["type"] == "step")
            .map(|f| (f["step"].as_str().unwrap(), f["state"].as_str().unwrap()))
            .collect();
        for step in [
            ("starting", "running"),
            ("healthy", "done"),
            ("routing", "done"),
        ] {
            assert!(steps.contains(&step), "{step:?} not in {steps:?}");
        }
        let seqs: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    }
    // The instance serves: the cut cost the deployment nothing.
    let sandbox = env.get("/api/sandboxes/loud", Some(&token)).await.json();
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert!(!env.answer(upstream).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_viewer_that_stops_reading_is_dropped_after_the_write_timeout() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["payments"])
        .no_agents()
        .start()
        .await;
    let flood = loud_service(&env, "flood", 150_000);
    env.restart_server_with("http_write_timeout = \"2s\"", &flood);
    start_agents(&mut env).await;
    let token = env.login().await;
    let (_, d) = env.deploy(&token, "flood", &["flood@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let id = d["id"].as_str().unwrap();
    // Far more than the kernel buffers between the two ends can hold (4 MiB at most here).
    let path = env.server_data_dir().join("logs").join(format!("{id}.log"));
    assert!(std::fs::metadata(&path).unwrap().len() > 12 << 20);

    // A viewer with a small receive buffer that never reads a frame.
    let addr: std::net::SocketAddr = env.url.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut req = format!("ws://{addr}/ws/deployments/{id}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (_viewer, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();

    let server = env.server.as_mut().unwrap();
    let line = server.wait_for_line("the stalled viewer dropped", |l| {
        l.contains("log viewer left") && l.contains("took in nothing for 2s")
    });
    assert!(line.contains(id), "{line}");
    // Others still get the whole log.
    let frames = env.log_frames(&token, id, 149_000).await;
    assert_eq!(frames.last().unwrap()["state"], "ready");
}

/// The free space of the file system of `dir`, in bytes, as `df` sees it.
fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_less_free_disk_than_min_free_space_deployments_are_refused_and_nothing_is_recorded() {
    let mut env = InProcessEnv::builder().start().await;
    let token = env.login().await;
    // A sandbox made while there was room (its deployment fails at once: no agent left).
    env.agents.clear();
    env.wait_for_agents(0).await;
    let reply = env
        .create_sandbox(&token, "roomy", &["payments@main"])
        .await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let id = reply.json()["deployment"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.wait_deployment(&token, &id).await;

    // Now the disk has less free space than the server wants kept free.
    let wanted = free_bytes(&env.server_data_dir()) * 2 + (1 << 30);
    env.restart_server_with(&format!("min_free_space = \"{wanted}\""), "")
        .await;
    env.connect_micro("micro-0");
    env.wait_for_agents(1).await;
    let token = env.login().await;
    let counts = |env: &InProcessEnv| {
        ["sandboxes", "deployments", "audit"].map(|table| env.count_rows(table))
    };
    let before = counts(&env);

    let created = env
        .create_sandbox(&token, "cramped", &["payments@main"])
        .await;
    let redeployed = env.redeploy(&token, "roomy", &["payments@main"]).await;
    for reply in [created, redeployed] {
        assert_eq!(reply.status, 507, "{}", reply.body);
        assert_eq!(reply.error_code(), "insufficient_storage");
        assert!(reply.body.contains("min_free_space"), "{}", reply.body);
    }
    assert_eq!(counts(&env), before);
    assert_eq!(
        env.get("/api/sandboxes/cramped", Some(&token)).await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relative_data_dir_is_resolved_once_against_the_directory_the_server_starts_in() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("run");
    std::fs::create_dir(&cwd).unwrap();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"../data\"\n[git]\nprobe_repo = \"http://127.0.0.1:9/probe.git\"\n",
    )
    .unwrap();
    let mut cmd = Command::new(SDP);
    cmd.args(["--log-format", "json", "server", "--config"])
        .arg(&config)
        .current_dir(&cwd)
        .env("SDP_AGENT_TOKEN", AGENT_TOKEN);
    let mut server = Proc::spawn("server", cmd);
    let line = server.wait_for_line("listening", |l| l.contains("\"listening\""));
    let logged: Value = serde_json::from_str(&line).unwrap();
    let data_dir = PathBuf::from(logged["data_dir"].as_str().unwrap());
    let expected = dir.path().canonicalize().unwrap().join("data");
    // Absolute and resolved whole: no `..` through the working directory.
    assert_eq!(data_dir, expected, "{line}");
    assert!(expected.join("sdp.db").is_file());
    assert!(expected.join("logs").is_dir());
    assert_eq!(std::fs::read_dir(&cwd).unwrap().count(), 0);
    server.stop();
}

#[test]
fn the_limits_show_in_config_print_and_take_sdp_variables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    std::fs::write(
        &path,
        "max_log_size = 1048576\n[git]\nprobe_repo = \"https://git.example.com/p.git\"\n",
    )
    .unwrap();
    let print = |env: &[(&str, &str)]| {
        let (code, out, err) = sdp(
            &["config", "print", "--config", path.to_str().unwrap()],
            env,
        );
        assert_eq!(code, 0, "{err}");
        out
    };
    let defaults = print(&[("SDP_AGENT_TOKEN", "x")]);
    for line in [
        "trusted_proxies = []",
        "max_log_size = \"1MiB\"",
        "min_free_space = \"1GiB\"",
        "http_header_timeout = \"10s\"",
        "http_write_timeout = \"30s\"",
    ] {
        assert!(defaults.contains(line), "{line} not in\n{defaults}");
    }
    let overridden = print(&[
        ("SDP_AGENT_TOKEN", "x"),
        ("SDP_TRUSTED_PROXIES", "[\"127.0.0.1/32\", \"10.0.0.0/8\"]"),
        ("SDP_MAX_LOG_SIZE", "512KiB"),
        ("SDP_MIN_FREE_SPACE", "0"),
        ("SDP_HTTP_HEADER_TIMEOUT", "5s"),
        ("SDP_HTTP_WRITE_TIMEOUT", "1m"),
    ]);
    for line in [
        "\"127.0.0.1/32\"",
        "\"10.0.0.0/8\"",
        "max_log_size = \"512KiB\"",
        "min_free_space = \"0\"",
        "http_header_timeout = \"5s\"",
        "http_write_timeout = \"1m\"",
    ] {
        assert!(overridden.contains(line), "{line} not in\n{overridden}");
    }
}

#[test]
fn nonsense_limits_stop_the_server_with_status_2_and_a_message_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.toml");
    for (line, key) in [
        ("max_log_size = \"64MB\"", "max_log_size"),
        ("max_log_size = \"1KiB\"", "max_log_size"),
        ("max_log_size = -5", "max_log_size"),
        ("min_free_space = \"lots\"", "min_free_space"),
        ("trusted_proxies = [\"10.0.0.0/33\"]", "trusted_proxies"),
        ("trusted_proxies = [\"nginx\"]", "trusted_proxies"),
        ("http_header_timeout = \"0s\"", "http_header_timeout"),
        ("http_write_timeout = \"soon\"", "http_write_timeout"),
    ] {
        std::fs::write(
            &path,
            format!(
                "{line}\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[git]\nprobe_repo = \"https://git.example.com/p.git\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let (code, _, err) = sdp(
            &["server", "--config", path.to_str().unwrap()],
            &[("SDP_AGENT_TOKEN", "x")],
        );
        assert_eq!(code, 2, "{line}: {err}");
        assert!(err.contains(key), "{line}: {err}");
    }
}
