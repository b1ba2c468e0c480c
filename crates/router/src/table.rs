//! A route table compiled for lookups: which sandbox a request names, which service its path
//! belongs to, and where it goes. Pure functions, no IO.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme, Uri};
use sdp_protocol::{InstanceState, RouteKind, RouteTable, ServiceName};

/// The header that names a sandbox, and that the router passes upstream. Header names are
/// made once: a lookup by `&str` parses the name on every request.
pub const SANDBOX_HEADER: HeaderName = HeaderName::from_static("x-sdp-sandbox");
/// The W3C baggage member that names a sandbox.
pub const BAGGAGE_KEY: &str = "sdp-sandbox";
const BAGGAGE: HeaderName = HeaderName::from_static("baggage");

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("service {service}: route {route:?} must start with '/'")]
    BadRoute { service: String, route: String },
    #[error("route {route:?} is claimed by both {first} and {second}")]
    DuplicateRoute {
        route: String,
        first: String,
        second: String,
    },
    #[error("service {service}: baseline {url:?}: {reason}")]
    BadBaseline {
        service: String,
        url: String,
        reason: String,
    },
    #[error("sandbox {sandbox}: service {service} is not in the catalog")]
    UnknownService { sandbox: String, service: String },
    #[error("sandbox {sandbox}: upstream {upstream:?} of {service} is not host:port")]
    BadUpstream {
        sandbox: String,
        service: String,
        upstream: String,
    },
}

/// The table's maps are read on every request with keys the table itself holds (prefixes,
/// sandbox names): a fast hash pays, and there is no adversary to resist at insertion.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where requests can be sent: scheme, authority and a base path to put before theirs.
#[derive(Debug, Clone)]
pub struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// Empty, or a path without a trailing `/`.
    base_path: String,
    /// How errors and the inspector name it.
    label: String,
    /// `scheme://authority`: requests with the same key share connections.
    key: String,
    /// The `Host` it is sent: OpenShift routes by it.
    host: HeaderValue,
}

impl Upstream {
    /// A baseline URL: `http(s)://host[:port][/base]`, nothing else.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL ({e})"))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .ok_or("the scheme must be http or https")?
            .clone();
        let authority = uri.authority().ok_or("no host")?.clone();
        if authority.as_str().contains('@') {
            return Err("credentials do not belong in a baseline URL".into());
        }
        if uri.query().is_some() {
            return Err("a baseline URL has no query".into());
        }
        Ok(Self {
            key: format!("{scheme}://{authority}"),
            host: host_value(&authority)?,
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            label: url.to_owned(),
        })
    }

    /// An instance's `host:port`, reached over plain HTTP.
    pub fn from_host_port(address: &str) -> Result<Self, String> {
        let authority: Authority = address.parse().map_err(|e| format!("{e}"))?;
        if authority.port_u16().is_none() || authority.as_str().contains('@') {
            return Err("not host:port".into());
        }
        Ok(Self {
            key: format!("http://{authority}"),
            host: host_value(&authority)?,
            scheme: Scheme::HTTP,
            authority,
            base_path: String::new(),
            label: address.to_owned(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }

    /// The host, without the brackets of an IPv6 address: what TLS checks the certificate
    /// against.
    pub fn host_name(&self) -> &str {
        self.authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Empty, or the path put before every request's, without a trailing `/`.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// `host:port` to connect to, the scheme's port when the URL names none.
    pub fn socket_address(&self) -> String {
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.is_https() { 443 } else { 80 });
        format!("{}:{port}", self.authority.host())
    }

    /// The origin-form target (`/base/path?query`) to request `path_and_query` at.
    pub fn target(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, hyper::http::Error> {
        let path = match (self.base_path.is_empty(), path_and_query) {
            (true, Some(pq)) => pq.clone(),
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let tail = pq.map_or("/", PathAndQuery::as_str);
                format!("{}{tail}", self.base_path).parse()?
            }
        };
        Ok(Uri::from(path))
    }
}

fn host_value(authority: &Authority) -> Result<HeaderValue, String> {
    HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())
}

#[derive(Debug)]
pub struct Service {
    pub name: ServiceName,
    /// None: only sandboxes serve it (`sdp dev`'s demo services, say).
    pub baseline: Option<Upstream>,
}

/// One sandbox of the table.
#[derive(Debug, Default)]
pub struct Sandbox {
    /// By service index.
    upstreams: FastMap<usize, Upstream>,
    /// Services whose instance cannot serve now, by service index.
    down: FastMap<usize, InstanceState>,
    /// Its requests are held until a table says it is awake.
    sleeping: bool,
    /// The index of its own API gateway, when it runs one (placed: up or down): every request
    /// of the sandbox goes there, whatever its path.
    gateway: Option<usize>,
    /// Set when a request for it is routed; shared by every thread's table and by the tables
    /// that follow while the sandbox stays in them, and cleared by [`Activity::take`].
    active: Arc<AtomicBool>,
}

impl Sandbox {
    pub fn sleeping(&self) -> bool {
        self.sleeping
    }

    /// Notes that a request for this sandbox was routed. Read before written: once set, the
    /// threads only read the flag, and its cache line is not passed between them.
    pub fn mark_active(&self) {
        if !self.active.load(Ordering::Relaxed) {
            self.active.store(true, Ordering::Relaxed);
        }
    }
}

/// Which sandboxes had requests routed since last asked: one flag per sandbox, by name, made
/// when a table first holds the sandbox. Requests touch only their sandbox's flag, through
/// the table; the lock is for installs and takers.
#[derive(Debug, Default)]
pub struct Activity {
    flags: Mutex<FastMap<String, Arc<AtomicBool>>>,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<String, Arc<AtomicBool>>> {
        self.flags.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn flag(&self, sandbox: &str) -> Arc<AtomicBool> {
        self.lock().entry(sandbox.to_owned()).or_default().clone()
    }

    /// The sandboxes with requests routed since the last call, sorted; their flags are cleared.
    pub fn take(&self) -> Vec<String> {
        let mut taken: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, flag)| flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::Relaxed))
            .map(|(name, _)| name.clone())
            .collect();
        taken.sort();
        taken
    }

    /// Forgets the sandboxes no longer routed.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| live(name));
    }
}

