//! The compose stack (`docker-compose.yml`) on this machine's engine, started with the
//! `docker-compose` Debian ships, from the images `scripts/images.sh` builds offline of the
//! static binary: log in, deploy a service, reach it through the router's published port,
//! then `down -v` leaves nothing of the project behind.
//!
//! The micro agent in the stack fetches from the test's git server (`git http-backend` behind
//! Basic auth, in this process), which containers on a compose network cannot reach on this
//! host's loopback. So the test lets compose create the project's network first (`up
//! --no-start`), binds the git server on that network's gateway, the host's own address on
//! it, and only then starts the containers: nothing listens beyond this host and the
//! project's own network, and nothing outside is contacted.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sdp_testkit::{Api, GitServer, PASSWORD, USER, docker_available, docker_cleanup, docker_image};

use crate::static_build::static_binary;

/// The tag the test builds the images under, apart from the version's an operator uses.
const TAG: &str = "sdp-it";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Whether Debian's `docker-compose` is installed; in CI its absence fails the test.
fn compose_available() -> bool {
    let there = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !there {
        let how = "no docker-compose: install Debian's (scripts/test.sh does)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{how}");
        eprintln!("skipping: {how}");
    }
    there
}

/// Runs `cmd`, which must succeed; on failure the panic shows what it printed.
fn succeed(mut cmd: Command) -> String {
    let out: Output = tokio::task::block_in_place(|| cmd.output())
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = || {
        format!(
            "{cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success(), "failed: {}", text());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command with none of the developer's `SDP_*` variables.
fn clean(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars() {
        if key.starts_with("SDP_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// The IPv4 networks this host routes or Docker has taken, as (address, prefix length).
fn networks_in_use() -> Vec<(u32, u32)> {
    let routes = succeed({
        let mut c = Command::new("ip");
        c.args(["-4", "route"]);
        c
    });
    let ids = succeed({
        let mut c = Command::new("docker");
        c.args(["network", "ls", "-q"]);
        c
    });
    let mut inspect = Command::new("docker");
    inspect.args([
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
    ]);
    inspect.args(ids.split_whitespace());
    let subnets = succeed(inspect);
    routes
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .chain(subnets.split_whitespace())
        .filter_map(|cidr| {
            let (ip, len) = cidr.split_once('/')?;
            Some((u32::from(ip.parse::<Ipv4Addr>().ok()?), len.parse().ok()?))
        })
        .collect()
}

/// A /24 of 172.16.0.0/12 that overlaps nothing in use; its first address is the host's.
fn free_subnet() -> (String, Ipv4Addr) {
    let used = networks_in_use();
    let mask = |len: u32| u32::MAX.checked_shl(32 - len).unwrap_or(0);
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    // The 4096 /24s of the block, from a random one on, so that tests meet less.
    let start = rand::random::<u32>() % 4096;
    (0..4096)
        .map(|i| base + (((start + i) % 4096) << 8))
        .find(|net| {
            !used.iter().any(|(addr, len)| {
                let shorter = mask((*len).min(24));
                addr & shorter == net & shorter
            })
        })
        .map(|net| {
            (
                format!("{}/24", Ipv4Addr::from(net)),
                Ipv4Addr::from(net + 1),
            )
        })
        .expect("a free /24 in 172.16.0.0/12")
}

/// One compose project: `docker-compose -p <project>` with the stack's settings in its
/// environment. Dropped, it brings the stack down and removes what its micro agent started,
/// printing the containers' logs first when the test failed.
struct Stack {
    project: String,
    micro: String,
    settings: Vec<(String, String)>,
    down: bool,
}

impl Stack {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = clean("docker-compose");
        cmd.arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(repo_root().join("docker-compose.yml"))
            .args(args)
            .envs(self.settings.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        succeed(self.command(args))
    }

    /// The host port `service`'s `port` is published on.
    fn port(&self, service: &str, port: u16) -> u16 {
        let published = self.run(&["port", service, &port.to_string()]);
        published
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{service}:{port} is not published: {published:?}"))
    }

    /// What Docker still holds of the project, by compose's own label.
    fn leftovers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.project);
        [
            vec!["ps", "-aq", "--filter", &label],
            vec!["network", "ls", "-q", "--filter", &label],
            vec!["volume", "ls", "-q", "--filter", &label],
        ]
        .iter()
        .flat_map(|args| {
            let mut cmd = Command::new("docker");
            cmd.args(args);
            let listed = succeed(cmd);
            listed
                .split_whitespace()
                .map(|id| format!("{} {id}", args[0]))
                .collect::<Vec<_>>()
        })
        .collect()
    }

    /// Sandbox containers and networks the micro agent left.
    fn sandboxes_left(&self) -> Vec<String> {
        let label = format!("label=sdp.agent={}", self.micro);
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "-aq", "--filter", &label]);
        let mut left: Vec<String> = succeed(cmd).split_whitespace().map(String::from).collect();
        let mut cmd = Command::new("docker");
        cmd.args(["network", "ls", "-q", "--filter", &label]);
        left.extend(succeed(cmd).split_whitespace().map(String::from));
        left
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Ok(out) = self.command(&["logs", "--no-color"]).output()
        {
            eprintln!(
                "==== docker-compose logs of {} ====\n{}{}",
                self.project,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !self.down {
            let _ = self.command(&["down", "-v", "-t", "5"]).output();
        }
        docker_cleanup(&self.micro);
    }
}

/// `GET /api/health` until it reports `n` agents; connections refused or reset while the
/// server starts are waited out.
async fn wait_for_agents(api: &Api, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::from("no answer");
    loop {
        if let Ok(resp) = api.http.get(format!("{}/api/health", api.url)).send().await
            && let Ok(body) = resp.text().await
        {
            if serde_json::from_str::<serde_json::Value>(&body)
                .is_ok_and(|h| h["agents"].as_u64() == Some(n))
            {
                return;
            }
            last = body;
        }
        assert!(
            Instant::now() < deadline,
            "the stack never had {n} agents: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_stack_deploys_a_service_reachable_through_its_router_and_leaves_nothing_when_down()
 {
    if !docker_available() || !compose_available() {
        return;
    }
    let Some(bin) = static_binary() else {
        return;
    };
    let mut images = clean(repo_root().join("scripts/images.sh").to_str().unwrap());
    images.arg(&bin).env("SDP_IMAGE_TAG", TAG);
    succeed(images);

    let dir = tempfile::tempdir().unwrap();
    let suffix = format!("{:08x}", rand::random::<u32>());
    let server_toml = dir.path().join("server.toml");
    // Mounted when the containers are made, written once the git server's address is known.
    std::fs::write(&server_toml, "").unwrap();
    let micro_work = dir.path().join("micro");
    let mut stack = Stack {
        project: format!("sdpit{suffix}"),
        micro: format!("cmp-{suffix}-micro"),
        settings: vec![
            (
                "SDP_AGENT_TOKEN".into(),
                format!("compose-{:032x}", rand::random::<u128>()),
            ),
            ("SDP_IMAGE_TAG".into(), TAG.into()),
            (
                "SDP_SERVER_CONFIG".into(),
                server_toml.display().to_string(),
            ),
            ("SDP_API_PUBLISH".into(), "127.0.0.1:".into()),
            ("SDP_ROUTER_PUBLISH".into(), "127.0.0.1:".into()),
            ("SDP_MICRO_NAME".into(), format!("cmp-{suffix}-micro")),
            (
                "SDP_MICRO_WORK_DIR".into(),
                micro_work.display().to_string(),
            ),
            ("SDP_SANDBOX_IMAGE".into(), docker_image().into()),
        ],
        down: false,
    };

    // The network first; another network may take a free-looking subnet meanwhile.
    let mut host_ip = None;
    for _ in 0..5 {
        let (subnet, ip) = free_subnet();
        stack
            .settings
            .retain(|(k, _)| k != "SDP_SUBNET" && k != "SDP_HOST_IP");
        stack.settings.push(("SDP_SUBNET".into(), subnet));
        stack.settings.push(("SDP_HOST_IP".into(), ip.to_string()));
        let out =
            tokio::task::block_in_place(|| stack.command(&["up", "--no-start"]).output()).unwrap();
        if out.status.success() {
            host_ip = Some(ip);
            break;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("overlap"), "up --no-start failed: {stderr}");
    }
    let host_ip = host_ip.expect("a free subnet within 5 tries");

    let git = GitServer::start_on(&dir.path().join("git"), host_ip.into()).await;
    git.add_user(USER, PASSWORD);
    git.create_repo("probe", &["main"]);
    git.create_repo_with("hello", &["main"], |_| {
        vec![("www/index.html".into(), "ok\n".into())]
    });
    // The build runs in the micro agent's container (its sh and coreutils), the service in
    // the sandbox image, the kit's busybox, with the checkout at /src.
    std::fs::write(
        &server_toml,
        format!(
            r#"public_url = "http://127.0.0.1:8080"

[git]
probe_repo = "{probe}"

[gateway]
base_domain = "sdp.test"
public_url = "http://127.0.0.1:8081"

[[services]]
name = "hello"
repo = "{hello}"
build = 'mkdir -p www && printf "hello from %s\n" "$SDP_SANDBOX" > www/hello'
run = 'busybox httpd -f -p "$PORT" -h /src/www'
port = 8080
health = "/"
routes = ["/hello"]
"#,
            probe = git.url("probe"),
            hello = git.url("hello"),
        ),
    )
    .unwrap();
    stack.run(&["up", "-d"]);

    let api = Api::new(&format!("http://127.0.0.1:{}", stack.port("server", 8080)));
    wait_for_agents(&api, 2).await;
    let token = api.login().await;
    let name = format!("cmp-{}", &suffix[..6]);
    let (sandbox, deployment) = api.deploy(&token, &name, &["hello@main"]).await;
    assert_eq!(deployment["state"], "ready", "{deployment}");
    assert!(
        sandbox["services"][0]["upstream"]
            .as_str()
            .is_some_and(|u| u.starts_with(&format!("{host_ip}:"))),
        "the instance is published on the host's address on the stack's network: {sandbox}"
    );

    let router = format!("http://127.0.0.1:{}/hello", stack.port("gateway", 8081));
    let reply = api
        .http
        .get(&router)
        .header("X-SDP-Sandbox", &name)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert_eq!(reply.headers()["x-sdp-route"], "sandbox");
    assert_eq!(reply.text().await.unwrap(), format!("hello from {name}\n"));

    // Sandbox containers are the engine's, not the project's: deleting the sandbox removes
    // them, `down` could not.
    let reply = api.delete_sandbox(&token, &name).await;
    assert_eq!(reply.status, 202, "{}", reply.body);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stack.sandboxes_left().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sandbox's container and network are still there: {:?}",
            stack.sandboxes_left()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    stack.run(&["down", "-v", "-t", "10"]);
    stack.down = true;
    assert_eq!(stack.leftovers(), Vec::<String>::new());
    assert_eq!(stack.sandboxes_left(), Vec::<String>::new());
}
