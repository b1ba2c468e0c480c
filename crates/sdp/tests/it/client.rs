//! The command line client (`sdp login`, `deploy`, `ls`, `status`, `logs`, `rm`…) as a
//! person or a CI job runs it: the real binary, against a real server and agents, with its
//! session in a config directory of the test's own.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sdp_testkit::{PASSWORD, TestEnv, USER, run_sdp, wait_until};
use serde_json::Value;

use crate::SDP;

/// The client of one person: their config directory, and the server they use.
struct Person {
    home: tempfile::TempDir,
    server: String,
}

impl Person {
    fn new(server: &str) -> Person {
        Person {
            home: tempfile::tempdir().unwrap(),
            server: server.to_owned(),
        }
    }

    fn config_dir(&self) -> PathBuf {
        self.home.path().join("config")
    }

    fn session_file(&self) -> PathBuf {
        self.config_dir().join("sdp").join("session.json")
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), self.home.path().display().to_string()),
            (
                "XDG_CONFIG_HOME".into(),
                self.config_dir().display().to_string(),
            ),
        ]
    }

    /// Runs `sdp args` with this person's config and `extra` variables.
    fn sdp(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let env = self.env();
        let mut all: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.extend_from_slice(extra);
        run_sdp(SDP, args, &all)
    }

    /// Runs `sdp args` and insists that it succeeds; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.sdp(args, &[]);
        assert_eq!(code, 0, "sdp {args:?} failed:\n{out}\n{err}");
        out
    }

    /// `program` with this person's config and none of the `SDP_*` variables of the shell.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SDP_")) {
            cmd.env_remove(k);
        }
        cmd.envs(self.env());
        cmd
    }

    /// Runs `sdp args` on a terminal (util-linux `script`), typing `typed` and a newline;
    /// its exit status and everything the terminal showed.
    fn at_terminal(&self, args: &[&str], typed: &str) -> (i32, String) {
        use std::io::Write;
        let command = std::iter::once(SDP)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = self
            .command("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The terminal keeps what is typed until the prompt reads it.
        writeln!(child.stdin.take().unwrap(), "{typed}").unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn login(&self) {
        let (code, out, err) = self.sdp(
            &["login", "--server", &self.server],
            &[("SDP_USERNAME", USER), ("SDP_PASSWORD", PASSWORD)],
        );
        assert_eq!(code, 0, "login failed:\n{out}\n{err}");
    }
}

/// The lines of `text` that say `line N of a steady build`, as their N.
fn steady_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.split("line ").nth(1)?;
            rest.strip_suffix(" of a steady build")?.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_developer_logs_in_deploys_lists_and_removes_from_the_command_line() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let me = Person::new(&env.url);

    // A wrong password is an authentication failure, and stores nothing.
    let (code, _, err) = me.sdp(
        &["login", "--server", &env.url],
        &[("SDP_USERNAME", USER), ("SDP_PASSWORD", "wrong")],
    );
    assert_eq!(code, 3, "{err}");
    assert!(!me.session_file().exists());

    me.login();
    let mode = std::fs::metadata(me.session_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the session file is for its owner only"
    );
    let stored = std::fs::read_to_string(me.session_file()).unwrap();
    assert!(!stored.contains(PASSWORD), "the password is never stored");

    let (code, out, err) = me.sdp(&["deploy", "feat", "orders@feature/x", "--follow"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("==> orders: building"),
        "the steps show:\n{out}"
    );
    assert!(
        out.contains("orders | building orders"),
        "the build's output shows:\n{out}"
    );
    assert!(out.contains("feat is ready: http://feat."), "{out}");

    let listed: Value = serde_json::from_str(&me.ok(&["ls", "--json"])).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "feat");
    assert_eq!(listed[0]["state"], "ready");
    assert_eq!(listed[0]["services"][0]["branch"], "feature/x");

    let status: Value = serde_json::from_str(&me.ok(&["status", "feat", "--json"])).unwrap();
    let commit = status["services"][0]["commit"].as_str().unwrap().to_owned();
    let human = me.ok(&["status", "feat"]);
    assert!(human.contains(&commit[..10]), "{human}");
    assert!(human.contains("running"), "{human}");
    let table = me.ok(&["ls"]);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("NAME") && header.contains("STATE"),
        "{table}"
    );
    assert!(
        !table.contains('\u{1b}'),
        "no colour when stdout is not a terminal:\n{table}"
    );

    // A build that fails: exit 1, and the step that failed is named.
    let (code, out, err) = me.sdp(&["deploy", "broken", "orders@broken", "--follow"], &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("at orders: building"), "{err}");

    // A branch that does not exist: exit 1 with the reason.
    let (code, _, err) = me.sdp(&["deploy", "ghost", "orders@no-such-branch", "-f"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no-such-branch"), "{err}");
    // A selection without a branch is bad usage, refused before anything is sent.
    let (code, _, err) = me.sdp(&["deploy", "nobranch", "orders"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("SERVICE@BRANCH"), "{err}");
    let (code, _, err) = me.sdp(&["deploy", "Bad_Name", "orders@main"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sandbox name"), "{err}");
    let (code, _, err) = me.sdp(&["deploy", "ok", "orders@bad..branch"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = me.sdp(&["status", "nobranch"], &[]);
    assert_eq!(code, 1, "nothing was created: {err}");

    // Redeploying one's own sandbox on another branch.
    let (code, out, err) = me.sdp(&["deploy", "feat", "orders@main", "-f"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let status: Value = serde_json::from_str(&me.ok(&["status", "feat", "--json"])).unwrap();
    assert_eq!(status["services"][0]["branch"], "main");

    // After a restart the server holds no password: without a terminal the client says to
    // log in again; with one, it asks for the password and goes on.
    env.restart_server_with("", "");
    env.wait_for_agents(1).await;
    let (code, _, err) = me.sdp(&["deploy", "feat", "orders@feature/x"], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("log in again: the server restarted"), "{err}");
    let (code, out) = me.at_terminal(&["deploy", "feat", "orders@feature/x", "-f"], PASSWORD);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("needs your password again"), "{out}");
    assert!(out.contains("feat is ready"), "{out}");

    me.ok(&["rm", "feat"]);
    let listed: Value = serde_json::from_str(&me.ok(&["ls", "--json"])).unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["name"] != "feat"),
        "{listed}"
    );

    me.ok(&["logout"]);
    assert!(!me.session_file().exists());
    let (code, _, err) = me.sdp(&["ls"], &[]);
    assert_eq!(code, 3, "logged out: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_followed_across_a_server_restart_misses_no_line_and_repeats_none() {
    let mut env = TestEnv::builder(SDP).repos(&["steady"]).start().await;
    let me = Person::new(&env.url);
    me.login();
    let accepted: Value =
        serde_json::from_str(&me.ok(&["deploy", "steady", "steady@main", "--json"])).unwrap();
    let id = accepted["deployment"]["id"].as_str().unwrap().to_owned();

    let out_path = me.home.path().join("follow.out");
    let err_path = me.home.path().join("follow.err");
    let mut follower = me
        .command(SDP)
        .args(["logs", &id, "-f"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let read = |path: &PathBuf| std::fs::read_to_string(path).unwrap_or_default();

    // The build prints 10,000 lines a second for 5 seconds: restart the server in the middle.
    wait_until("the follower shows the build's first lines", || {
        steady_numbers(&read(&out_path)).len() > 500
    })
    .await;
    env.restart_server_with("", "");

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never ended:\n{}",
            read(&err_path)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (out, err) = (read(&out_path), read(&err_path));
    assert!(
        err.contains("connection lost"),
        "the restart dropped the connection:\n{err}"
    );
    let numbers = steady_numbers(&out);
    let expected: Vec<u64> = (0..50_000).collect();
    if numbers != expected {
        let first_bad = numbers
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(numbers.len().min(expected.len()));
        panic!(
            "{} lines shown, the first wrong one at {first_bad}: {:?}\n{err}",
            numbers.len(),
            &numbers[first_bad.saturating_sub(3)..(first_bad + 3).min(numbers.len())]
        );
    }
    // The service's run command exits at once: the deployment fails, and so does the follower.
    assert_eq!(status.code(), Some(1), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_log_followed_across_a_server_restart_misses_no_tick_and_repeats_none() {
    let mut env = TestEnv::builder(SDP)
        .repos(&["talker"])
        .gateway(true)
        .start()
        .await;
    let me = Person::new(&env.url);
    me.login();
    me.ok(&["deploy", "chat", "talker@main", "--follow"]);
    let out_path = me.home.path().join("follow.out");
    let err_path = me.home.path().join("follow.err");
    let mut follower = me
        .command(SDP)
        .args(["logs", "chat", "-f", "--service", "talker"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // `talker | tick N`, a line every 20 ms.
    let ticks = || -> Vec<u64> {
        std::fs::read_to_string(&out_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("| tick ").nth(1)?.parse().ok())
            .collect()
    };
    wait_until("the follower shows ticks", || ticks().len() > 20).await;
    env.restart_server_with("", "");
    let before = ticks().len();
    wait_until("ticks after the restart", || ticks().len() > before + 200).await;
    follower.kill().unwrap();
    follower.wait().unwrap();
    let err = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        err.contains("connection lost"),
        "the restart dropped the connection:\n{err}"
    );
    let ticks = ticks();
    let first = ticks[0];
    let expected: Vec<u64> = (first..first + ticks.len() as u64).collect();
    assert_eq!(ticks, expected, "every tick once, in order");
}

#[test]
fn an_unreachable_server_is_exit_status_4_and_a_missing_session_is_3() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let me = Person::new(&url);
    let (code, _, err) = me.sdp(&["ls"], &[("SDP_SERVER", &url), ("SDP_TOKEN", "sdp_x")]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains(&url), "the message names the server: {err}");
    let (code, _, err) = me.sdp(
        &["login", "--server", &url],
        &[("SDP_USERNAME", USER), ("SDP_PASSWORD", PASSWORD)],
    );
    assert_eq!(code, 4, "{err}");
    let (code, _, err) = me.sdp(&["status", "x"], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("sdp login"), "{err}");
    let (code, _, err) = me.sdp(&["login"], &[]);
    assert_eq!(code, 2, "no server to log in to: {err}");
}

#[test]
fn completion_scripts_are_printed_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = run_sdp(SDP, &["completion", shell], &[]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("deploy") && out.contains("logs"),
            "{shell}: {out}"
        );
    }
    let (code, _, _) = run_sdp(SDP, &["completion", "tcsh"], &[]);
    assert_eq!(code, 2);
}
