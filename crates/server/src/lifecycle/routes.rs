//! The route table's one publisher: built from the catalog and the live sandboxes in SQLite,
//! and pushed whole to every gateway agent, which acknowledges it.
//!
//! Every change that moves a route asks this one task to publish. Requests that arrive while
//! a table is on its way are merged: the next table, read after all of them, answers them
//! all. A caller that waits hears "generation N applied", N being the first table that
//! holds its change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{InstanceState, Role, RouteTable, SandboxName, SandboxRoutes, ServiceRoutes};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::{Db, ServiceState};
use crate::dispatch::{Dispatch, Target, call};

/// Requests waiting for the publisher; past this, a request without a waiter is dropped, as
/// the tables still to go read the database after it anyway.
const QUEUE: usize = 256;

/// The number of a table sent to the gateways; each is larger than the one before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl std::fmt::Display for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

struct Request {
    why: &'static str,
    done: Option<oneshot::Sender<Result<Generation, String>>>,
}

/// What the publisher needs to build and send tables.
pub struct RouteSource {
    pub db: Db,
    pub dispatch: Arc<dyn Dispatch>,
    pub base_domain: String,
    pub catalog: Vec<ServiceRoutes>,
    /// The catalog's API gateways (`kind = "gateway"`): a sandbox that runs one has every
    /// request sent to it.
    pub gateway_services: std::collections::HashSet<sdp_protocol::ServiceName>,
    /// How long a gateway agent has to apply a table.
    pub timeout: Duration,
    /// How long the router holds a request for a sleeping sandbox (`wake_timeout`).
    pub wake_timeout: Duration,
}

#[derive(Clone)]
pub struct RoutePublisher {
    requests: mpsc::Sender<Request>,
}

impl RoutePublisher {
    /// Starts the publishing task on `tasks`; it ends when `shutdown` is cancelled.
    pub fn start(source: RouteSource, tasks: &TaskTracker, shutdown: CancellationToken) -> Self {
        let (requests, queue) = mpsc::channel(QUEUE);
        tasks.spawn(publish_loop(source, queue, shutdown));
        Self { requests }
    }

    /// Publishes a table that holds every change made before this call, and waits until
    /// every connected gateway has applied it. The error says, for a person, which did not.
    pub async fn publish(&self, why: &'static str) -> Result<Generation, String> {
        let (done, applied) = oneshot::channel();
        let request = Request {
            why,
            done: Some(done),
        };
        if self.requests.send(request).await.is_err() {
            return Err("the control plane is stopping".into());
        }
        applied
            .await
            .unwrap_or_else(|_| Err("the control plane is stopping".into()))
    }

    /// As [`RoutePublisher::publish`], for changes nobody waits on: a failure is logged, and
    /// the next change or gateway connection sends the whole table again.
    pub fn request(&self, why: &'static str) {
        let _ = self.requests.try_send(Request { why, done: None });
    }
}

async fn publish_loop(
    source: RouteSource,
    mut queue: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) {
    let mut generation = Generation(0);
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            request = queue.recv() => match request {
                Some(request) => request,
                None => return,
            },
        };
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        generation.0 += 1;
        let why: Vec<&str> = batch.iter().map(|r| r.why).collect();
        let result = tokio::select! {
            _ = shutdown.cancelled() => Err("the control plane is stopping".to_owned()),
            result = source.send(generation) => result,
        };
        match &result {
            Ok(()) => tracing::debug!(%generation, ?why, "route table applied"),
            Err(error) => tracing::warn!(%generation, ?why, %error, "route table not applied"),
        }
        for request in batch {
            if let Some(done) = request.done {
                let _ = done.send(result.clone().map(|()| generation));
            }
        }
    }
}

/// How the router is told a service is down, if it is.
fn down_as(state: ServiceState) -> Option<InstanceState> {
    match state {
        ServiceState::Unhealthy => Some(InstanceState::Unhealthy),
        ServiceState::Crashed => Some(InstanceState::Crashed),
        ServiceState::Sleeping => Some(InstanceState::Sleeping),
        ServiceState::Deploying
        | ServiceState::Running
        | ServiceState::Failed
        | ServiceState::Stopped => None,
    }
}

impl RouteSource {
    /// The catalog, and each live sandbox with the upstreams of its running services, the
    /// services whose instance is down (crashed, unhealthy, sleeping), and whether it sleeps
    /// (the router holds its requests and asks for a wake, rather than answering 503).
    async fn table(&self, generation: Generation) -> Result<RouteTable, sqlx::Error> {
        let mut sandboxes: BTreeMap<SandboxName, SandboxRoutes> = BTreeMap::new();
        for live in self.db.live_upstreams().await? {
            let routes = sandboxes
                .entry(live.sandbox.clone())
                .or_insert_with(|| SandboxRoutes {
                    sandbox: live.sandbox,
                    upstreams: BTreeMap::new(),
                    down: BTreeMap::new(),
                    sleeping: live.sleeping,
                    gateway: None,
                });
            // A service dropped from the catalog since is no longer routed.
            let Some(service) = live
                .service
                .and_then(|s| self.catalog.iter().find(|c| c.service.as_str() == s))
            else {
                continue;
            };
            let placed = match (live.state.and_then(down_as), live.upstream) {
                (Some(down), _) => {
                    routes.down.insert(service.service.clone(), down);
                    true
                }
                (None, Some(upstream)) => {
                    routes.upstreams.insert(service.service.clone(), upstream);
                    true
                }
                (None, None) => false,
            };
            if placed && self.gateway_services.contains(&service.service) {
                routes.gateway = Some(service.service.clone());
            }
        }
        Ok(RouteTable {
            generation: generation.0,
            base_domain: self.base_domain.clone(),
            services: self.catalog.clone(),
            wake_timeout_ms: u64::try_from(self.wake_timeout.as_millis()).unwrap_or(u64::MAX),
            sandboxes: sandboxes.into_values().collect(),
        })
    }

    async fn send(&self, generation: Generation) -> Result<(), String> {
        let table = self
            .table(generation)
            .await
            .map_err(|e| format!("cannot read the routes: {e}"))?;
        let gateways = self.dispatch.agents(Role::Gateway).await;
        if gateways.is_empty() {
            return Err(
                "no gateway agent is connected to route it; start `sdp agent --role gateway`"
                    .into(),
            );
        }
        let sends = gateways.iter().map(|gateway| {
            let table = table.clone();
            async move {
                call(
                    self.dispatch.as_ref(),
                    Target::Agent(gateway.clone()),
                    table,
                    self.timeout,
                )
                .await
            }
        });
        let errors: Vec<String> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if errors.is_empty() {
            tracing::info!(
                %generation,
                gateways = gateways.len(),
                sandboxes = table.sandboxes.len(),
                "route table applied by the gateways"
            );
            Ok(())
        } else {
            Err(format!(
                "the route table was not applied: {}",
                errors.join("; ")
            ))
        }
    }
}
