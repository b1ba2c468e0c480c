//! The control plane's configuration (SPEC §9), checked once at start.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use sdp_config::{ByteSize, ConfigDuration, Secret};
use sdp_protocol::{
    BranchName, CheckoutPath, GatewaySpec, Reload, RepoUrl, RestartPolicy, ServiceName, ServiceSpec,
};
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
    /// `service` (deployed on a micro agent, routed by its `routes`) or `gateway` (the
    /// company's own API gateway: deployed on the gateway agent, it gets every request of
    /// the sandbox that selects it).
    #[serde(default)]
    pub kind: ServiceKind,
    /// Gateways: where the agent writes the sandbox's routes, relative to the working
    /// directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_file: Option<CheckoutPath>,
    /// Gateways: `json`, or `template` (`routes_template` rendered with the same data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_format: Option<RoutesFormat>,
    /// Gateways with `routes_format = "template"`: a file of the gateway's own repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes_template: Option<CheckoutPath>,
    /// Gateways: `restart`, or `signal:HUP` (`USR1`, `USR2`) to reload the routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Reload>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    #[default]
    Service,
    Gateway,
}

impl ServiceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Service => "service",
            ServiceKind::Gateway => "gateway",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutesFormat {
    Json,
    Template,
}

impl ServiceConfig {
    /// What the gateway agent needs to keep a gateway's routes (none for other services).
    /// Checked by `validate` before.
    pub fn gateway_spec(&self) -> Option<GatewaySpec> {
        if self.kind != ServiceKind::Gateway {
            return None;
        }
        Some(GatewaySpec {
            routes_file: self.routes_file.clone()?,
            routes_template: match self.routes_format {
                Some(RoutesFormat::Template) => self.routes_template.clone(),
                Some(RoutesFormat::Json) | None => None,
            },
            reload: self.reload.unwrap_or(Reload::Restart),
        })
    }

    /// Checks the keys of a gateway, and that other services have none of them.
    fn validate_kind(&self) -> Result<(), String> {
        let name = &self.name;
        match self.kind {
            ServiceKind::Service => {
                for (key, set) in [
                    ("routes_file", self.routes_file.is_some()),
                    ("routes_format", self.routes_format.is_some()),
                    ("routes_template", self.routes_template.is_some()),
                    ("reload", self.reload.is_some()),
                ] {
                    if set {
                        return Err(format!(
                            "service `{name}`: `{key}` is only for `kind = \"gateway\"`"
                        ));
                    }
                }
            }
            ServiceKind::Gateway => {
                if self.routes_file.is_none() {
                    return Err(format!(
                        "gateway `{name}` needs `routes_file`: where the agent writes the sandbox's routes"
                    ));
                }
                if !self.routes.is_empty() || !self.baseline.is_empty() {
                    return Err(format!(
                        "gateway `{name}` takes no `routes` or `baseline`: it gets every request of the sandbox that selects it"
                    ));
                }
                match (self.routes_format, &self.routes_template) {
                    (Some(RoutesFormat::Template), None) => {
                        return Err(format!(
                            "gateway `{name}`: `routes_format = \"template\"` needs `routes_template`, a file of the gateway's repository"
                        ));
                    }
                    (Some(RoutesFormat::Json) | None, Some(_)) => {
                        return Err(format!(
                            "gateway `{name}`: `routes_template` is used only with `routes_format = \"template\"`"
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
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
            s.validate_kind()?;
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
            gateway: self.gateway_spec(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The config of `services`, loaded as `sdp server` loads its file, then validated.
    fn check(services: &str) -> Result<ServerConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("server.toml");
        std::fs::write(
            &path,
            format!(
                "agent_token = \"t\"\n[git]\nprobe_repo = \"https://git.test/probe.git\"\n{services}"
            ),
        )
        .unwrap();
        let loaded =
            sdp_config::load::<ServerConfig>(Some(&path), Vec::new()).map_err(|e| e.to_string())?;
        loaded.config.validate()?;
        Ok(loaded.config)
    }

    const GATEWAY: &str = "[[services]]\nname = \"api-gateway\"\nkind = \"gateway\"\nrepo = \"https://git.test/gw.git\"\nbuild = \"make\"\nrun = \"./gw\"\nport = 8080\n";

    #[test]
    fn a_gateway_service_takes_its_routes_file_format_and_reload() {
        let config = check(&format!(
            "{GATEWAY}routes_file = \"config/routes.json\"\nreload = \"signal:HUP\"\n"
        ))
        .unwrap();
        let spec = config.services[0].gateway_spec().unwrap();
        assert_eq!(spec.routes_file.as_str(), "config/routes.json");
        assert_eq!(spec.reload.to_string(), "signal:HUP");
        assert!(spec.routes_template.is_none());
        let templated = check(&format!(
            "{GATEWAY}routes_file = \"routes.conf\"\nroutes_format = \"template\"\nroutes_template = \"deploy/routes.tmpl\"\n"
        ))
        .unwrap();
        let spec = templated.services[0].gateway_spec().unwrap();
        assert_eq!(spec.routes_template.unwrap().as_str(), "deploy/routes.tmpl");
        // Without `reload`, a restart: every program reads its files when it starts.
        assert_eq!(spec.reload.to_string(), "restart");
    }

    #[test]
    fn a_gateway_without_a_sound_routes_setup_is_refused_with_the_reason() {
        for (keys, says) in [
            ("", "needs `routes_file`"),
            ("routes_file = \"/etc/routes.json\"\n", "relative"),
            ("routes_file = \"../routes.json\"\n", "`..`"),
            (
                "routes_file = \"r.json\"\nreload = \"signal:KILL\"\n",
                "signal:HUP",
            ),
            (
                "routes_file = \"r.json\"\nroutes_format = \"template\"\n",
                "needs `routes_template`",
            ),
            (
                "routes_file = \"r.json\"\nroutes_template = \"t\"\n",
                "only with `routes_format = \"template\"`",
            ),
            (
                "routes_file = \"r.json\"\nroutes = [\"/x\"]\n",
                "no `routes`",
            ),
            (
                "routes_file = \"r.json\"\nroutes_format = \"yaml\"\n",
                "yaml",
            ),
        ] {
            let refusal = check(&format!("{GATEWAY}{keys}")).unwrap_err();
            assert!(refusal.contains(says), "{keys:?}: {refusal}");
        }
        let plain = "[[services]]\nname = \"orders\"\nrepo = \"https://git.test/o.git\"\nbuild = \"make\"\nrun = \"./o\"\nport = 8080\nreload = \"restart\"\n";
        let refusal = check(plain).unwrap_err();
        assert!(
            refusal.contains("`reload` is only for `kind = \"gateway\"`"),
            "{refusal}"
        );
    }
}