/// How the request named its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Host,
    Header,
    Baggage,
}

/// What the table says of one request.
#[derive(Debug)]
pub enum Route<'t> {
    /// It names a sandbox the table does not hold.
    UnknownSandbox,
    /// No service's route matches its path.
    NoRoute,
    /// The service is not in the sandbox, and has no baseline.
    NoBaseline { service: &'t Service },
    /// The sandbox runs the service, but its instance cannot serve now.
    Down {
        service: &'t Service,
        state: InstanceState,
    },
    To {
        service: &'t Service,
        upstream: &'t Upstream,
        kind: RouteKind,
    },
}

#[derive(Debug, Default)]
pub struct Table {
    base_domain: String,
    /// How long a request for a sleeping sandbox is held.
    pub wake_timeout: Duration,
    /// Normalized prefix (no trailing `/`, except the root `/`) to service index.
    prefixes: FastMap<String, usize>,
    services: Vec<Service>,
    sandboxes: FastMap<String, Sandbox>,
    /// Sandbox entries left out, for the log.
    pub skipped: Vec<TableError>,
}

/// `/orders/` and `/orders` are one prefix.
fn normalize_prefix(route: &str) -> &str {
    match route.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    }
}

impl Table {
    /// A table with activity flags of its own (tests).
    pub fn compile(table: &RouteTable) -> Result<Self, TableError> {
        Self::compile_with(table, &Activity::default())
    }

