//! The agent's configuration (SPEC §9).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use sdp_config::{ConfigDuration, Secret};
use sdp_protocol::{AgentName, Role};
use sdp_router::IpNet;
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
    /// `runtime = "kubernetes"` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayConfig>,
    /// The user builds and services run as. Required when the agent runs as root: user code
    /// must never share the agent's uid, which can read the git processes' environment (the
    /// password) and write what git reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// Lets a root agent without `run_as` run builds as root. Unsafe: any user's build then
    /// reads every other user's password. For a single-user machine only.
    #[serde(default, deserialize_with = "bool_or_string")]
    pub allow_root_builds: bool,
    /// git processes at once on this agent; more jobs wait in a queue.
    #[serde(
        default = "default_max_git_jobs",
        deserialize_with = "number_or_string"
    )]
    pub max_git_jobs: usize,
    /// Builds at once on this agent, every deployment's together; more wait their turn. A
    /// sandbox's services are fetched and built side by side within it. Default: one per CPU.
    #[serde(default = "default_max_builds", deserialize_with = "number_or_string")]
    pub max_builds: usize,
    /// A sandbox takes a copy of the build another sandbox made of the same repository,
    /// commit, build command and runtime, after its own fetch of that commit (only with
    /// `run_as`: see ARCHITECTURE.md, "Shared builds").
    #[serde(default = "default_true", deserialize_with = "bool_or_string")]
    pub share_builds: bool,
    /// Lets git use local repositories (`file://` and plain paths): `sdp dev` only, whose demo
    /// repositories are folders. Not a key of the file.
    #[serde(skip)]
    pub allow_local_repos: bool,
    /// PEM file of the CA certificates that verify the control plane's certificate on
    /// `wss://`; without it, the system's trusted certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allows plain `ws://` to a control plane on another host. Deploy jobs carry users'
    /// passwords: only for a network nobody else can read (a tunnel). It never turns
    /// certificate checks off.
    #[serde(default, deserialize_with = "bool_or_string")]
    pub insecure: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    #[default]
    Docker,
    Process,
    Kubernetes,
}

/// The `[kubernetes]` table: where and how sandboxes' instances run as pods
/// (`crate::runtime::KubernetesRuntime`; docs/kubernetes.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubernetesConfig {
    /// A kubeconfig file; absent: the in-cluster service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig's context; absent: its current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// A namespace every instance runs in, or `per-sandbox`: one namespace `sdp-<sandbox id>`
    /// made for each sandbox (and deleted with it). Absent: the kubeconfig context's
    /// namespace (in a pod, its own), else `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The image every instance runs in (and fetches its checkout with: it needs `sh`,
    /// `wget` and `tar`, as busybox and alpine have).
    #[serde(default = "default_image")]
    pub image: String,
    /// `IfNotPresent` (the default), `Always` or `Never`.
    #[serde(default = "default_pull_policy")]
    pub image_pull_policy: String,
    /// How the router reaches an instance.
    #[serde(default)]
    pub expose: Expose,
    /// Pods use the node's network, and a port of `port_range` the agent chooses.
    #[serde(default, deserialize_with = "bool_or_string")]
    pub host_network: bool,
    /// Requested and limited, per instance (Kubernetes quantities).
    #[serde(default = "default_k8s_memory")]
    pub memory: String,
    #[serde(default = "default_k8s_cpu")]
    pub cpu: String,
    /// The uid and gid instances run as (never root).
    #[serde(
        default = "default_k8s_run_as_user",
        deserialize_with = "number_or_string"
    )]
    pub run_as_user: i64,
    /// Where the agent serves checkouts to pods starting (`<advertise_host>:9180`
    /// by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_listen: Option<SocketAddr>,
    /// The URL pods fetch checkouts from (`http://<fetch_listen>` by default, with
    /// `advertise_host` for an unspecified address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_url: Option<String>,
    /// `expose = "route"`: the domain of the Routes' host names
    /// (`<name>.<route_domain>`); absent: the host OpenShift gives each Route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_domain: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            namespace: None,
            image: default_image(),
            image_pull_policy: default_pull_policy(),
            expose: Expose::default(),
            host_network: false,
            memory: default_k8s_memory(),
            cpu: default_k8s_cpu(),
            run_as_user: default_k8s_run_as_user(),
            fetch_listen: None,
            fetch_url: None,
            route_domain: None,
        }
    }
}

