//! `sdp`: one binary for the control plane, the agents, dev mode and the command line client.
//!
//! This file only parses the command line, sets up logging and calls into the library
//! crates. It is also git's askpass helper, which must be answered before anything else.

mod cli;
mod demo;
mod dev;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use sdp_agent::{Agent, AgentConfig};
use sdp_protocol::Role;
use sdp_server::{Server, ServerConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sdp", version, about = "SDP, the Sandbox Deployment Platform")]
struct Cli {
    /// Log format on stderr (the server's and the agents'): text, coloured only on a
    /// terminal, or one JSON object a line.
    #[arg(long, global = true, value_enum, env = "SDP_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Platform(Platform),
    #[command(flatten)]
    Client(cli::ClientCommand),
    /// Print a completion script: `sdp completion bash > /etc/bash_completion.d/sdp`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The platform's own processes, and their tools.
#[derive(Subcommand)]
enum Platform {
    /// Run the control plane: HTTP API, WebSocket hub, dashboard, persistence.
    Server {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run an agent that dials the control plane.
    Agent {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Overrides `role` of the config file.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
    },
    /// Run the server, a micro agent and a gateway agent in one process, with demo services.
    Dev {
        /// Data directory.
        #[arg(long, value_name = "DIR", default_value = "./.sdp-dev")]
        data: PathBuf,
        /// Port of the dashboard and API on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The demo service of `sdp dev`: answers with the checkout's message.txt.
    #[command(hide = true)]
    DemoService,
    /// The demo services' build in `sdp dev`: prints a build's log.
    #[command(hide = true)]
    DemoBuild { service: String },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (file plus SDP_* variables), secrets redacted.
    Print {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Which process the file configures; by default, guessed from its keys.
        #[arg(long, value_enum)]
        kind: Option<ConfigKind>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Micro,
    Gateway,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfigKind {
    Server,
    Agent,
}

/// A mistake of the person at the keyboard (a bad flag, file or key): exit status 2.
#[derive(Debug)]
struct UsageError(String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.to_string()))
}

fn main() -> ExitCode {
    if let Some(code) = sdp_agent::askpass::answer_if_asked() {
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let cli = Cli::parse();
    let command = match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "sdp", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Client(command) => return run_client(command),
        Command::Platform(command) => command,
    };
    init_logging(cli.log_format);
    if matches!(
        command,
        Platform::Server { .. } | Platform::Agent { .. } | Platform::Dev { .. }
    ) && let Err(e) = harden()
    {
        eprintln!("error: {e:#}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// Runs a command of the client: its failure is one line, a hint, and the status of SPEC §10.
fn run_client(command: cli::ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::FAILED);
        }
    };
    match runtime.block_on(cli::run(command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            anstream::eprintln!(
                "{}error:{} {}",
                cli::output::BAD.render(),
                cli::output::BAD.render_reset(),
                failure.message
            );
            if let Some(hint) = &failure.hint {
                anstream::eprintln!(
                    "{}hint:{} {hint}",
                    cli::output::DIM.render(),
                    cli::output::DIM.render_reset()
                );
            }
            ExitCode::from(failure.status)
        }
    }
}

/// The server and the agents hold passwords (the control plane's vault, the jobs in an
/// agent's memory) and the agent token: no core file may write them to disk, and no process
/// of the same user may read their memory or environment (`/proc/<pid>/environ`, `mem`),
/// which a non-dumpable process denies to everyone but root. What they write is their own
/// (umask 077).
fn harden() -> anyhow::Result<()> {
    // What the platform writes (logs, the database, mirrors, pid files) is for no other user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    nix::sys::prctl::set_dumpable(false).context("cannot make the process non-dumpable")?;
    // Last, so that a core limit of 0 seen from outside means both are done.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .context("cannot switch core dumps off")?;
    Ok(())
}

/// Targets held at `info` whatever `RUST_LOG` says, including directives naming their
/// submodules (`tungstenite::protocol=trace`): at debug and trace they print whole WebSocket
/// frames, handshakes and HTTP headers, which carry job credentials and tokens.
const QUIET_TARGETS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tokio_rustls",
    "reqwest",
];

fn is_quiet(target: &str) -> bool {
    QUIET_TARGETS.iter().any(|quiet| {
        target
            .strip_prefix(quiet)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A filter of its own after `RUST_LOG`'s, so that no directive can lift the cap.
    let cap = tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::INFO || !is_quiet(meta.target())
    });
    // Colour codes are for a person at a terminal; in a file or a journal they are noise.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let layer = match format {
        LogFormat::Text => layer.with_filter(cap).boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_filter(cap).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .init();
}

async fn run(command: Platform) -> anyhow::Result<()> {
    match command {
        Platform::Server { config } => {
            let config: ServerConfig = load(config.as_deref(), &[])?;
            let server = Server::bind(config).await.map_err(|e| match e {
                sdp_server::ServerError::Config(_) => usage(e),
                e => anyhow::Error::new(e),
            })?;
            server.run(stop_on_signal()).await?;
            Ok(())
        }
        Platform::Agent { config, role } => {
            let role = role.map(|r| match r {
                RoleArg::Micro => Role::Micro,
                RoleArg::Gateway => Role::Gateway,
            });
            let extra: Vec<(String, String)> = role
                .map(|r| ("SDP_ROLE".to_owned(), r.as_str().to_owned()))
                .into_iter()
                .collect();
            let config: AgentConfig = load(config.as_deref(), &extra)?;
            let mut agent = Agent::new(config, askpass_program()?)
                .await
                .map_err(usage)?;
            agent.load_image().await.map_err(usage)?;
            agent.bind_router().await?;
            agent.run(stop_on_signal()).await?;
            Ok(())
        }
        Platform::Dev { data, port } => dev::run(&data, port, stop_on_signal()).await,
        Platform::Config {
            command: ConfigCommand::Print { config, kind },
        } => {
            let kind = match kind {
                Some(kind) => kind,
                None => guess_kind(&config)?,
            };
            let text = match kind {
                ConfigKind::Server => {
                    let c: ServerConfig = load(Some(&config), &[])?;
                    c.validate().map_err(usage)?;
                    toml::to_string_pretty(&c)?
                }
                ConfigKind::Agent => {
                    let c: AgentConfig = load(Some(&config), &[])?;
                    c.validate().map_err(usage)?;
                    toml::to_string_pretty(&c)?
                }
            };
            print!("{text}");
            Ok(())
        }
        Platform::DemoService => demo::serve().await,
        Platform::DemoBuild { service } => demo::build(&service),
    }
}

/// The program git runs as askpass: this very binary. `/proc/<pid>/exe` still runs it after
/// the file was replaced by an upgrade, when its path would name the new binary or nothing.
/// Only a git holding CAP_SYS_PTRACE may use it: the process is non-dumpable (see
/// [`harden`]), which closes its `/proc` links to every other process of its user, git
/// included. Root on a host holds it; root in a container usually does not, and there the
/// binary's path serves, as an image's files are not replaced under a running process.
fn askpass_program() -> anyhow::Result<PathBuf> {
    let own = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    let may_trace = rustix::thread::capabilities(None).is_ok_and(|caps| {
        caps.effective
            .contains(rustix::thread::CapabilitySet::SYS_PTRACE)
    });
    if nix::unistd::geteuid().is_root() && may_trace && own.exists() {
        return Ok(own);
    }
    std::env::current_exe().context("cannot find the sdp binary for git's askpass")
}

/// Loads a configuration from `file` and the environment; `extra` pairs win over both.
fn load<T: serde::de::DeserializeOwned>(
    file: Option<&Path>,
    extra: &[(String, String)],
) -> anyhow::Result<T> {
    // SDP_LOG_FORMAT is every process's (`--log-format`), not a key of one configuration.
    let env = std::env::vars()
        .filter(|(k, _)| k != "SDP_LOG_FORMAT")
        .chain(extra.iter().cloned());
    let loaded = sdp_config::load(file, env).map_err(usage)?;
    for var in &loaded.ignored_env {
        // Not an error: the server, the agents and the client share one environment.
        tracing::warn!(variable = %var, "ignoring an SDP_* variable that names no key of this process's configuration");
    }
    Ok(loaded.config)
}

/// An agent's file names its control plane (`server`) or its `role`; a server's does not.
fn guess_kind(path: &Path) -> anyhow::Result<ConfigKind> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| usage(format!("{} is not valid TOML: {e}", path.display())))?;
    Ok(
        if table.contains_key("server") || table.contains_key("role") {
            ConfigKind::Agent
        } else {
            ConfigKind::Server
        },
    )
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    let _ = tokio::signal::ctrl_c().await;
                    cancel.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::is_quiet;

    #[test]
    fn the_frame_tracing_targets_and_their_submodules_are_capped() {
        assert!(is_quiet("tungstenite"));
        assert!(is_quiet("tungstenite::protocol::frame"));
        assert!(is_quiet("hyper::proto::h1::io"));
        assert!(!is_quiet("tungstenite_other"));
        assert!(!is_quiet("sdp_agent::git"));
    }
}