    /// A table whose sandboxes note their requests in `activity`.
    pub fn compile_with(table: &RouteTable, activity: &Activity) -> Result<Self, TableError> {
        let mut compiled = Table {
            base_domain: table.base_domain.trim_matches('.').to_ascii_lowercase(),
            wake_timeout: Duration::from_millis(table.wake_timeout_ms),
            ..Table::default()
        };
        let mut index = HashMap::new();
        // The catalog is checked whole: it comes from the control plane's validated config,
        // and a route that cannot be served is an error there.
        for entry in &table.services {
            let i = compiled.services.len();
            let baseline = match entry.baseline.trim() {
                "" => None,
                url => Some(
                    Upstream::from_url(url).map_err(|reason| TableError::BadBaseline {
                        service: entry.service.to_string(),
                        url: entry.baseline.clone(),
                        reason,
                    })?,
                ),
            };
            for route in &entry.routes {
                if !route.starts_with('/') {
                    return Err(TableError::BadRoute {
                        service: entry.service.to_string(),
                        route: route.clone(),
                    });
                }
                let prefix = normalize_prefix(route).to_owned();
                if let Some(&other) = compiled.prefixes.get(&prefix)
                    && other != i
                {
                    return Err(TableError::DuplicateRoute {
                        route: prefix,
                        first: compiled.services[other].name.to_string(),
                        second: entry.service.to_string(),
                    });
                }
                compiled.prefixes.insert(prefix, i);
            }
            index.insert(entry.service.clone(), i);
            compiled.services.push(Service {
                name: entry.service.clone(),
                baseline,
            });
        }
        for sandbox in &table.sandboxes {
            let mut upstreams = FastMap::default();
            for (service, address) in &sandbox.upstreams {
                // One bad entry must not cost every other sandbox its routes: it is left out,
                // and its requests go to the baseline.
                let Some(&i) = index.get(service) else {
                    compiled.skipped.push(TableError::UnknownService {
                        sandbox: sandbox.sandbox.to_string(),
                        service: service.to_string(),
                    });
                    continue;
                };
                // An instance behind an OpenShift Route is reached by its `https://` URL.
                let parsed = if address.starts_with("https://") {
                    Upstream::from_url(address)
                } else {
                    Upstream::from_host_port(address)
                };
                match parsed {
                    Ok(upstream) => {
                        upstreams.insert(i, upstream);
                    }
                    Err(_) => compiled.skipped.push(TableError::BadUpstream {
                        sandbox: sandbox.sandbox.to_string(),
                        service: service.to_string(),
                        upstream: address.clone(),
                    }),
                }
            }
            // A service down is the sandbox's all the same: its requests never fall back to the
            // baseline, which would answer for code the user did not deploy.
            let down: FastMap<usize, InstanceState> = sandbox
                .down
                .iter()
                .filter(|(service, state)| {
                    !state.serves() && !sandbox.upstreams.contains_key(*service)
                })
                .filter_map(|(service, state)| Some((*index.get(service)?, *state)))
                .collect();
            let gateway = sandbox
                .gateway
                .as_ref()
                .and_then(|service| index.get(service).copied())
                .filter(|i| upstreams.contains_key(i) || down.contains_key(i));
            compiled.sandboxes.insert(
                sandbox.sandbox.to_string(),
                Sandbox {
                    upstreams,
                    down,
                    gateway,
                    sleeping: sandbox.sleeping,
                    active: activity.flag(sandbox.sandbox.as_str()),
                },
            );
        }
        Ok(compiled)
    }

    pub fn has_sandbox(&self, name: &str) -> bool {
        self.sandboxes.contains_key(name)
    }

    pub fn sandbox(&self, name: &str) -> Option<&Sandbox> {
        self.sandboxes.get(name)
    }

    /// The service whose longest route prefix matches `path` on a segment boundary:
    /// `/orders` matches `/orders`, `/orders/` and `/orders/1`, never `/ordersx`.
    pub fn service_for(&self, path: &str) -> Option<&Service> {
        self.service_index(path).map(|i| &self.services[i])
    }

    fn service_index(&self, path: &str) -> Option<usize> {
        // Walks up the path one segment at a time: as many lookups as the path has segments,
        // however many routes there are.
        let mut candidate = path.trim_end_matches('/');
        loop {
            if candidate.is_empty() {
                break;
            }
            if let Some(&i) = self.prefixes.get(candidate) {
                return Some(i);
            }
            match candidate.rfind('/') {
                Some(slash) => candidate = candidate[..slash].trim_end_matches('/'),
                None => break,
            }
        }
        self.prefixes.get("/").copied()
    }

