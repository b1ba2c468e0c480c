//! Isolation on a shared host: one user's code (its build, what its build leaves running) never
//! reaches another user's password or the agent token, whatever it plants where git might
//! look. The attacks run for real, as the `run_as` user, against the real agent.

use std::path::{Path, PathBuf};
use std::process::Command;

use sdp_testkit::{
    AGENT_TOKEN, RUN_AS, Reply, TestEnv, USER, docker_available, ensure_run_as_user, wait_until,
};

use crate::SDP;

/// A branch's build that attacks whoever deploys after it: it plants config, hooks and
/// helpers wherever git could read them (its `HOME`, every git config and hooks folder it can
/// reach, the agent's folders), then leaves a process behind that copies every process
/// environment and command line it can read, and fails. Whatever ran a planted hook or helper
/// writes its environment to `$L/ran`.
const HOSTILE_BUILD: &str = r#"
L=/tmp/sdp-loot-$SDP_SANDBOX
mkdir -p "$L/hooks"
for h in fsmonitor filter ssh askpass credential upload pre-commit post-checkout post-merge \
         reference-transaction pre-auto-gc post-index-change; do
  printf '#!/bin/sh\nenv >> %s/ran\ncat /proc/$$/environ >> %s/ran 2>/dev/null\nexit 0\n' "$L" "$L" > "$L/hooks/$h"
  chmod 755 "$L/hooks/$h"
done
cfg="[core]
	hooksPath = $L/hooks
	fsmonitor = $L/hooks/fsmonitor
	sshCommand = $L/hooks/ssh
	askPass = $L/hooks/askpass
[credential]
	helper = $L/hooks/credential
[filter \"evil\"]
	smudge = $L/hooks/filter
	process = $L/hooks/filter
[uploadpack]
	packObjectsHook = $L/hooks/upload"
printf '%s\n' "$cfg" > "$HOME/.gitconfig" && echo home >> "$L/planted"
printf '* filter=evil\n' > .gitattributes
mkdir -p .git/hooks && printf '%s\n' "$cfg" > .git/config && cp "$L/hooks/post-checkout" .git/hooks/
top=$(cd ../../../.. && pwd)
for f in $(find "$top" /tmp -name config -path '*.git*' 2>/dev/null) "$top"/*/git/home/.gitconfig "$top"/*/home/.gitconfig; do
  printf '%s\n' "$cfg" >> "$f" 2>/dev/null && echo "$f" >> "$L/planted"
done
for d in $(find "$top" /tmp -type d -name hooks 2>/dev/null) "$top"/*/git/mirrors/*/hooks; do
  for h in post-checkout reference-transaction pre-auto-gc; do
    cp "$L/hooks/$h" "$d/$h" 2>/dev/null && echo "$d/$h" >> "$L/planted"
  done
done
end=$(( $(date +%s) + 180 ))
nohup setsid sh -c "while [ \$(date +%s) -lt $end ]; do
  cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ >> $L/scan 2>/dev/null
  sleep 0.01
done" >/dev/null 2>&1 &
# Out of the build's process group (which ends with the build) before the build ends.
while [ ! -s "$L/scan" ]; do sleep 0.05; done
echo "hostile build done"
exit 1
"#;

/// What the hostile build left: its loot folder and its process, both removed on drop.
struct Loot(PathBuf);

impl Loot {
    fn of(sandbox: &str) -> Loot {
        Loot(PathBuf::from(format!("/tmp/sdp-loot-{sandbox}")))
    }

    fn read(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.0.join(name)).unwrap_or_default()).into_owned()
    }

    fn scan_len(&self) -> u64 {
        std::fs::metadata(self.0.join("scan")).map_or(0, |m| m.len())
    }
}

impl Loot {
    /// Ends the process the build left.
    fn stop(&self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.0.display().to_string()])
            .status();
    }
}

