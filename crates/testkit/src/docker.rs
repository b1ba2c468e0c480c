//! The real Docker Engine in tests: an image made offline, whether an engine answers, what
//! it says of a container, and removing what an agent left.

use std::process::{Command, Stdio};

use serde_json::Value;

/// The image docker tests run services in, made offline: Debian's static busybox in an
/// otherwise empty root filesystem, imported once per machine. When no engine answers, docker
/// tests are skipped, except in CI (`CI=true`), where that is a failure.
pub fn docker_image() -> &'static str {
    // 2: with tar, rm and mkdir, which the kubernetes runtime's pods fetch their checkouts
    // with.
    const TAG: &str = "sdp-test/busybox:2";
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    READY.get_or_init(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", TAG])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if present {
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
        for applet in [
            "sh", "ls", "cat", "echo", "env", "sleep", "wget", "ps", "id", "tar", "rm", "mkdir",
        ] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
        std::fs::create_dir_all(root.path().join("tmp")).unwrap();
        let script = format!(
            "tar -C '{}' -c . | docker import - {TAG}",
            root.path().display()
        );
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        assert!(
            out.status.success(),
            "docker import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    TAG
}

/// Whether docker tests can run; in CI a missing engine fails the test instead.
pub fn docker_available() -> bool {
    let answers = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !answers {
        assert!(
            std::env::var("CI").is_err(),
            "no Docker Engine answers, and docker tests may not be skipped in CI"
        );
        eprintln!("skipping: no Docker Engine answers");
    }
    answers
}

/// Removes the containers and networks agent `name` left.
pub fn docker_cleanup(name: &str) {
    let script = format!(
        "docker ps -aq --filter label=sdp.agent={name} | xargs -r docker rm -f >/dev/null; \
         docker network ls -q --filter label=sdp.agent={name} | xargs -r docker network rm >/dev/null"
    );
    let _ = Command::new("sh").args(["-c", &script]).status();
}

/// What `docker inspect` says of `what`, as JSON.
pub fn docker_inspect(what: &str) -> Option<Value> {
    let out = Command::new("docker")
        .args(["inspect", what])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    list.get(0).cloned()
}
