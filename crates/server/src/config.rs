//! The control plane's configuration (SPEC §9), checked once at start.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use sdp_config::{ByteSize, ConfigDuration, Secret};
use sdp_protocol::{BranchName, RepoUrl, RestartPolicy, ServiceName, ServiceSpec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The token agents present when they connect.
    pub agent_token: Secret,
    /// Where users reach the control plane; links and the WebSocket `Origin` check use it.
    /// Defaults to `http://<listen address>` once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    #[serde(default = "default_session_ttl")]
    pub session_ttl: ConfigDuration,
    #[serde(default = "default_sandbox_ttl")]
    pub sandbox_ttl: ConfigDuration,
    /// An agent that sends nothing for this long is dropped.
    #[serde(default = "default_agent_timeout")]
    pub agent_timeout: ConfigDuration,
    /// How long a request waits for an agent to answer a job (login, branch list).
    #[serde(default = "default_job_timeout")]
    pub job_timeout: ConfigDuration,
    /// Peers whose `X-Forwarded-For` names the client (nginx in front): the login limiter
    /// counts per client address, and behind a proxy every peer is the proxy.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// A deployment's log file is cut past this size; the deployment goes on.
    #[serde(default = "default_max_log_size")]
    pub max_log_size: ByteSize,
    /// A sandbox's runtime log (its services' output after ready) is rotated past this
    /// size, keeping one rotated file: at most about twice this per sandbox.
    #[serde(default = "default_max_runtime_log_size")]
    pub max_runtime_log_size: ByteSize,
    /// New deployments are refused while the file system of `data_dir` has less free space.
    #[serde(default = "default_min_free_space")]
    pub min_free_space: ByteSize,
    /// How long a client has to send a request head, from when its connection opens or its
    /// previous response ends: also how long an idle keep-alive connection is kept.
    #[serde(default = "default_http_header_timeout")]
    pub http_header_timeout: ConfigDuration,
    /// A client that takes in nothing of what is written to it (a response, WebSocket frames)
    /// for this long is disconnected.
    #[serde(default = "default_http_write_timeout")]
    pub http_write_timeout: ConfigDuration,
    /// A sandbox with no routed request (and no deployment or wake) for this long sleeps:
    /// its instances are stopped, its builds kept. Zero: sandboxes never sleep.
    #[serde(default = "default_idle_after")]
    pub idle_after: ConfigDuration,
    /// How long a wake may take: the router holds a request for a sleeping sandbox this long,
    /// and the micro agent has this long to start its instances again.
    #[serde(default = "default_wake_timeout")]
    pub wake_timeout: ConfigDuration,
    pub git: GitConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub webhooks: WebhooksConfig,
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
}

/// Following branches (SPEC §3 "Follow"): Bitbucket push webhooks, and polling for servers
/// that cannot send them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhooksConfig {
    /// The HMAC-SHA256 secret of `POST /api/hooks/bitbucket`; none: the hook is off (404).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// How often followed branches are checked with `git ls-remote`; zero: never.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: ConfigDuration,
    /// Pushes to a followed branch this close together are deployed once, the newest.
    #[serde(default = "default_debounce")]
    pub debounce: ConfigDuration,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret: None,
            poll_interval: default_poll_interval(),
            debounce: default_debounce(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GitConfig {
    /// The repository `git ls-remote` probes to check a login.
    pub probe_repo: RepoUrl,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayConfig {
    #[serde(default = "default_base_domain")]
    pub base_domain: String,
    #[serde(default = "default_gateway_url")]
    pub public_url: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            base_domain: default_base_domain(),
            public_url: default_gateway_url(),
        }
    }
}

/// A catalog entry (SPEC §3).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub name: ServiceName,
    pub repo: RepoUrl,
    pub build: String,
    pub run: String,
    pub port: u16,
    #[serde(default = "default_health")]
    pub health: String,
    #[serde(default)]
    pub routes: Vec<String>,
    #[serde(default)]
    pub baseline: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// What the agent does when an instance dies or stays unhealthy after `ready`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How often `health` is checked after `ready`; three failures in a row = `unhealthy`.
    #[serde(default = "default_health_interval")]
    pub health_interval: ConfigDuration,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./.sdp")
}
fn default_session_ttl() -> ConfigDuration {
    ConfigDuration::from_secs(12 * 3600)
}
fn default_sandbox_ttl() -> ConfigDuration {
    ConfigDuration::from_secs(24 * 3600)
}
fn default_agent_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
fn default_job_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(20)
}
fn default_max_log_size() -> ByteSize {
    ByteSize::mib(64)
}
fn default_max_runtime_log_size() -> ByteSize {
    ByteSize::mib(16)
}
fn default_min_free_space() -> ByteSize {
    ByteSize::gib(1)
}
fn default_http_header_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_http_write_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
fn default_idle_after() -> ConfigDuration {
    ConfigDuration::from_secs(2 * 3600)
}
fn default_wake_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
fn default_base_domain() -> String {
    "sandbox.localhost".to_owned()
}
fn default_gateway_url() -> String {
    "http://127.0.0.1:8081".to_owned()
}
fn default_health_interval() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_poll_interval() -> ConfigDuration {
    ConfigDuration::from_secs(0)
}
fn default_debounce() -> ConfigDuration {
    ConfigDuration::from_secs(2)
}
fn default_health() -> String {
    "/".to_owned()
}

