//! What the control plane tells the gateway agent to route, and what the router reports of
//! the requests it routed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{InstanceState, SandboxName, ServiceName};

/// Everything the router needs, whole: it replaces the previous table at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// Grows with each table a control plane sends: jobs run side by side on an agent, and
    /// an older table arriving after a newer one on the same connection is ignored.
    #[serde(default)]
    pub generation: u64,
    /// `Host: <sandbox>.<base_domain>` names a sandbox.
    pub base_domain: String,
    /// The catalog: which path prefixes go to which service, and its baseline.
    pub services: Vec<ServiceRoutes>,
    /// Every live sandbox, also those with nothing running yet: a sandbox missing here is
    /// unknown, and requests naming it get a 404.
    pub sandboxes: Vec<SandboxRoutes>,
    /// How long the router holds a request for a sleeping sandbox before it answers 503 with
    /// `Retry-After` (server config `wake_timeout`).
    #[serde(default = "default_wake_timeout_ms")]
    pub wake_timeout_ms: u64,
}

fn default_wake_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRoutes {
    pub service: ServiceName,
    /// Path prefixes, each starting with `/`.
    pub routes: Vec<String>,
    /// The shared environment's URL of the service (`http://` or `https://`).
    pub baseline: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRoutes {
    pub sandbox: SandboxName,
    /// The services this sandbox runs, and where (`host:port`).
    pub upstreams: BTreeMap<ServiceName, String>,
    /// Services of this sandbox whose instance cannot serve now (crashed, unhealthy,
    /// restarting): requests for them get 503 `instance_down` with the state, not the
    /// baseline and not a bare 502.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub down: BTreeMap<ServiceName, crate::InstanceState>,
    /// The sandbox sleeps: a request for it is held while the router asks the control plane
    /// to wake it (`wake`), until a table says it is awake, up to `wake_timeout_ms`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sleeping: bool,
    /// The sandbox runs its own copy of the company's API gateway (a catalog service of
    /// `kind = "gateway"`): once that service has an upstream (or is down), every request
    /// for the sandbox goes to it, and it routes by the table the gateway agent writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<ServiceName>,
}

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    Sandbox,
    Baseline,
    /// To the sandbox's own API gateway, which routes it on.
    Gateway,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Sandbox => "sandbox",
            RouteKind::Baseline => "baseline",
            RouteKind::Gateway => "gateway",
        }
    }

    /// What `X-SDP-Route` says (SPEC §5: `sandbox` or `baseline`): a request handed to the
    /// sandbox's gateway went to one of the sandbox's instances.
    pub fn header_value(self) -> &'static str {
        match self {
            RouteKind::Sandbox | RouteKind::Gateway => "sandbox",
            RouteKind::Baseline => "baseline",
        }
    }
}

/// One request the router routed for a sandbox, as the route inspector shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RouteDecision {
    #[serde(with = "time::serde::rfc3339")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = DateTime))]
    pub time: OffsetDateTime,
    pub method: String,
    /// The path without its query, which may hold secrets.
    pub path: String,
    /// The service whose route matched; none when no route did.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, required = true))]
    pub service: Option<ServiceName>,
    pub route: RouteKind,
    /// Where it was sent; none when the router answered itself.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub upstream: Option<String>,
    /// The status the client got.
    pub status: u16,
    /// Until the response's head was back.
    pub duration_ms: f64,
}

/// What a sandbox's own API gateway is told to route (SPEC §5): written to its `routes_file`
/// before it starts and again on every change of the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRoutes {
    pub sandbox: SandboxName,
    /// The route table generation this was made from.
    pub generation: u64,
    /// Longest prefix first.
    pub routes: Vec<GatewayRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRoute {
    pub prefix: String,
    pub service: ServiceName,
    /// `sandbox` (one of the sandbox's instances) or `baseline`.
    pub target: RouteKind,
    /// A base URL; none for a sandbox's service whose instance is down (see `state`).
    pub upstream: Option<String>,
    /// Why a sandbox's service has no upstream now (`crashed`, `unhealthy`, `sleeping`): the
    /// gateway should answer 503, as the built-in router does, not the baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<InstanceState>,
}

