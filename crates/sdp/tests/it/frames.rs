//! Frames stay under the size limit whatever they carry: build output made of bytes JSON
//! escapes six-fold, and lists longer than a frame.

use std::io::Write;
use std::process::{Command, Stdio};

use sdp_testkit::git_server::run_git;
use sdp_testkit::{AGENT_TOKEN, TestEnv};

use crate::SDP;

/// A build that prints 4 MB of NUL bytes (3 MB of them on one line) and 2 MB of ESC bytes
/// (half in lines of 1,000, half on one line), then builds nothing: the service is the `sdp`
/// binary's demo service.
const NOISE: &str = r#"head -c 3000000 /dev/zero
echo
head -c 1000000 /dev/zero >&2
esc=$(head -c 1000 /dev/zero | tr '\0' '\033')
i=0
while [ $i -lt 1000 ]; do printf '%s\n' "$esc"; i=$((i+1)); done
i=0
while [ $i -lt 1000 ]; do printf '%s' "$esc"; i=$((i+1)); done
echo
echo "noise done"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_build_printing_megabytes_of_nul_and_escape_bytes_ends_ready_without_the_agent_dropping()
{
    let mut env = TestEnv::builder(SDP).no_agents().start().await;
    env.git.create_repo_with("noisy", &["main"], |_| {
        vec![
            ("noise.sh".into(), NOISE.into()),
            ("message.txt".into(), "noisy\n".into()),
        ]
    });
    let noisy = format!(
        "[[services]]\nname = \"noisy\"\nrepo = \"{}\"\nbuild = \"sh noise.sh\"\nrun = \"{} demo-service\"\nport = 8080\nhealth = \"/healthz\"\nroutes = [\"/noisy\"]\nbaseline = \"http://127.0.0.1:9\"\n",
        env.git.url("noisy"),
        SDP
    );
    env.restart_server_with("", &noisy);
    env.start_gateway();
    env.start_agent("micro-0", "micro", AGENT_TOKEN);
    env.wait_for_agents(1).await;
    let token = env.login().await;

    let (_, deployment) = env.deploy(&token, "noisy", &["noisy@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");

    // Every byte made it into the log, in lines the frames could carry.
    let log = env
        .get(
            &format!(
                "/api/deployments/{}/logs",
                deployment["id"].as_str().unwrap()
            ),
            Some(&token),
        )
        .await;
    assert_eq!(log.status, 200);
    let count = |byte: u8| log.body.bytes().filter(|b| *b == byte).count();
    assert_eq!(count(0), 4_000_000);
    assert_eq!(count(0x1b), 2_000_000);
    assert!(log.body.contains("noise done"));

    // One connection all along: the control plane never dropped the agent for a frame.
    let agent = env
        .agents
        .iter()
        .find(|p| p.label == "agent micro-0")
        .unwrap()
        .log_text();
    assert_eq!(
        agent.matches("connected to the control plane").count(),
        1,
        "{agent}"
    );
    assert!(!agent.contains("not connected to the control plane"));
    let server = env.server.as_ref().unwrap().log_text();
    assert!(!server.contains("unreadable frame"), "{server}");
}

/// A name of about 200 bytes, as some teams' branch names are.
fn long_name(i: usize) -> String {
    let mut name = format!("feature/{i:05}-");
    while name.len() < 200 {
        name.push_str("a-rather-long-description-");
    }
    name
}

#[tokio::test(flavor = "multi_thread")]
async fn all_20000_branches_of_a_repository_are_listed_with_their_commits() {
    let env = TestEnv::builder(SDP)
        .repos(&["payments"])
        .job_timeout("60s")
        .start()
        .await;
    let repo = env.git.repo_path("payments");
    // Four tips, so that each branch's commit is checked, not one for all.
    let mut commits = Vec::new();
    for i in 0..4 {
        let out = Command::new("git")
            .current_dir(&repo)
            .args([
                "-c",
                "user.name=Test",
                "-c",
                "user.email=test@example.invalid",
                "commit-tree",
                "main^{tree}",
                "-p",
                "main",
                "-m",
                &format!("tip {i}"),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        commits.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
    }
    let mut refs = String::new();
    for i in 0..20_000 {
        let name = match i % 4 {
            0 => long_name(i),
            _ => format!("b/{i:05}"),
        };
        refs.push_str(&format!("create refs/heads/{name} {}\n", commits[i % 4]));
    }
    let mut update = Command::new("git")
        .current_dir(&repo)
        .args(["update-ref", "--stdin"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    update
        .stdin
        .take()
        .unwrap()
        .write_all(refs.as_bytes())
        .unwrap();
    assert!(update.wait().unwrap().success());
    run_git(&repo, &["pack-refs", "--all"]);

    let token = env.login().await;
    let listed = env.branches("payments", &token).await;
    let expected = env.git.heads("payments");
    // main, and the 20,000.
    assert_eq!(expected.len(), 20_001);
    assert_eq!(listed.len(), expected.len());
    assert_eq!(listed, expected);
    let server = env.server.as_ref().unwrap().log_text();
    assert!(!server.contains("unreadable frame"), "{server}");
}
