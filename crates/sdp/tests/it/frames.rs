//! Frames stay under the size limit whatever they carry: lists longer than a frame.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::harness::git_server::run_git;
use crate::harness::{Options, TestEnv};

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
    let env = TestEnv::start(Options {
        job_timeout: "60s",
        ..Options::default()
    })
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