impl Drop for Loot {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files under `dirs` that the `run_as` user can read and that hold one of `needles`, as
/// that user's own `grep` finds them. Every file is named to grep one by one (a folder that
/// user may not list still holds files it may read by name), and the needles go to grep in a
/// file of that user's, not on its command line, which every process (a hostile scanner too)
/// can read.
fn readable_by_user_code(dirs: &[&Path], needles: &[&str]) -> Vec<String> {
    let patterns_dir = tempfile::tempdir().unwrap();
    let patterns = patterns_dir.path().join("patterns");
    std::fs::write(&patterns, needles.join("\n")).unwrap();
    let (uid, gid) = run_as_uid_gid();
    for path in [patterns_dir.path(), patterns.as_path()] {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| d.to_path_buf()).collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    let mut list = Vec::new();
    for file in &files {
        list.extend_from_slice(file.as_os_str().as_encoded_bytes());
        list.push(0);
    }
    let mut grep = Command::new("setpriv")
        .args([
            &format!("--reuid={RUN_AS}"),
            &format!("--regid={RUN_AS}"),
            "--clear-groups",
            "xargs",
            "-0",
            "grep",
            "-l",
            "-F",
            "-s",
            "-f",
        ])
        .arg(&patterns)
        .arg("--")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("grep runs");
    use std::io::Write;
    grep.stdin.take().unwrap().write_all(&list).unwrap();
    let out = grep.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Where `needles` occur in `text`, with what surrounds them, for a failure message.
fn around(text: &str, needles: &[&str]) -> String {
    let mut out = String::new();
    for needle in needles {
        for (at, _) in text.match_indices(needle).take(3) {
            let window = &text.as_bytes()[at.saturating_sub(300)..(at + 300).min(text.len())];
            let window = String::from_utf8_lossy(window);
            out.push_str(&format!("{needle} in: {window:?}\n"));
        }
    }
    out
}

fn token_of(reply: &Reply) -> String {
    reply.json()["token"].as_str().unwrap().to_owned()
}

async fn hostile_code_never_sees_another_users_password_or_the_agent_token(runtime: &'static str) {
    if !can_switch_users() {
        return;
    }
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .runtime(runtime)
        .start()
        .await;
    env.git.create_repo_with("hostile", &["main"], |_| {
        vec![("hostile.sh".into(), HOSTILE_BUILD.into())]
    });
    env.git.add_user("bob", "bobs own password");
    let canary = format!("canary-{:032x}", rand::random::<u128>());
    env.git.add_user("ann", &canary);

    // Bob's branch attacks first.
    let bob = token_of(&env.login_as("bob", "bobs own password").await);
    let evil = format!("evil-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let loot = Loot::of(&evil);
    let (_, d) = env.deploy(&bob, &evil, &["hostile@main"]).await;
    assert_eq!(d["state"], "failed", "{d}");
    let id = d["id"].as_str().unwrap();
    let log = env
        .get(&format!("/api/deployments/{id}/logs"), Some(&bob))
        .await
        .body;
    assert!(log.contains("hostile build done"), "{log}");
    assert!(
        loot.read("planted").contains("home"),
        "the build planted its git config in its HOME"
    );
    wait_until("the hostile build's scanner runs", || loot.scan_len() > 0).await;

    // Then Ann logs in, lists branches and deploys, on the same agent.
    let ann = token_of(&env.login_as("ann", &canary).await);
    for _ in 0..10 {
        assert!(!env.branches("orders", &ann).await.is_empty());
    }
    let (sandbox, d) = env.deploy(&ann, "anns", &["orders@feature/x"]).await;
    assert_eq!(d["state"], "ready", "{d}");
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(env.answer(upstream).await, "orders on feature/x in anns\n");
    // A second deploy of a new commit fetches again into the mirror the build tried to reach.
    env.git.push_change("orders", "feature/x", "again\n");
    let again = env
        .redeploy_and_wait(&ann, "anns", &["orders@feature/x"])
        .await;
    assert_eq!(again["state"], "ready", "{again}");
    // One more sweep of the scanner after all of it.
    let seen = loot.scan_len();
    wait_until("the scanner sweeps again", || loot.scan_len() > seen).await;

    loot.stop();

    // Nothing the build planted ran, in git or anywhere else.
    assert!(
        !loot.0.join("ran").exists(),
        "a planted hook or helper ran: {}",
        loot.read("ran")
    );
    // The scanner was watching while Ann's git ran, so its silence means something.
    let scan = loot.read("scan");
    assert!(
        scan.contains("ls-remote") || scan.contains("remote-http"),
        "the scanner never saw git run"
    );
    let dirs = [env.dir.path(), loot.0.as_path()];
    // The search reaches what user code can read: Ann's own checkout, by name.
    let control = readable_by_user_code(&dirs, &["orders on"]);
    assert!(
        control.iter().any(|f| f.contains(&format!(
            "/checkouts/{}/orders/",
            sandbox["id"].as_str().unwrap()
        ))),
        "the search as run_as read nothing of Ann's checkout: {control:?}"
    );
    let found = readable_by_user_code(&dirs, &[&canary, AGENT_TOKEN]);
    assert!(
        found.is_empty(),
        "user code can read Ann's password or the agent token in: {found:?}\n{}",
        around(&scan, &[&canary, AGENT_TOKEN])
    );
    // git's own files never took the planted config.
    let work_dir = env.agent_work_dir(&env.micro[0]);
    let loot_path = loot.0.display().to_string();
    for entry in std::fs::read_dir(work_dir.join("git/mirrors"))
        .unwrap()
        .flatten()
    {
        let config = std::fs::read_to_string(entry.path().join("config")).unwrap();
        assert!(!config.contains(&loot_path), "{config}");
    }
    env.assert_secret_nowhere(&canary);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_build_reaches_no_other_users_password_or_the_agent_token_with_processes() {
    hostile_code_never_sees_another_users_password_or_the_agent_token("process").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_build_reaches_no_other_users_password_or_the_agent_token_with_docker() {
    if !docker_available() {
        return;
    }
    hostile_code_never_sees_another_users_password_or_the_agent_token("docker").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_access_to_a_repository_is_refused_even_when_its_mirror_is_on_disk() {
    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .gateway(true)
        .start()
        .await;
    let alice = env.login().await;
    let (_, d) = env.deploy(&alice, "first", &["orders@feature/x"]).await;
    assert_eq!(d["state"], "ready", "{d}");

    env.git.add_user("carol", "carols password");
    env.git.grant_only("orders", &[USER]);
    let carol = token_of(&env.login_as("carol", "carols password").await);
    let reply = env.get("/api/services/orders/branches", Some(&carol)).await;
    assert!(reply.status >= 400, "{} {}", reply.status, reply.body);
    let (sandbox, d) = env.deploy(&carol, "second", &["orders@feature/x"]).await;
    assert_eq!(d["state"], "failed", "{d}");
    assert_eq!(d["services"][0]["step"], "fetching", "{d}");
    let checkout = env
        .agent_work_dir(&env.micro[0])
        .join("checkouts")
        .join(sandbox["id"].as_str().unwrap())
        .join("orders");
    assert!(!checkout.exists(), "nothing of the mirror reached carol");
}

/// Writes an agent config for `sdp agent` with `extra` keys, to a server nobody runs.
fn agent_config(dir: &Path, extra: &str) -> PathBuf {
    agent_config_in(dir, &dir.join("work"), extra)
}

/// Like [`agent_config`], with `work_dir` given.
fn agent_config_in(dir: &Path, work_dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"ws://127.0.0.1:9/ws/agent\"\nrole = \"micro\"\nname = \"lonely\"\nwork_dir = \"{}\"\nruntime = \"process\"\n{extra}",
            work_dir.display()
        ),
    )
    .unwrap();
    path
}

fn run_agent_briefly(config: &Path) -> (Option<i32>, String) {
    let child = Command::new("timeout")
        .args(["3", SDP, "agent", "--config"])
        .arg(config)
        .env("SDP_TOKEN", AGENT_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_root_agent_without_run_as_refuses_to_start_and_says_why() {
    if !can_switch_users() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_agent_briefly(&agent_config(dir.path(), ""));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("run_as"), "{stderr}");
    assert!(stderr.contains("allow_root_builds"), "{stderr}");

    let (code, stderr) = run_agent_briefly(&agent_config(
        dir.path(),
        "run_as = \"no-such-user-here\"\n",
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    // Allowed, it starts (and keeps trying to reach its server until `timeout` ends it).
    let (code, stderr) = run_agent_briefly(&agent_config(dir.path(), "allow_root_builds = true\n"));
    assert_eq!(code, Some(124), "{stderr}");
    assert!(stderr.contains("allow_root_builds"), "{stderr}");
}

#[test]
fn a_root_agent_refuses_a_work_dir_that_user_code_owns_or_could_replace() {
    if !can_switch_users() {
        return;
    }
    ensure_run_as_user();
    let (uid, gid) = run_as_uid_gid();
    let run_as = format!("run_as = \"{RUN_AS}\"\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();

    // As after an agent that ran as that user: its git folder, with whatever it planted.
    let work = dir.path().join("work");
    std::fs::create_dir_all(work.join("git/mirrors")).unwrap();
    for d in [work.join("git"), work.join("git/mirrors")] {
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
    }
    let (code, stderr) = run_agent_briefly(&agent_config(dir.path(), &run_as));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("is not a folder of the agent's own"),
        "{stderr}"
    );

    // A work_dir in a folder user code may write in: it could swap work_dir for its own.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(uid), Some(gid)).unwrap();
    let config = agent_config_in(dir.path(), &theirs.join("work"), &run_as);
    let (code, stderr) = run_agent_briefly(&config);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("could replace work_dir"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_environment_is_closed_even_to_code_of_its_own_user() {
    if !can_switch_users() {
        return;
    }
    ensure_run_as_user();
    // An agent that runs as the same user as user code (as `sdp dev` does): its token is in
    // its environment. A token of its own: the hostile tests look for the shared one, and
    // this agent is readable until it has made itself non-dumpable.
    let token = format!("own-token-{:032x}", rand::random::<u128>());
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (uid, gid) = run_as_uid_gid();
    for d in [dir.path(), work.as_path()] {
        std::os::unix::fs::chown(d, Some(uid), Some(gid)).unwrap();
    }
    let config = agent_config(dir.path(), "");
    let mut agent = Command::new("setpriv")
        .args([
            &format!("--reuid={RUN_AS}"),
            &format!("--regid={RUN_AS}"),
            "--clear-groups",
            SDP,
            "agent",
            "--config",
        ])
        .arg(&config)
        .env("SDP_TOKEN", &token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = agent.id();
    let limits = format!("/proc/{pid}/limits");
    // Soft and hard limit 0 (a soft limit of 0 is common by default; the hard one is not).
    wait_until("the agent has switched core dumps off", || {
        std::fs::read_to_string(&limits).is_ok_and(|l| {
            l.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                line.starts_with("Max core file size") && fields[4..6] == ["0", "0"]
            })
        })
    })
    .await;
    let read = Command::new("setpriv")
        .args([
            &format!("--reuid={RUN_AS}"),
            &format!("--regid={RUN_AS}"),
            "--clear-groups",
            "cat",
            &format!("/proc/{pid}/environ"),
        ])
        .output()
        .unwrap();
    // Still running when its environment was read: the refusal was not a process gone.
    let running = agent.try_wait().unwrap().is_none();
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(running, "the agent ended before the test could read it");
    assert!(
        !read.status.success(),
        "code of the agent's user read its environment"
    );
    assert!(
        !String::from_utf8_lossy(&read.stdout).contains(&token),
        "the token leaked"
    );
}

/// Whether these tests can run: only a root agent switches users. Without root they are
/// skipped, saying so, except in CI (`CI=true`), where a skip would hide that nothing was
/// proved.
fn can_switch_users() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the isolation tests need root (a second user, setuid) and CI runs as root"
    );
    eprintln!("skipped: user code runs as another user only under a root agent");
    false
}

fn run_as_uid_gid() -> (u32, u32) {
    let user = nix::unistd::User::from_name(RUN_AS).unwrap().unwrap();
    (user.uid.as_raw(), user.gid.as_raw())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_run_by_a_plain_user_checks_passwords_and_deploys_with_real_git_auth() {
    if !can_switch_users() {
        return;
    }
    ensure_run_as_user();
    let mut env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .no_agents()
        .start()
        .await;
    env.start_gateway();
    env.start_unprivileged_agent("plain");
    env.micro.push("plain".to_owned());
    env.wait_for_agents(1).await;
    // git asks the askpass helper (the agent's own binary) for the password: it must reach
    // it although the agent is not dumpable.
    let refused = env.login_as(USER, "wrong").await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let token = env.login().await;
    assert!(!env.branches("orders", &token).await.is_empty());
    let (_, d) = env.deploy(&token, "plain", &["orders@main"]).await;
    assert_eq!(d["state"], "ready", "{d}");
}
