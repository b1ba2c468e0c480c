//! The route table on the control plane's side: built from the catalog and the live
//! sandboxes in SQLite, and pushed whole to every gateway agent, which acknowledges it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{
    JobKind, JobOutput, Role, RouteTable, SandboxName, SandboxRoutes, ServiceName, ServiceRoutes,
};

use crate::db::Db;
use crate::hub::Hub;

pub struct Routes {
    pub db: Db,
    pub hub: Arc<Hub>,
    pub base_domain: String,
    pub catalog: Vec<ServiceRoutes>,
    /// How long a gateway agent has to apply a table.
    pub timeout: Duration,
    /// One table goes out at a time, and in order; it holds the last generation sent.
    publishing: tokio::sync::Mutex<u64>,
}

impl Routes {
    pub fn new(
        db: Db,
        hub: Arc<Hub>,
        base_domain: String,
        catalog: Vec<ServiceRoutes>,
        timeout: Duration,
    ) -> Self {
        Self {
            db,
            hub,
            base_domain,
            catalog,
            timeout,
            publishing: tokio::sync::Mutex::new(0),
        }
    }

    /// The catalog, and each live sandbox with the upstreams of its running services.
    pub async fn table(&self) -> Result<RouteTable, sqlx::Error> {
        let mut sandboxes: BTreeMap<String, BTreeMap<ServiceName, String>> = BTreeMap::new();
        for (sandbox, service, upstream) in self.db.live_upstreams().await? {
            let upstreams = sandboxes.entry(sandbox).or_default();
            // A service dropped from the catalog since is no longer routed.
            if let (Some(service), Some(upstream)) = (
                service.and_then(|s| self.catalog.iter().find(|c| c.service.as_str() == s)),
                upstream,
            ) {
                upstreams.insert(service.service.clone(), upstream);
            }
        }
        Ok(RouteTable {
            generation: 0,
            base_domain: self.base_domain.clone(),
            services: self.catalog.clone(),
            sandboxes: sandboxes
                .into_iter()
                .filter_map(|(name, upstreams)| {
                    Some(SandboxRoutes {
                        sandbox: SandboxName::parse(name).ok()?,
                        upstreams,
                    })
                })
                .collect(),
        })
    }

    /// Sends the current table to every connected gateway agent and waits until each has
    /// applied it. The error says, for a person, which gateway did not.
    pub async fn publish(&self) -> Result<(), String> {
        let mut generation = self.publishing.lock().await;
        let mut table = self
            .table()
            .await
            .map_err(|e| format!("cannot read the routes: {e}"))?;
        *generation += 1;
        table.generation = *generation;
        let gateways = self.hub.names_of(Role::Gateway);
        if gateways.is_empty() {
            return Err(
                "no gateway agent is connected to route it; start `sdp agent --role gateway`"
                    .into(),
            );
        }
        let mut errors = Vec::new();
        for gateway in &gateways {
            let job = JobKind::Routes(table.clone());
            match self.hub.call_agent(gateway, job, self.timeout).await {
                Ok((_, JobOutput::RoutesApplied)) => {}
                Ok((_, JobOutput::Failed(e))) => errors.push(format!("{gateway}: {}", e.message)),
                Ok((_, other)) => errors.push(format!("{gateway} answered {other:?}")),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if errors.is_empty() {
            tracing::info!(
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

    /// [`Routes::publish`] for changes nobody waits on: a failure is logged, and the next
    /// change or gateway connection sends the whole table again.
    pub async fn publish_logged(&self, why: &str) {
        if let Err(e) = self.publish().await {
            tracing::warn!(why, error = %e, "route table not published");
        }
    }
}