impl ServerConfig {
    /// Checks what types alone cannot: durations that make sense, a catalog without
    /// duplicates, paths that are paths, a `public_url` that is a URL.
    pub fn validate(&self) -> Result<(), String> {
        for (key, d) in [
            ("session_ttl", self.session_ttl),
            ("sandbox_ttl", self.sandbox_ttl),
            ("agent_timeout", self.agent_timeout),
            ("job_timeout", self.job_timeout),
            ("http_header_timeout", self.http_header_timeout),
            ("http_write_timeout", self.http_write_timeout),
            ("wake_timeout", self.wake_timeout),
        ] {
            if d.get().is_zero() {
                return Err(format!("`{key}` must be longer than zero"));
            }
        }
        let poll = self.webhooks.poll_interval.get();
        if !poll.is_zero() && poll < MIN_POLL_INTERVAL {
            return Err(format!(
                "`webhooks.poll_interval` must be \"0\" (no polling) or at least {}, not {}: each check runs git for every followed repository",
                ConfigDuration::from(MIN_POLL_INTERVAL),
                self.webhooks.poll_interval
            ));
        }
        if self.webhooks.debounce.get() > std::time::Duration::from_secs(60) {
            return Err(format!(
                "`webhooks.debounce` must be at most 60s, not {}",
                self.webhooks.debounce
            ));
        }
        let idle = self.idle_after.get();
        if !idle.is_zero() && idle < MIN_IDLE_AFTER {
            return Err(format!(
                "`idle_after` must be \"0\" (sandboxes never sleep) or at least {}, not {}",
                ConfigDuration::from(MIN_IDLE_AFTER),
                self.idle_after
            ));
        }
        if self.max_log_size < MIN_LOG_SIZE {
            return Err(format!(
                "`max_log_size` must be at least {MIN_LOG_SIZE}, not {}: a cut log should still show how a build began",
                self.max_log_size
            ));
        }
        if self.max_runtime_log_size < MIN_LOG_SIZE {
            return Err(format!(
                "`max_runtime_log_size` must be at least {MIN_LOG_SIZE}, not {}: a rotated log should still hold a crash's last lines",
                self.max_runtime_log_size
            ));
        }
        if let Some(url) = &self.public_url {
            parse_http_url(url).map_err(|e| format!("`public_url`: {e}"))?;
        }
        parse_http_url(&self.gateway.public_url)
            .map_err(|e| format!("`gateway.public_url`: {e}"))?;
        let mut names = HashSet::new();
        // Route prefixes as the router compares them: `/orders/` is `/orders`.
        let mut prefixes: std::collections::HashMap<&str, &str> = Default::default();
        for s in &self.services {
            if s.health_interval.get() < std::time::Duration::from_millis(100) {
                return Err(format!(
                    "`health_interval` of `{}` must be at least 100ms, not {}",
                    s.name, s.health_interval
                ));
            }
            for route in &s.routes {
                let prefix = match route.trim_end_matches('/') {
                    "" => "/",
                    p => p,
                };
                if let Some(other) = prefixes.insert(prefix, s.name.as_str())
                    && other != s.name.as_str()
                {
                    return Err(format!(
                        "route {prefix:?} is claimed by both `{other}` and `{}`; each prefix goes to one service",
                        s.name
                    ));
                }
            }
            if !s.baseline.is_empty() {
                let url = parse_http_url(&s.baseline)
                    .map_err(|e| format!("service `{}`: `baseline`: {e}", s.name))?;
                if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
                    return Err(format!(
                        "service `{}`: `baseline` must be scheme, host, port and path only",
                        s.name
                    ));
                }
            }
            if !names.insert(s.name.as_str()) {
                return Err(format!("service `{}` is listed twice", s.name));
            }
            if !s.health.starts_with('/') {
                return Err(format!(
                    "service `{}`: `health` must be a path starting with '/'",
                    s.name
                ));
            }
            if let Some(r) = s.routes.iter().find(|r| !r.starts_with('/')) {
                return Err(format!(
                    "service `{}`: route {r:?} must start with '/'",
                    s.name
                ));
            }
            if s.build.trim().is_empty() || s.run.trim().is_empty() {
                return Err(format!(
                    "service `{}`: `build` and `run` cannot be empty",
                    s.name
                ));
            }
        }
        Ok(())
    }

    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name.as_str() == name)
    }
}

impl ServiceConfig {
    /// What a deploy job carries of this service on `branch`.
    pub fn spec(&self, branch: BranchName) -> ServiceSpec {
        ServiceSpec {
            service: self.name.clone(),
            repo: self.repo.clone(),
            branch,
            build: self.build.clone(),
            run: self.run.clone(),
            port: self.port,
            health: self.health.clone(),
            env: self.env.clone(),
            restart: self.restart,
            health_interval_ms: self.health_interval.get().as_millis() as u64,
        }
    }
}

/// The shortest `idle_after` but zero: a sandbox should at least get through the ready
/// step's table before it sleeps.
const MIN_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// The shortest `poll_interval` but zero.
const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The smallest `max_log_size` taken.
const MIN_LOG_SIZE: ByteSize = ByteSize::kib(64);

/// A block of IP addresses, written `10.0.0.0/8`, `::1/128`, or one address alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A peer of a dual-stack listener can be an IPv4-mapped IPv6 address.
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let explain =
            || format!("{s:?} is not an address block like \"127.0.0.1/32\" or \"::1/128\"");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| explain())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(explain)?,
            None => max,
        };
        Ok(Cidr {
            addr: addr.to_canonical(),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

pub(crate) fn parse_http_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!(
            "{raw:?} must be an http:// or https:// URL with a host"
        ));
    }
    Ok(url)
}