/// How the router reaches a pod.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expose {
    /// The pod's IP and the service's port (the node's IP and the chosen port with
    /// `host_network`).
    #[default]
    PodIp,
    /// A NodePort Service per instance, on the pod's node.
    Nodeport,
    /// An OpenShift Route per instance, over HTTPS (edge termination).
    Route,
}

/// `namespace = "per-sandbox"`.
pub const PER_SANDBOX: &str = "per-sandbox";

/// The fetch server's port when `fetch_listen` is not set.
pub const DEFAULT_FETCH_PORT: u16 = 9180;

fn default_pull_policy() -> String {
    "IfNotPresent".to_owned()
}
fn default_k8s_memory() -> String {
    "512Mi".to_owned()
}
fn default_k8s_cpu() -> String {
    "500m".to_owned()
}
fn default_k8s_run_as_user() -> i64 {
    65534
}

impl KubernetesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(namespace) = &self.namespace
            && namespace != PER_SANDBOX
            && !is_dns_label(namespace)
        {
            return Err(format!(
                "`kubernetes.namespace` must be a namespace's name (lowercase letters, digits and `-`, at most 63) or \"per-sandbox\", not {namespace:?}"
            ));
        }
        if self.image.trim().is_empty() {
            return Err("`kubernetes.image` must name an image".into());
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "IfNotPresent" | "Always" | "Never"
        ) {
            return Err(format!(
                "`kubernetes.image_pull_policy` must be IfNotPresent, Always or Never, not {:?}",
                self.image_pull_policy
            ));
        }
        for (key, value) in [("memory", &self.memory), ("cpu", &self.cpu)] {
            if !is_quantity(value) {
                return Err(format!(
                    "`kubernetes.{key}` must be a Kubernetes quantity like \"512Mi\" or \"500m\", not {value:?}"
                ));
            }
        }
        if self.run_as_user <= 0 {
            return Err(
                "`kubernetes.run_as_user` must be a uid above 0: instances never run as root"
                    .into(),
            );
        }
        if let Some(url) = &self.fetch_url {
            let parsed = url::Url::parse(url).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.query().is_none()
                    && u.username().is_empty()
            });
            if parsed.is_none() {
                return Err(format!(
                    "`kubernetes.fetch_url` must be an http:// URL of the agent's fetch server, without credentials or query, not {url:?}"
                ));
            }
        }
        if let Some(domain) = &self.route_domain
            && (domain.is_empty() || !domain.split('.').all(is_dns_label))
        {
            return Err(format!(
                "`kubernetes.route_domain` must be a DNS domain, not {domain:?}"
            ));
        }
        Ok(())
    }
}

/// A DNS label as Kubernetes names take it (RFC 1123).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes quantity: a decimal number with an optional suffix (`512Mi`, `0.5`, `500m`).
fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "m", "k", "M", "G", "T", "P", "E", "",
    ];
    SUFFIXES.iter().any(|suffix| {
        s.strip_suffix(suffix).is_some_and(|number| {
            let mut parts = number.splitn(2, '.');
            let whole = parts.next().unwrap_or("");
            let fraction = parts.next();
            !number.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
                && number.bytes().any(|b| b.is_ascii_digit())
        })
    })
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DockerConfig {
    #[serde(default = "default_image")]
    pub image: String,
    /// A tarball of `docker save` loaded into the engine when it lacks `image` (hosts with no
    /// registry): at start, and again when a deploy finds the image gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_archive: Option<PathBuf>,
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
            image_archive: None,
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
    /// Peers (CIDRs, e.g. `127.0.0.1/32` for nginx on this host) whose `X-Forwarded-For`,
    /// `-Proto` and `-Host` are kept; from anyone else they are replaced. None by default.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Where the router's `GET /metrics` is served (Prometheus text); none: not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl GatewayConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            connect_timeout: default_connect_timeout(),
            upstream_timeout: default_upstream_timeout(),
            trusted_proxies: Vec::new(),
            metrics_listen: None,
        }
    }

    /// `trusted_proxies` parsed; a bare address is a network of that one address.
    pub fn trusted_proxies(&self) -> Result<Vec<IpNet>, String> {
        self.trusted_proxies
            .iter()
            .map(|raw| {
                raw.trim()
                    .parse::<IpNet>()
                    .or_else(|_| raw.trim().parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        format!(
                            "`gateway.trusted_proxies`: {raw:?} is not an address or a network like \"127.0.0.1/32\""
                        )
                    })
            })
            .collect()
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
fn default_max_builds() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
fn default_true() -> bool {
    true
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

/// Environment variables are strings: a number key accepts `SDP_DOCKER__CPUS=0.5` or
/// `SDP_MAX_BUILDS=4` too.
fn number_or_string<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Number(T),
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

/// A switch from the environment (`SDP_INSECURE=true`, as a container's settings give it)
/// is a string.
fn bool_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(b) => Ok(b),
        Raw::Text(t) => match t.trim() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(serde::de::Error::custom(format!(
                "{t:?} is not true or false"
            ))),
        },
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), String> {
        check_server(&self.server, self.insecure, self.ca_file.is_some())?;
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
        if self.max_builds == 0 {
            return Err("`max_builds` must be at least 1".into());
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
        if let Some(g) = &self.gateway {
            g.trusted_proxies()?;
        }
        if let Some(k) = &self.kubernetes {
            k.validate()?;
        }
        if self.runtime == Runtime::Kubernetes && self.role == Role::Gateway {
            return Err("`runtime = \"kubernetes\"` is for micro agents: a gateway agent runs sandboxes' own API gateways with `docker` or `process`".into());
        }
        Ok(())
    }
}

