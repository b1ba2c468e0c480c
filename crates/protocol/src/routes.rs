//! What the control plane tells the gateway agent to route, and what the router reports of
//! the requests it routed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{SandboxName, ServiceName};

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
}

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RouteKind {
    Sandbox,
    Baseline,
}

impl RouteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Sandbox => "sandbox",
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
