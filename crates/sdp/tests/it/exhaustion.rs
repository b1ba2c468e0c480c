//! No user can exhaust or upset an agent's host: git processes are capped, cancelled
//! deployments leak nothing, teardown never signals a process that is not the instance's, and
//! a relative `work_dir` works as an absolute one.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use sdp_testkit::{TestEnv, docker_available, docker_inspect, wait_until};

use crate::SDP;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The logs (deployments' and runtime logs) `pid` holds open.
fn open_logs(pid: u32) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| target.extension().is_some_and(|e| e == "log"))
        .collect()
}

/// The agent's process: the last agent the environment started.
fn agent_pid(env: &TestEnv) -> u32 {
    env.agents.last().expect("a micro agent").pid()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_cancelled_deployments_leak_no_file_descriptor() {
    // A gateway too: each delete publishes routes before its teardown, which lets the
    // deployments get further before they are cancelled.
    let env = TestEnv::builder(SDP)
        .repos(&["stuck", "payments"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let pid = agent_pid(&env);
    // Half hang in their fetch (the git server never answers `stuck`) and are cancelled
    // there, with git's pipes open; the other half are cancelled wherever they are, fetching,
    // building or starting.
    let cycle = |i: usize| {
        let (env, token) = (&env, &token);
        async move {
            let name = format!("cancel-{i}");
            let service = if i.is_multiple_of(2) {
                "stuck@main"
            } else {
                "payments@main"
            };
            let reply = env.create_sandbox(token, &name, &[service]).await;
            assert_eq!(reply.status, 202, "{}", reply.body);
            let reply = env
                .http
                .delete(format!("{}/api/sandboxes/{name}", env.url))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(reply.status(), 202);
        }
    };
    for i in 0..10 {
        cycle(i).await;
    }
    let settled = || async {
        // Every teardown done: the agent has no checkout left.
        let checkouts = env.agent_work_dir("micro-0").join("checkouts");
        wait_until("every sandbox is torn down on the agent", || {
            std::fs::read_dir(&checkouts).is_ok_and(|d| d.count() == 0)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    settled().await;
    let before = open_fds(pid);
    let server = env.server.as_ref().expect("the control plane").pid();

    let next = AtomicUsize::new(10);
    let workers = (0..8).map(|_| async {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= 1010 {
                break;
            }
            cycle(i).await;
        }
    });
    futures_util::future::join_all(workers).await;
    settled().await;
    // Teardowns answer before every task of a cancelled deployment has let go: give them
    // a moment, but no more than that.
    let mut after = open_fds(pid);
    for _ in 0..100 {
        if after <= before + 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = open_fds(pid);
    }
    eprintln!("the agent's open file descriptors: {before} before, {after} after");
    // Every one of those deployments has ended: the control plane keeps none of their logs
    // open, whatever the agent sent after its teardown.
    let mut logs = open_logs(server);
    for _ in 0..50 {
        if logs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        logs = open_logs(server);
    }
    assert!(
        logs.is_empty(),
        "the control plane holds {} logs of ended sandboxes open: {:?}\nthe first ends with:\n{}",
        logs.len(),
        &logs[..logs.len().min(5)],
        logs.first()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .map(|t| t.lines().rev().take(6).collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    );
    assert!(
        after <= before + 8,
        "the agent had {before} file descriptors open before 1,000 cancelled deployments and {after} after"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn git_processes_on_an_agent_never_exceed_max_git_jobs() {
    let env = TestEnv::builder(SDP)
        .repos(&["stuck"])
        .agent_extra("max_git_jobs = 2\n")
        .git_timeout("3s")
        .job_timeout("20s")
        .start()
        .await;
    let token = env.login().await;
    let stop = Arc::new(AtomicBool::new(false));
    // This test's own git server: other tests' agents may list their `stuck` at the same time.
    let url = env.git.url("stuck").into_bytes();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let ours = |cmdline: &std::path::Path| {
                std::fs::read(cmdline).is_ok_and(|c| {
                    c.starts_with(b"git\0ls-remote\0")
                        && c.windows(url.len()).any(|w| w == url.as_slice())
                })
            };
            // The most seen at once, and their /proc/<pid>/stat lines (for a failure report).
            let mut most = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let seen: Vec<_> = std::fs::read_dir("/proc")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| ours(&p.join("cmdline")))
                    .collect();
                // A sweep of /proc takes a while: a git seen early in it may have ended before
                // one seen late began. Those still there after the sweep all ran at its end.
                let alive: Vec<String> = seen
                    .iter()
                    .filter(|p| ours(&p.join("cmdline")))
                    .map(|p| std::fs::read_to_string(p.join("stat")).unwrap_or_default())
                    .collect();
                // git forks its transport helper: until the child has exec'd, it shows git's
                // command line. It is not another git command.
                let pids: Vec<&str> = alive.iter().map(|s| stat_field(s, 0)).collect();
                let running: Vec<String> = alive
                    .iter()
                    .filter(|s| !pids.contains(&stat_field(s, 2)))
                    .cloned()
                    .collect();
                if running.len() > most.0 {
                    most = (running.len(), running);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            most
        })
    };
    // Six branch lists of a repository whose server never answers: two run until git's
    // timeout, the others wait for a slot.
    let lists = (0..6).map(|_| env.get("/api/services/stuck/branches", Some(&token)));
    let replies = futures_util::future::join_all(lists).await;
    stop.store(true, Ordering::Relaxed);
    let (most, which) = sampler.join().unwrap();
    for reply in &replies {
        assert_eq!(reply.status, 504, "{}", reply.body);
    }
    assert!(
        most >= 1,
        "the sampler never saw git run, so it proves nothing"
    );
    assert!(most <= 2, "{most} git processes ran at once: {which:#?}");
}

/// Field `i` of a `/proc/<pid>/stat` line, counting the command name as none: 0 is the pid,
/// 1 the state, 2 the parent's pid.
fn stat_field(stat: &str, i: usize) -> &str {
    match i {
        0 => stat.split(' ').next().unwrap_or(""),
        _ => stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest.split(' ').nth(i).unwrap_or("")),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn teardown_never_signals_a_pid_that_another_process_holds_now() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let token = env.login().await;
    let (sandbox, d) = env.deploy(&token, "reused", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let pid_file = env
        .agent_work_dir("micro-0")
        .join("run")
        .join(sandbox["id"].as_str().unwrap())
        .join("orders.pid.json");
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pid_file).unwrap()).unwrap();
    let instance = record["pid"].as_i64().unwrap();
    assert!(record["start_time"].is_u64(), "{record}");
    // As after a crash of the instance and a reboot or a long uptime: its pid now belongs to
    // a process of someone else, leading a group of its own.
    let mut stranger = Command::new("sleep")
        .arg("600")
        .process_group(0)
        .spawn()
        .unwrap();
    record["pid"] = stranger.id().into();
    std::fs::write(&pid_file, record.to_string()).unwrap();

    let reply = env
        .http
        .delete(format!("{}/api/sandboxes/reused", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    wait_until("the pid file is gone", || !pid_file.exists()).await;
    let alive = stranger.try_wait().unwrap().is_none();
    let _ = stranger.kill();
    let _ = stranger.wait();
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{instance}")])
        .status();
    assert!(alive, "teardown killed a process that was not the instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relative_work_dir_deploys_with_docker_and_builds_with_go() {
    if !docker_available() {
        return;
    }
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .runtime("docker")
        .relative_work_dir()
        .start()
        .await;
    let token = env.login().await;
    let name = format!("rel-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (sandbox, d) = env.deploy(&token, &name, &["orders@feature/x"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(
        env.answer(upstream).await,
        format!("orders on feature/x in {name}\n")
    );
    let agent = &env.micro[0];
    let container = docker_inspect(&format!(
        "sdp_{}_orders_{agent}",
        sandbox["id"].as_str().unwrap()
    ))
    .expect("the container exists");
    let source = container["Mounts"][0]["Source"].as_str().unwrap();
    assert!(source.starts_with('/'), "{source}");
    // Go's caches went to the agent's folder, wherever the agent was started from.
    assert!(
        env.agent_work_dir(agent).join("cache/go-build").is_dir(),
        "GOCACHE is under work_dir"
    );
}

/// Deploys sandbox `name` of a `hostile` repository whose build is `script`, which fails
/// after printing `left <pid>` of a `sleep 600` it leaves behind; returns that pid.
async fn deploy_a_build_that_leaves(env: &TestEnv, token: &str, name: &str, script: &str) -> u32 {
    env.git.create_repo_with("hostile", &["main"], |_| {
        vec![("hostile.sh".into(), script.into())]
    });
    let (_, d) = env.deploy(token, name, &["hostile@main"]).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["services"][0]["step"], "building", "{d}");
    let id = d["id"].as_str().unwrap();
    let log = env
        .get(&format!("/api/deployments/{id}/logs"), Some(token))
        .await
        .body;
    log.lines()
        .find_map(|l| l.split("left ").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the build said which process it left: {log}"))
}

/// Whether `pid` is still the `sleep 600` a build left.
fn sleeping(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sleep\x00600"))
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_build_leaves_running_ends_with_it() {
    let env = TestEnv::builder(SDP).start().await;
    let token = env.login().await;
    // A process in the background, holding the build's output open.
    let script = "sleep 600 &\necho \"left $!\"\nexit 1\n";
    let pid = deploy_a_build_that_leaves(&env, &token, "leaver", script).await;
    wait_until("the process the build left is gone", || !sleeping(pid)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_build_left_outside_its_process_group_ends_at_teardown() {
    let env = TestEnv::builder(SDP).start().await;
    let token = env.login().await;
    // Out of the build's process group (its own session) before the build ends.
    let script = "nohup setsid sleep 600 >/dev/null 2>&1 &\necho \"left $!\"\nsleep 1\nexit 1\n";
    let pid = deploy_a_build_that_leaves(&env, &token, "escaper", script).await;
    assert!(
        sleeping(pid),
        "the process escaped the build's group and still runs"
    );
    let reply = env
        .http
        .delete(format!("{}/api/sandboxes/escaper", env.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 202);
    wait_until("teardown ends what the build left", || !sleeping(pid)).await;
}