/// `server` is a `ws://` or `wss://` URL, and plain `ws://` goes to this host only, unless
/// `insecure`: deploy jobs carry users' passwords, which anyone on the way could read.
fn check_server(server: &str, insecure: bool, ca_file: bool) -> Result<(), String> {
    let url = url::Url::parse(server)
        .ok()
        .filter(|u| matches!(u.scheme(), "ws" | "wss") && u.host().is_some())
        .ok_or_else(|| {
            format!(
                "`server` must be a ws:// or wss:// URL of the control plane's /ws/agent, not {server:?}"
            )
        })?;
    if url.scheme() == "wss" {
        return Ok(());
    }
    if ca_file {
        return Err(
            "`ca_file` is set, but `server` is a ws:// URL, which has no TLS: use wss://".into(),
        );
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.to_canonical().is_loopback(),
        None => false,
    };
    if loopback || insecure {
        return Ok(());
    }
    Err(format!(
        "`server` is {server:?}: plain ws:// to another host would carry deploy jobs, which hold users' passwords, readable on the network; use wss:// (with `ca_file` for a private CA), or set `insecure = true` if only SDP can read this network"
    ))
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

    fn agent(server: &str) -> AgentConfig {
        sdp_config::load(
            None,
            [
                ("SDP_SERVER".to_owned(), server.to_owned()),
                ("SDP_TOKEN".to_owned(), "t".to_owned()),
                ("SDP_ROLE".to_owned(), "micro".to_owned()),
            ],
        )
        .unwrap()
        .config
    }

    #[test]
    fn switches_from_the_environment_are_read_as_booleans() {
        let load = |value: &str| {
            sdp_config::load::<AgentConfig>(
                None,
                [
                    ("SDP_SERVER".to_owned(), "ws://10.1.2.3/ws/agent".to_owned()),
                    ("SDP_TOKEN".to_owned(), "t".to_owned()),
                    ("SDP_ROLE".to_owned(), "micro".to_owned()),
                    ("SDP_INSECURE".to_owned(), value.to_owned()),
                    ("SDP_ALLOW_ROOT_BUILDS".to_owned(), value.to_owned()),
                ],
            )
        };
        let on = load("true").unwrap().config;
        assert!(on.insecure && on.allow_root_builds);
        let off = load("false").unwrap().config;
        assert!(!off.insecure && !off.allow_root_builds);
        let refusal = load("yes").unwrap_err().to_string();
        assert!(
            refusal.contains("\"yes\" is not true or false"),
            "{refusal}"
        );
    }

    #[test]
    fn plain_ws_goes_only_to_this_host_unless_insecure() {
        for local in [
            "ws://127.0.0.1:8080/ws/agent",
            "ws://127.1.2.3/ws/agent",
            "ws://localhost:8080/ws/agent",
            "ws://LOCALHOST/ws/agent",
            "ws://[::1]:8080/ws/agent",
            "wss://10.1.2.3/ws/agent",
            "wss://sdp.example.com/ws/agent",
        ] {
            assert_eq!(agent(local).validate(), Ok(()), "{local}");
        }
        for remote in [
            "ws://10.1.2.3:8080/ws/agent",
            "ws://sdp.example.com/ws/agent",
            "ws://localhost.example.com/ws/agent",
            "ws://[::2]/ws/agent",
        ] {
            let mut config = agent(remote);
            let refusal = config.validate().unwrap_err();
            assert!(
                refusal.contains("passwords") && refusal.contains("insecure"),
                "{refusal}"
            );
            config.insecure = true;
            assert_eq!(config.validate(), Ok(()), "{remote}");
        }
        for bad in ["http://127.0.0.1/ws/agent", "127.0.0.1:8080", "ws://"] {
            assert!(
                agent(bad)
                    .validate()
                    .unwrap_err()
                    .contains("ws:// or wss://"),
                "{bad}"
            );
        }
        let mut config = agent("ws://127.0.0.1/ws/agent");
        config.ca_file = Some("ca.pem".into());
        assert!(config.validate().unwrap_err().contains("wss://"));
    }

    #[test]
    fn the_kubernetes_runtime_needs_a_usable_table_and_says_which_key_is_wrong() {
        let load = |table: &str| {
            let config: AgentConfig = toml::from_str(&format!(
                "server = \"ws://127.0.0.1/ws/agent\"\ntoken = \"t\"\nrole = \"micro\"\nruntime = \"kubernetes\"\n{table}"
            ))
            .unwrap();
            config.validate().map(|()| config)
        };
        // No table: every default, the namespace the kubeconfig's (or the pod's).
        assert!(load("").unwrap().kubernetes.is_none());
        let config = load("[kubernetes]\nnamespace = \"sdp-sandboxes\"\n").unwrap();
        let k = config.kubernetes.unwrap();
        assert_eq!(
            (k.expose, k.host_network, k.memory.as_str(), k.cpu.as_str()),
            (Expose::PodIp, false, "512Mi", "500m")
        );
        assert_eq!(
            format!("{:?}", KubernetesConfig::default()),
            format!("{:?}", load("[kubernetes]\n").unwrap().kubernetes.unwrap())
        );
        assert!(load("[kubernetes]\nnamespace = \"per-sandbox\"\nexpose = \"route\"\n").is_ok());
        for (line, key) in [
            ("namespace = \"Sandboxes_1\"", "`kubernetes.namespace`"),
            (
                "namespace = \"ns\"\nmemory = \"lots\"",
                "`kubernetes.memory`",
            ),
            ("namespace = \"ns\"\ncpu = \"1.\"", "`kubernetes.cpu`"),
            (
                "namespace = \"ns\"\nrun_as_user = 0",
                "`kubernetes.run_as_user`",
            ),
            (
                "namespace = \"ns\"\nimage_pull_policy = \"Sometimes\"",
                "`kubernetes.image_pull_policy`",
            ),
            (
                "namespace = \"ns\"\nfetch_url = \"http://u:p@host:1\"",
                "`kubernetes.fetch_url`",
            ),
            (
                "namespace = \"ns\"\nroute_domain = \"apps..example\"",
                "`kubernetes.route_domain`",
            ),
        ] {
            let refusal = load(&format!("[kubernetes]\n{line}\n")).unwrap_err();
            assert!(refusal.contains(key), "{line}: {refusal}");
        }
        for quantity in ["512Mi", "1Gi", "0.5", "500m", "2"] {
            assert!(is_quantity(quantity), "{quantity}");
        }
        for quantity in ["", "Mi", "1.5.2", "-1", "1 Gi", "1.", "5x"] {
            assert!(!is_quantity(quantity), "{quantity}");
        }
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses_and_a_bad_one_is_named() {
        let mut gateway = GatewayConfig::new("127.0.0.1:0".parse().unwrap());
        gateway.trusted_proxies = vec!["127.0.0.1/32".into(), "10.0.0.0/8".into(), "::1".into()];
        let nets = gateway.trusted_proxies().unwrap();
        assert!(nets[0].contains(&"127.0.0.1".parse::<IpAddr>().unwrap()));
        assert!(nets[1].contains(&"10.9.8.7".parse::<IpAddr>().unwrap()));
        assert!(nets[2].contains(&"::1".parse::<IpAddr>().unwrap()));
        let mut config = agent("ws://127.0.0.1/ws/agent");
        config.role = Role::Gateway;
        gateway.trusted_proxies.push("10.0.0.0/33".into());
        config.gateway = Some(gateway);
        let refusal = config.validate().unwrap_err();
        assert!(
            refusal.contains("`gateway.trusted_proxies`") && refusal.contains("10.0.0.0/33"),
            "{refusal}"
        );
    }
}