    /// The sandbox a request names, first match wins: the `Host` (`<sandbox>.<base_domain>`),
    /// the `X-SDP-Sandbox` header, the baggage member `sdp-sandbox`.
    pub fn sandbox_of(&self, host: Option<&str>, headers: &HeaderMap) -> Option<(String, Source)> {
        self.sandbox_named(
            host,
            headers.get(&SANDBOX_HEADER).and_then(|v| v.to_str().ok()),
            headers
                .get_all(&BAGGAGE)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
    }

    /// [`Table::sandbox_of`] from the fields' values: the first `X-SDP-Sandbox`, and every
    /// `baggage` (the fast path reads them from the request's bytes, with no `HeaderMap`).
    pub fn sandbox_named<'v>(
        &self,
        host: Option<&str>,
        header: Option<&str>,
        mut baggage: impl Iterator<Item = &'v str>,
    ) -> Option<(String, Source)> {
        if let Some(name) = host.and_then(|h| self.sandbox_of_host(h)) {
            return Some((name, Source::Host));
        }
        if let Some(name) = header.map(str::trim).filter(|v| !v.is_empty()) {
            return Some((name.to_ascii_lowercase(), Source::Header));
        }
        baggage
            .find_map(baggage_sandbox)
            .map(|name| (name.to_ascii_lowercase(), Source::Baggage))
    }

    fn sandbox_of_host(&self, host: &str) -> Option<String> {
        if self.base_domain.is_empty() || host.starts_with('[') {
            return None;
        }
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let host = host.trim_end_matches('.');
        // Compared in place: most requests name no sandbox by Host, and pay no allocation.
        let split = host.len().checked_sub(self.base_domain.len() + 1)?;
        let (label, domain) = host.split_at_checked(split)?;
        let domain = domain.strip_prefix('.')?;
        (!label.is_empty() && domain.eq_ignore_ascii_case(&self.base_domain))
            .then(|| label.to_ascii_lowercase())
    }

    /// Where a request for `path`, naming `sandbox` or none, goes.
    pub fn route(&self, sandbox: Option<&str>, path: &str) -> Route<'_> {
        match sandbox {
            Some(name) => match self.sandboxes.get(name) {
                Some(s) => self.route_in(Some(s), path),
                None => Route::UnknownSandbox,
            },
            None => self.route_in(None, path),
        }
    }

    /// Where a request for `path` goes, in `sandbox` (found by [`Table::sandbox`]) or none.
    pub fn route_in<'t>(&'t self, sandbox: Option<&'t Sandbox>, path: &str) -> Route<'t> {
        if let Some(s) = sandbox
            && let Some(i) = s.gateway
        {
            let service = &self.services[i];
            return match (s.upstreams.get(&i), s.down.get(&i)) {
                (Some(upstream), _) => Route::To {
                    service,
                    upstream,
                    kind: RouteKind::Gateway,
                },
                (None, Some(&state)) => Route::Down { service, state },
                // Compiled only when placed.
                (None, None) => Route::NoBaseline { service },
            };
        }
        let Some(i) = self.service_index(path) else {
            return Route::NoRoute;
        };
        let service = &self.services[i];
        if let Some(&state) = sandbox.and_then(|s| s.down.get(&i)) {
            return Route::Down { service, state };
        }
        match sandbox.and_then(|s| s.upstreams.get(&i)) {
            Some(upstream) => Route::To {
                service,
                upstream,
                kind: RouteKind::Sandbox,
            },
            None => match &service.baseline {
                Some(upstream) => Route::To {
                    service,
                    upstream,
                    kind: RouteKind::Baseline,
                },
                None => Route::NoBaseline { service },
            },
        }
    }
}

