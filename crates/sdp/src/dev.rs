//! `sdp dev`: the server, a micro agent and a gateway agent in one process on loopback, with
//! demo repositories it creates itself, so a first try needs only this binary and git.
//!
//! The demo repositories are local paths: git asks for no password, so dev mode accepts any
//! password. Nothing else does.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sdp_agent::{Agent, AgentConfig, DockerConfig, GatewayConfig, Runtime};
use sdp_config::{ByteSize, ConfigDuration, Secret};
use sdp_protocol::{AgentName, RepoUrl, Role, ServiceName};
use sdp_server::{GitConfig, Server, ServerConfig, ServiceConfig};
use tokio_util::sync::CancellationToken;

/// A demo service: its name, its route and what each branch answers with.
struct Demo {
    name: &'static str,
    route: &'static str,
    branches: &'static [(&'static str, &'static str)],
}

const DEMOS: &[Demo] = &[
    Demo {
        name: "hello",
        route: "/hello",
        branches: &[
            ("main", "Hello from the main branch of hello.\n"),
            ("feature/x", "Hello from feature/x: a new greeting.\n"),
        ],
    },
    Demo {
        name: "echo",
        route: "/echo",
        branches: &[
            ("main", "echo: main\n"),
            ("feature/fast", "echo: feature/fast\n"),
        ],
    },
];

pub async fn run(data: &Path, port: u16, stop: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(data)
        .with_context(|| format!("cannot create the data directory {}", data.display()))?;
    let data = data
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", data.display()))?;
    let exe = std::env::current_exe().context("cannot find the sdp binary")?;

    let repos = data.join("repos");
    for demo in DEMOS {
        create_demo_repo(&repos, demo)
            .with_context(|| format!("cannot create the demo repository {}", demo.name))?;
    }

    // A token for this run only: the agents are in this process, so it never leaves memory.
    let token = hex::encode(rand::random::<[u8; 32]>());
    let services = DEMOS
        .iter()
        .map(|demo| service(&repos, demo, &exe))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The router's port is needed before the server starts: it is in the sandboxes' URLs.
    let gateway_port = if port == 0 { 0 } else { port.saturating_add(1) };
    let router_listener = tokio::net::TcpListener::bind(("127.0.0.1", gateway_port))
        .await
        .with_context(|| {
            format!("the router cannot listen on 127.0.0.1:{gateway_port}; choose another port with --port N (the router takes N+1)")
        })?;
    let gateway_url = format!("http://{}", router_listener.local_addr()?);
    // The router's metrics on a port of their own, any free one: only this machine reads them.
    let metrics_listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("the router's metrics cannot listen on a free port of 127.0.0.1")?;
    let metrics_addr = metrics_listener.local_addr()?;
    let probe_repo = RepoUrl::parse(repo_path(&repos, DEMOS[0].name).display().to_string())?;
    let server_config = ServerConfig {
        listen: ([127, 0, 0, 1], port).into(),
        data_dir: data.join("server"),
        agent_token: Secret::new(token.clone()),
        public_url: None,
        session_ttl: ConfigDuration::from_secs(12 * 3600),
        sandbox_ttl: ConfigDuration::from_secs(24 * 3600),
        agent_timeout: ConfigDuration::from_secs(30),
        job_timeout: ConfigDuration::from_secs(20),
        trusted_proxies: Vec::new(),
        max_log_size: ByteSize::mib(64),
        max_runtime_log_size: ByteSize::mib(16),
        min_free_space: ByteSize::gib(1),
        http_header_timeout: ConfigDuration::from_secs(10),
        http_write_timeout: ConfigDuration::from_secs(30),
        idle_after: ConfigDuration::from_secs(2 * 3600),
        wake_timeout: ConfigDuration::from_secs(60),
        git: GitConfig { probe_repo },
        gateway: sdp_server::GatewayConfig {
            public_url: gateway_url.clone(),
            ..Default::default()
        },
        webhooks: Default::default(),
        services,
    };
    let server = Server::bind_with(server_config.clone(), true)
        .await
        .map_err(|e| match e {
            sdp_server::ServerError::Bind { .. } => {
                anyhow::anyhow!("{e}; choose another port with --port N (0 picks a free one)")
            }
            e => e.into(),
        })?;
    let addr = server.local_addr();
    let url = server.public_url();

    let agent_config = |role: Role, name: &str| -> anyhow::Result<AgentConfig> {
        Ok(AgentConfig {
            server: format!("ws://{addr}/ws/agent"),
            token: Secret::new(token.clone()),
            role,
            name: Some(AgentName::parse(name)?),
            work_dir: data.join(format!("agent-{name}")),
            runtime: Runtime::Process,
            advertise_host: "127.0.0.1".to_owned(),
            port_range: "20000-29999".to_owned(),
            git_timeout: ConfigDuration::from_secs(60),
            build_timeout: ConfigDuration::from_secs(600),
            health_timeout: ConfigDuration::from_secs(30),
            docker: DockerConfig::default(),
            kubernetes: None,
            gateway: (role == Role::Gateway).then(|| GatewayConfig {
                metrics_listen: Some(metrics_addr),
                ..GatewayConfig::new(([127, 0, 0, 1], gateway_port).into())
            }),
            // Dev mode is one person's first try on their own machine, with demo
            // repositories only: builds run as whoever runs it, root included (said at start).
            run_as: None,
            allow_root_builds: true,
            max_git_jobs: 8,
            max_builds: std::thread::available_parallelism().map_or(1, usize::from),
            // Without `run_as` no build could be kept from user code: each sandbox builds.
            share_builds: false,
            allow_local_repos: true,
            ca_file: None,
            insecure: false,
        })
    };
    let micro = agent_config(Role::Micro, "dev-micro")?;
    let gateway = agent_config(Role::Gateway, "dev-gateway")?;
    write_config(&data.join("server.toml"), &server_config)?;
    write_config(&data.join("agent-micro.toml"), &micro)?;
    write_config(&data.join("agent-gateway.toml"), &gateway)?;

    let mut gateway = Agent::new(gateway, crate::askpass_program()?).await?;
    gateway.use_router_listener(router_listener);
    gateway.use_metrics_listener(metrics_listener);
    let agents = [Agent::new(micro, crate::askpass_program()?).await?, gateway];
    let mut tasks = Vec::new();
    for agent in agents {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent.run(stop.clone()).await {
                tracing::error!(error = %e, "agent stopped");
                stop.cancel();
            }
        }));
    }

    println!("SDP dev is running.");
    println!("  Dashboard and API: {url}");
    println!("  Sandbox router: {gateway_url} (a sandbox's own URL is in its page)");
    println!("  Metrics: {url}/metrics (control plane), http://{metrics_addr}/metrics (router)");
    println!("  Dev mode accepts any username and password: the demo repositories are local.");
    println!(
        "  Demo services: {}",
        DEMOS.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
    );
    println!("  Data: {}", data.display());
    println!("Press Ctrl-C to stop.");

    server.run(stop.clone()).await?;
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

