//! `[docker] image_archive`: deploy hosts have no registry, so a micro agent loads its base
//! image from a tarball of `docker save` when the engine lacks it, at its start and again when
//! a deploy finds it gone. The archives here are made offline, from the kit's busybox image.

use std::path::Path;
use std::process::Command;

use sdp_testkit::{
    AGENT_TOKEN, TestEnv, docker_available, docker_image, docker_inspect, run_as_line,
};

use crate::{SDP, run_sdp};

/// `docker` with `args`, which must succeed.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_image(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .output()
        .unwrap()
        .status
        .success()
}

/// A tag of the test's own, removed from the engine however the test ends (the image stays
/// under the kit's own tag: removing a second tag only untags).
struct OwnTag(String);

impl OwnTag {
    fn new(prefix: &str) -> OwnTag {
        OwnTag(format!("sdp-it-{prefix}-{:08x}:1", rand::random::<u32>()))
    }

    /// The kit's busybox image under this tag, saved to `archive`; then the tag is removed,
    /// so the engine lacks it.
    fn save_to(&self, archive: &Path) {
        docker(&["tag", docker_image(), &self.0]);
        docker(&["save", "-o", archive.to_str().unwrap(), &self.0]);
        docker(&["rmi", &self.0]);
        assert!(!has_image(&self.0));
    }
}

impl Drop for OwnTag {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_loads_its_image_from_the_archive_at_start_and_when_a_deploy_finds_it_gone() {
    if !docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("busybox.tar");
    let tag = OwnTag::new("archive");
    tag.save_to(&archive);

    let env = TestEnv::builder(SDP)
        .repos(&["orders"])
        .runtime("docker")
        .gateway(true)
        .docker_image(&tag.0)
        .docker_extra(&format!("image_archive = \"{}\"", archive.display()))
        .start()
        .await;
    assert!(has_image(&tag.0), "the agent loaded the archive at start");

    docker(&["rmi", &tag.0]);
    let token = env.login().await;
    let name = format!("arch-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (sandbox, deployment) = env.deploy(&token, &name, &["orders@feature/x"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    assert!(has_image(&tag.0), "the deploy loaded the archive again");
    let container = format!(
        "sdp_{}_orders_{}",
        sandbox["id"].as_str().unwrap(),
        env.micro[0]
    );
    let inspected = docker_inspect(&container).expect("the container exists");
    assert_eq!(inspected["Config"]["Image"], tag.0.as_str());
    let upstream = sandbox["services"][0]["upstream"].as_str().unwrap();
    assert_eq!(
        env.answer(upstream).await,
        format!("orders on feature/x in {name}\n")
    );

    let loads = env.agents[0].log_text().matches("\"image loaded\"").count();
    assert_eq!(loads, 2, "one load at start, one by the deploy");
    let reply = env.delete_sandbox(&token, &name).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
}

/// An agent config of the docker runtime with `[docker]` keys `docker`; it dials a port
/// nobody listens on, as it must stop before dialling.
fn write_agent_config(dir: &Path, docker: &str) -> String {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "server = \"ws://127.0.0.1:9/ws/agent\"\nrole = \"micro\"\nname = \"offline\"\nwork_dir = \"{}\"\nruntime = \"docker\"\n{}\n[docker]\n{docker}\n",
            dir.join("work").display(),
            run_as_line()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn an_archive_that_is_missing_or_not_a_file_is_refused_at_start_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    // Searchable by the `run_as` user, so that only the archive is wrong.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let missing = dir.path().join("alpine-3.20.tar");
    let folder = dir.path().join("images");
    std::fs::create_dir(&folder).unwrap();
    for archive in [&missing, &folder] {
        let config = write_agent_config(
            dir.path(),
            &format!("image_archive = \"{}\"", archive.display()),
        );
        let (status, _, stderr) = run_sdp(
            &["agent", "--config", &config],
            &[("SDP_TOKEN", AGENT_TOKEN)],
        );
        assert_eq!(status, 2, "{stderr}");
        assert!(
            stderr.contains("docker.image_archive") && stderr.contains(archive.to_str().unwrap()),
            "{stderr}"
        );
    }
}

#[test]
fn an_archive_without_the_configured_image_stops_the_agent_naming_both() {
    if !docker_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let archive = dir.path().join("other.tar");
    let other = OwnTag::new("other");
    other.save_to(&archive);
    let wanted = format!("sdp-it-wanted-{:08x}:1", rand::random::<u32>());
    let config = write_agent_config(
        dir.path(),
        &format!(
            "image = \"{wanted}\"\nimage_archive = \"{}\"",
            archive.display()
        ),
    );
    let (status, _, stderr) = run_sdp(
        &["agent", "--config", &config],
        &[("SDP_TOKEN", AGENT_TOKEN)],
    );
    assert_eq!(status, 2, "{stderr}");
    assert!(
        stderr.contains(archive.to_str().unwrap())
            && stderr.contains(&wanted)
            && stderr.contains(&other.0),
        "the refusal names the archive, the image wanted and what it holds: {stderr}"
    );
}