/// The `sdp-sandbox` member of one `baggage` header value (W3C Baggage: comma-separated
/// `key=value;properties`, whitespace allowed around each, values percent-encoded).
pub fn baggage_sandbox(value: &str) -> Option<String> {
    value.split(',').find_map(|member| {
        let pair = member.split(';').next()?;
        let (key, value) = pair.split_once('=')?;
        if key.trim() != BAGGAGE_KEY {
            return None;
        }
        let value = percent_decode(value.trim())?;
        (!value.is_empty()).then_some(value)
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use hyper::header::HeaderValue;
    use proptest::prelude::*;
    use sdp_protocol::{SandboxName, SandboxRoutes, ServiceRoutes};

    use super::*;

    fn service(name: &str, routes: &[&str]) -> ServiceRoutes {
        ServiceRoutes {
            service: ServiceName::parse(name).unwrap(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
            baseline: format!("http://{name}.baseline.test"),
        }
    }

    fn table() -> Table {
        Table::compile(&RouteTable {
            generation: 1,
            wake_timeout_ms: 60_000,
            base_domain: "sandbox.example.com".into(),
            services: vec![
                service("orders", &["/orders"]),
                service("items", &["/orders/items/"]),
                service("web", &["/"]),
            ],
            sandboxes: vec![SandboxRoutes {
                sandbox: SandboxName::parse("pay-42").unwrap(),
                upstreams: BTreeMap::from([(
                    ServiceName::parse("orders").unwrap(),
                    "127.0.0.1:20001".into(),
                )]),
                down: BTreeMap::new(),
                sleeping: false,
                gateway: None,
            }],
        })
        .unwrap()
    }

    fn served_by(table: &Table, path: &str) -> Option<String> {
        table.service_for(path).map(|s| s.name.to_string())
    }

    #[test]
    fn a_prefix_matches_on_segment_boundaries_only() {
        let t = table();
        assert_eq!(served_by(&t, "/orders").as_deref(), Some("orders"));
        assert_eq!(served_by(&t, "/orders/").as_deref(), Some("orders"));
        assert_eq!(served_by(&t, "/orders/1").as_deref(), Some("orders"));
        assert_eq!(served_by(&t, "/ordersx").as_deref(), Some("web"));
        assert_eq!(served_by(&t, "/orders/items").as_deref(), Some("items"));
        assert_eq!(served_by(&t, "/orders/items/9").as_deref(), Some("items"));
        assert_eq!(served_by(&t, "/orders/itemsx").as_deref(), Some("orders"));
        assert_eq!(served_by(&t, "/").as_deref(), Some("web"));
        assert_eq!(served_by(&t, "").as_deref(), Some("web"));
    }

    #[test]
    fn without_a_root_route_an_unmatched_path_has_no_service() {
        let t = Table::compile(&RouteTable {
            services: vec![service("orders", &["/orders"])],
            ..RouteTable::default()
        })
        .unwrap();
        assert_eq!(served_by(&t, "/payments"), None);
        assert_eq!(served_by(&t, "/"), None);
        assert_eq!(served_by(&t, "*"), None);
    }

    #[test]
    fn the_host_names_the_sandbox_before_the_header_and_the_baggage() {
        let t = table();
        let mut headers = HeaderMap::new();
        headers.insert("x-sdp-sandbox", HeaderValue::from_static("from-header"));
        headers.insert(
            "baggage",
            HeaderValue::from_static("a=1, sdp-sandbox = from-baggage ;p"),
        );
        assert_eq!(
            t.sandbox_of(Some("Pay-42.Sandbox.Example.com:8081"), &headers),
            Some(("pay-42".into(), Source::Host))
        );
        assert_eq!(
            t.sandbox_of(Some("sandbox.example.com"), &headers),
            Some(("from-header".into(), Source::Header))
        );
        headers.remove("x-sdp-sandbox");
        assert_eq!(
            t.sandbox_of(Some("elsewhere.test"), &headers),
            Some(("from-baggage".into(), Source::Baggage))
        );
        headers.remove("baggage");
        assert_eq!(t.sandbox_of(Some("[::1]:8081"), &headers), None);
        assert_eq!(t.sandbox_of(None, &headers), None);
    }

    #[test]
    fn baggage_members_are_parsed_as_the_w3c_format_says() {
        assert_eq!(baggage_sandbox("sdp-sandbox=a%2Db").as_deref(), Some("a-b"));
        assert_eq!(
            baggage_sandbox("k=v,sdp-sandbox=x;ttl=1").as_deref(),
            Some("x")
        );
        assert_eq!(baggage_sandbox("not-sdp-sandbox=x"), None);
        assert_eq!(baggage_sandbox("sdp-sandbox="), None);
        assert_eq!(baggage_sandbox("sdp-sandbox=%zz"), None);
    }

    #[test]
    fn a_sandbox_gets_its_own_services_and_the_baseline_for_the_rest() {
        let t = table();
        match t.route(Some("pay-42"), "/orders/1") {
            Route::To { upstream, kind, .. } => {
                assert_eq!(kind, RouteKind::Sandbox);
                assert_eq!(upstream.label(), "127.0.0.1:20001");
            }
            other => panic!("{other:?}"),
        }
        match t.route(Some("pay-42"), "/orders/items/1") {
            Route::To { upstream, kind, .. } => {
                assert_eq!(kind, RouteKind::Baseline);
                assert_eq!(upstream.label(), "http://items.baseline.test");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.route(Some("nope"), "/orders"),
            Route::UnknownSandbox
        ));
        match t.route(None, "/orders/1") {
            Route::To { kind, .. } => assert_eq!(kind, RouteKind::Baseline),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_service_whose_instance_is_down_is_refused_and_never_sent_to_the_baseline() {
        let t = Table::compile(&RouteTable {
            base_domain: "sandbox.example.com".into(),
            services: vec![
                service("orders", &["/orders"]),
                service("items", &["/items"]),
                service("web", &["/"]),
            ],
            sandboxes: vec![SandboxRoutes {
                sandbox: SandboxName::parse("pay-42").unwrap(),
                upstreams: BTreeMap::from([(
                    ServiceName::parse("orders").unwrap(),
                    "127.0.0.1:20001".into(),
                )]),
                down: BTreeMap::from([
                    (ServiceName::parse("items").unwrap(), InstanceState::Crashed),
                    // A state that serves is no reason to refuse.
                    (ServiceName::parse("web").unwrap(), InstanceState::Running),
                ]),
                sleeping: false,
                gateway: None,
            }],
            ..RouteTable::default()
        })
        .unwrap();
        match t.route(Some("pay-42"), "/items/1") {
            Route::Down { service, state } => {
                assert_eq!(service.name.as_str(), "items");
                assert_eq!(state, InstanceState::Crashed);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.route(Some("pay-42"), "/orders"),
            Route::To {
                kind: RouteKind::Sandbox,
                ..
            }
        ));
        assert!(matches!(
            t.route(Some("pay-42"), "/"),
            Route::To {
                kind: RouteKind::Baseline,
                ..
            }
        ));
        // Without a sandbox, the baseline as always.
        assert!(matches!(
            t.route(None, "/items/1"),
            Route::To {
                kind: RouteKind::Baseline,
                ..
            }
        ));
    }

    #[test]
    fn a_bad_sandbox_entry_is_left_out_and_the_rest_is_routed() {
        let t = Table::compile(&RouteTable {
            services: vec![
                service("orders", &["/orders"]),
                service("items", &["/items"]),
            ],
            sandboxes: vec![SandboxRoutes {
                sandbox: SandboxName::parse("pay-42").unwrap(),
                upstreams: BTreeMap::from([
                    (
                        ServiceName::parse("orders").unwrap(),
                        "fd00::5:20001".into(),
                    ),
                    (
                        ServiceName::parse("items").unwrap(),
                        "[fd00::5]:20002".into(),
                    ),
                    (ServiceName::parse("gone").unwrap(), "127.0.0.1:1".into()),
                ]),
                down: BTreeMap::new(),
                sleeping: false,
                gateway: None,
            }],
            ..RouteTable::default()
        })
        .unwrap();
        assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
        assert!(matches!(
            t.route(Some("pay-42"), "/orders"),
            Route::To {
                kind: RouteKind::Baseline,
                ..
            }
        ));
        match t.route(Some("pay-42"), "/items") {
            Route::To { upstream, kind, .. } => {
                assert_eq!(kind, RouteKind::Sandbox);
                assert_eq!(upstream.socket_address(), "[fd00::5]:20002");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_instance_behind_an_openshift_route_is_reached_over_https_by_its_host() {
        let t = Table::compile(&RouteTable {
            services: vec![service("orders", &["/orders"])],
            sandboxes: vec![SandboxRoutes {
                sandbox: SandboxName::parse("pay-42").unwrap(),
                upstreams: BTreeMap::from([(
                    ServiceName::parse("orders").unwrap(),
                    "https://sdp-orders-0123456789.apps.ocp.test".into(),
                )]),
                down: BTreeMap::new(),
                sleeping: false,
                gateway: None,
            }],
            ..RouteTable::default()
        })
        .unwrap();
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        match t.route(Some("pay-42"), "/orders/1") {
            Route::To { upstream, kind, .. } => {
                assert_eq!(kind, RouteKind::Sandbox);
                assert!(upstream.is_https());
                assert_eq!(upstream.host(), "sdp-orders-0123456789.apps.ocp.test");
                assert_eq!(
                    upstream.socket_address(),
                    "sdp-orders-0123456789.apps.ocp.test:443"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_tables_are_refused_with_the_reason() {
        let dup = RouteTable {
            services: vec![service("a", &["/x/"]), service("b", &["/x"])],
            ..RouteTable::default()
        };
        assert_eq!(
            Table::compile(&dup).unwrap_err().to_string(),
            "route \"/x\" is claimed by both a and b"
        );
        let mut bad = service("a", &["/x"]);
        bad.baseline = "ftp://x".into();
        let err = Table::compile(&RouteTable {
            services: vec![bad],
            ..RouteTable::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("http or https"), "{err}");
    }

    #[test]
    fn a_baseline_with_a_base_path_keeps_it_before_the_request_path() {
        let up = Upstream::from_url("https://ocp.test/shop/").unwrap();
        let pq: PathAndQuery = "/orders/1?x=2".parse().unwrap();
        assert_eq!(
            up.target(Some(&pq)).unwrap().to_string(),
            "/shop/orders/1?x=2"
        );
        assert_eq!(up.host(), "ocp.test");
        assert_eq!(up.socket_address(), "ocp.test:443");
        assert_eq!(up.key(), "https://ocp.test");
        let up = Upstream::from_host_port("127.0.0.1:20001").unwrap();
        assert_eq!(up.target(Some(&pq)).unwrap().to_string(), "/orders/1?x=2");
        assert_eq!(up.socket_address(), "127.0.0.1:20001");
        assert!(Upstream::from_host_port("127.0.0.1").is_err());
        assert!(Upstream::from_url("http://user:pw@ocp.test").is_err());
    }

    /// The longest route that is the path itself or a prefix of it ending at a `/`: the
    /// definition, written the slow way.
    fn longest_match<'a>(routes: &'a [String], path: &str) -> Option<&'a String> {
        routes
            .iter()
            .filter(|r| {
                let r = normalize_prefix(r);
                r == "/"
                    || path.trim_end_matches('/') == r
                    || (path.starts_with(r) && path.as_bytes().get(r.len()) == Some(&b'/'))
            })
            .max_by_key(|r| normalize_prefix(r).len())
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof!["[a-c]{1,3}", Just("a".to_owned()), Just("ab".to_owned())]
    }

    fn path() -> impl Strategy<Value = String> {
        (prop::collection::vec(segment(), 0..5), any::<bool>()).prop_map(|(segs, slash)| {
            let mut p = format!("/{}", segs.join("/"));
            if slash && p.len() > 1 {
                p.push('/');
            }
            p
        })
    }

    proptest! {
        #[test]
        fn matching_picks_the_longest_prefix_on_a_segment_boundary(
            routes in prop::collection::btree_set(path(), 1..40),
            requests in prop::collection::vec(path(), 1..40),
        ) {
            // One service per distinct normalized route.
            let mut seen = std::collections::BTreeSet::new();
            let routes: Vec<String> = routes
                .into_iter()
                .filter(|r| seen.insert(normalize_prefix(r).to_owned()))
                .collect();
            let services = routes
                .iter()
                .enumerate()
                .map(|(i, r)| service(&format!("s{i}"), &[r]))
                .collect();
            let t = Table::compile(&RouteTable { services, ..RouteTable::default() }).unwrap();
            for request in &requests {
                let expected = longest_match(&routes, request)
                    .map(|r| format!("s{}", routes.iter().position(|x| x == r).unwrap()));
                prop_assert_eq!(served_by(&t, request), expected, "path {}", request);
            }
        }

        #[test]
        fn a_prefix_never_matches_a_longer_segment(name in "[a-z]{1,8}", extra in "[a-z0-9]{1,8}") {
            let t = Table::compile(&RouteTable {
                services: vec![service("s", &[&format!("/{name}")])],
                ..RouteTable::default()
            }).unwrap();
            let path = format!("/{name}{extra}");
            prop_assert!(t.service_for(&path).is_none());
            let path = format!("/{name}/{extra}");
            prop_assert!(t.service_for(&path).is_some());
        }
    }
}
