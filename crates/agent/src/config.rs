//! The agent's configuration (SPEC §9).

use std::net::SocketAddr;
use std::path::PathBuf;

use sdp_config::{ConfigDuration, Secret};
use sdp_protocol::{AgentName, Role};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The control plane's agent endpoint, e.g. `ws://127.0.0.1:8080/ws/agent`.
    pub server: String,
    pub token: Secret,
    pub role: Role,
    /// Defaults to `<host name>-<role>`.
    #[serde(default)]
    pub name: Option<AgentName>,
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default = "default_advertise_host")]
    pub advertise_host: String,
    #[serde(default = "default_port_range")]
    pub port_range: String,
    /// Every git command is killed after this long.
    #[serde(default = "default_git_timeout")]
    pub git_timeout: ConfigDuration,
    /// A build is killed after this long.
    #[serde(default = "default_build_timeout")]
    pub build_timeout: ConfigDuration,
    /// A service that has not answered 200 on its health path by then has failed.
    #[serde(default = "default_health_timeout")]
    pub health_timeout: ConfigDuration,
    #[serde(default)]
    pub docker: DockerConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayConfig>,
    /// The user builds and services run as. Required when the agent runs as root: user code
    /// must never share the agent's uid, which can read the git processes' environment (the
    /// password) and write what git reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Lets a root agent without `run_as` run builds as root. Unsafe: any user's build then
    /// reads every other user's password. For a single-user machine only.
    #[serde(default)]
    pub allow_root_builds: bool,
    /// git processes at once on this agent; more jobs wait in a queue.
    #[serde(default = "default_max_git_jobs")]
    pub max_git_jobs: usize,
    /// Lets git use local repositories (`file://` and plain paths): `sdp dev` only, whose demo
    /// repositories are folders. Not a key of the file.
    #[serde(skip)]
    pub allow_local_repos: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    #[default]
    Docker,
    Process,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DockerConfig {
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_cpus", deserialize_with = "number_or_string")]
    pub cpus: f64,
    /// The most processes a container may run.
    #[serde(default = "default_pids", deserialize_with = "number_or_string")]
    pub pids: f64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            image: default_image(),
            memory: default_memory(),
            cpus: default_cpus(),
            pids: default_pids(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayConfig {
    /// Where the sandbox router listens.
    pub listen: SocketAddr,
    /// To open a connection to an upstream; past it the client gets a 502.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: ConfigDuration,
    /// For an upstream's response head; past it the client gets a 504. Bodies and WebSockets
    /// stream for as long as they last.
    #[serde(default = "default_upstream_timeout")]
    pub upstream_timeout: ConfigDuration,
}

impl GatewayConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            connect_timeout: default_connect_timeout(),
            upstream_timeout: default_upstream_timeout(),
        }
    }
}

fn default_connect_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_upstream_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}

fn default_max_git_jobs() -> usize {
    8
}

fn default_work_dir() -> PathBuf {
    PathBuf::from("./.sdp-agent")
}
fn default_advertise_host() -> String {
    "127.0.0.1".to_owned()
}
fn default_port_range() -> String {
    "20000-29999".to_owned()
}
fn default_git_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(120)
}
fn default_build_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(600)
}
fn default_health_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
fn default_image() -> String {
    "alpine:3.20".to_owned()
}
fn default_memory() -> String {
    "512m".to_owned()
}
fn default_cpus() -> f64 {
    1.0
}
fn default_pids() -> f64 {
    512.0
}

/// Environment variables are strings; a number key accepts `SDP_DOCKER__CPUS=0.5` too.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => t
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{t:?} is not a number"))),
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.server.starts_with("ws://") || self.server.starts_with("wss://")) {
            return Err(format!(
                "`server` must be a ws:// or wss:// URL of the control plane's /ws/agent, not {:?}",
                self.server
            ));
        }
        for (key, d) in [
            ("git_timeout", self.git_timeout),
            ("build_timeout", self.build_timeout),
            ("health_timeout", self.health_timeout),
        ] {
            if d.get().is_zero() {
                return Err(format!("`{key}` must be longer than zero"));
            }
        }
        parse_bytes(&self.docker.memory)?;
        if self.docker.pids < 1.0 || self.docker.pids.fract() != 0.0 {
            return Err("`docker.pids` must be a whole number above zero".into());
        }
        parse_port_range(&self.port_range)?;
        if self.max_git_jobs == 0 {
            return Err("`max_git_jobs` must be at least 1".into());
        }
        if let Some(user) = &self.run_as
            && user.trim().is_empty()
        {
            return Err("`run_as` must name a user".into());
        }
        if !self.docker.cpus.is_finite() || self.docker.cpus <= 0.0 {
            return Err("`docker.cpus` must be above zero".into());
        }
        match (&self.gateway, self.role) {
            (None, Role::Gateway) => {
                return Err("a gateway agent needs a [gateway] table with `listen`".into());
            }
            (Some(g), _)
                if g.connect_timeout.get().is_zero() || g.upstream_timeout.get().is_zero() =>
            {
                return Err(
                    "`gateway.connect_timeout` and `gateway.upstream_timeout` must be longer than zero"
                        .into(),
                );
            }
            _ => {}
        }
        Ok(())
    }
}

/// `"20000-29999"` as an inclusive range.
pub fn parse_port_range(raw: &str) -> Result<(u16, u16), String> {
    let err = || format!("`port_range` must look like \"20000-29999\", not {raw:?}");
    let (lo, hi) = raw.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

/// `"512m"`, `"2g"`, `"65536k"` or a number of bytes.
pub fn parse_bytes(raw: &str) -> Result<i64, String> {
    let err = || format!("`docker.memory` must look like \"512m\" or \"2g\", not {raw:?}");
    let lower = raw.trim().to_ascii_lowercase();
    let lower = lower.trim_end_matches('b');
    let (digits, factor) = match lower.chars().last() {
        Some('k') => (&lower[..lower.len() - 1], 1i64 << 10),
        Some('m') => (&lower[..lower.len() - 1], 1 << 20),
        Some('g') => (&lower[..lower.len() - 1], 1 << 30),
        _ => (lower, 1),
    };
    let n: i64 = digits.trim().parse().map_err(|_| err())?;
    n.checked_mul(factor)
        .filter(|b| *b >= 6 << 20)
        .ok_or_else(|| {
            format!("`docker.memory` must be at least 6m (Docker's minimum), not {raw:?}")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_are_read_like_docker_reads_them() {
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert_eq!(parse_bytes("8388608"), Ok(8 << 20));
        assert_eq!(parse_bytes("64MB"), Ok(64 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1k").is_err());
    }
}