impl GatewayRoutes {
    /// The same routes, whatever the generation: whether the file must be written again.
    pub fn same_routes(&self, other: &GatewayRoutes) -> bool {
        self.sandbox == other.sandbox && self.routes == other.routes
    }
}

impl RouteTable {
    /// What `sandbox`'s gateway routes by this table: every catalog route, to the sandbox's
    /// instance of its service when it runs one, else to the service's baseline (services
    /// without a baseline and the gateway services themselves are left out). `None` when the
    /// table does not hold the sandbox.
    pub fn gateway_routes(&self, sandbox: &SandboxName) -> Option<GatewayRoutes> {
        let entry = self.sandboxes.iter().find(|s| &s.sandbox == sandbox)?;
        let mut routes = Vec::new();
        for service in &self.services {
            let (target, upstream, state) = match (
                entry.upstreams.get(&service.service),
                entry.down.get(&service.service),
            ) {
                (Some(address), _) => (RouteKind::Sandbox, Some(format!("http://{address}")), None),
                (None, Some(state)) => (RouteKind::Sandbox, None, Some(*state)),
                (None, None) if !service.baseline.trim().is_empty() => (
                    RouteKind::Baseline,
                    Some(service.baseline.trim().trim_end_matches('/').to_owned()),
                    None,
                ),
                (None, None) => continue,
            };
            for prefix in &service.routes {
                routes.push(GatewayRoute {
                    prefix: prefix.clone(),
                    service: service.service.clone(),
                    target,
                    upstream: upstream.clone(),
                    state,
                });
            }
        }
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then_with(|| a.prefix.cmp(&b.prefix))
        });
        Some(GatewayRoutes {
            sandbox: sandbox.clone(),
            generation: self.generation,
            routes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::parse(s).unwrap()
    }

    #[test]
    fn a_gateway_routes_its_sandboxs_services_to_instances_and_the_rest_to_baselines_longest_prefix_first()
     {
        let catalog = |service: &str, routes: &[&str], baseline: &str| ServiceRoutes {
            service: name(service),
            routes: routes.iter().map(|r| (*r).to_owned()).collect(),
            baseline: baseline.to_owned(),
        };
        let sandbox = SandboxName::parse("demo").unwrap();
        let table = RouteTable {
            generation: 7,
            base_domain: "sandbox.test".into(),
            services: vec![
                catalog("orders", &["/orders"], "https://orders.example/"),
                catalog(
                    "payments",
                    &["/payments", "/payments/refunds"],
                    "https://pay.example",
                ),
                catalog("billing", &["/billing"], "http://billing.example"),
                catalog("nobase", &["/nobase"], ""),
                catalog("api-gateway", &[], ""),
            ],
            sandboxes: vec![SandboxRoutes {
                sandbox: sandbox.clone(),
                upstreams: BTreeMap::from([
                    (name("orders"), "10.0.0.5:20001".to_owned()),
                    (name("api-gateway"), "10.0.0.1:20002".to_owned()),
                ]),
                down: BTreeMap::from([(name("billing"), InstanceState::Crashed)]),
                sleeping: false,
                gateway: Some(name("api-gateway")),
            }],
            wake_timeout_ms: 1000,
        };
        let doc = table.gateway_routes(&sandbox).unwrap();
        assert_eq!(doc.generation, 7);
        let got: Vec<(&str, &str, Option<&str>, Option<InstanceState>)> = doc
            .routes
            .iter()
            .map(|r| {
                (
                    r.prefix.as_str(),
                    r.target.as_str(),
                    r.upstream.as_deref(),
                    r.state,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "/payments/refunds",
                    "baseline",
                    Some("https://pay.example"),
                    None
                ),
                ("/payments", "baseline", Some("https://pay.example"), None),
                ("/billing", "sandbox", None, Some(InstanceState::Crashed)),
                ("/orders", "sandbox", Some("http://10.0.0.5:20001"), None),
            ]
        );
        assert!(
            table
                .gateway_routes(&SandboxName::parse("other").unwrap())
                .is_none()
        );
        let json = serde_json::to_value(&doc.routes[3]).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"prefix": "/orders", "service": "orders", "target": "sandbox", "upstream": "http://10.0.0.5:20001"})
        );
    }
}