fn repo_path(repos: &Path, name: &str) -> PathBuf {
    repos.join(format!("{name}.git"))
}

fn service(repos: &Path, demo: &Demo, exe: &Path) -> anyhow::Result<ServiceConfig> {
    let exe = shell_quote(&exe.display().to_string());
    Ok(ServiceConfig {
        name: ServiceName::parse(demo.name)?,
        repo: RepoUrl::parse(repo_path(repos, demo.name).display().to_string())?,
        // A build's log, for the dashboard to show, then the check that there is a message.
        build: format!("{exe} demo-build {} && test -s message.txt", demo.name),
        run: format!("{exe} demo-service"),
        port: 8080,
        health: "/healthz".to_owned(),
        routes: vec![demo.route.to_owned()],
        baseline: String::new(),
        env: Default::default(),
        restart: Default::default(),
        health_interval: ConfigDuration::from_secs(10),
        kind: Default::default(),
        routes_file: None,
        routes_format: None,
        routes_template: None,
        reload: None,
    })
}

/// Quotes `s` for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes the configuration `sdp dev` runs with, for reference; its secrets are redacted.
fn write_config<T: serde::Serialize>(path: &Path, config: &T) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `sdp dev` for reference: the configuration it runs with.\n\
         # The agent token is random for each run and lives only in memory.\n{}",
        toml::to_string_pretty(config)?
    );
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Creates `<repos>/<name>.git` with the demo's branches, unless it exists.
fn create_demo_repo(repos: &Path, demo: &Demo) -> anyhow::Result<()> {
    let bare = repo_path(repos, demo.name);
    if bare.join("HEAD").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(repos)?;
    let scratch = repos.join(format!(".{}.work", demo.name));
    let _ = std::fs::remove_dir_all(&scratch);
    git(
        repos,
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            &bare.display().to_string(),
        ],
    )?;
    git(
        repos,
        &[
            "init",
            "--quiet",
            "--initial-branch=main",
            &scratch.display().to_string(),
        ],
    )?;
    for (i, (branch, message)) in demo.branches.iter().enumerate() {
        if i > 0 {
            git(&scratch, &["checkout", "--quiet", "-b", branch, "main"])?;
        }
        std::fs::write(scratch.join("message.txt"), message)?;
        std::fs::write(
            scratch.join("README.md"),
            format!(
                "# {}\n\nA demo service of `sdp dev`: it answers with message.txt.\n",
                demo.name
            ),
        )?;
        git(&scratch, &["add", "."])?;
        git(
            &scratch,
            &[
                "commit",
                "--quiet",
                "-m",
                &format!("{} on {branch}", demo.name),
            ],
        )?;
        git(
            &scratch,
            &[
                "push",
                "--quiet",
                &bare.display().to_string(),
                &format!("HEAD:refs/heads/{branch}"),
            ],
        )?;
    }
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=SDP dev",
            "-c",
            "user.email=dev@sdp.invalid",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .output()
        .context("cannot run git: is it installed?")?;
    if !out.status.success() {
        bail!(
            "git {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
