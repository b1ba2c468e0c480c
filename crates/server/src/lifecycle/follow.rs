//! Following branches (SPEC §3 Follow): a push to a branch that a sandbox's service follows
//! (a webhook's delivery, or a poll that finds a new tip) redeploys that service.
//!
//! **Credentials stay the owner's.** A follow-redeploy fetches with the sandbox owner's own
//! credentials, taken from the `PasswordVault`, so only while one of the owner's sessions
//! lives since the control plane last started. Otherwise the commit is recorded as waiting
//! ("log in to deploy it", shown on the sandbox), and the owner's next login deploys it. No
//! password is stored for this.
//!
//! **Merged and superseded.** Pushes to one service of one sandbox within `debounce` are one
//! redeploy (of the branch's tip, the newest). A redeploy that finds a deployment of the
//! sandbox in progress cancels it ("superseded by a new commit of <service>") and deploys
//! its services again with this one; the deploy job says which deployment it supersedes,
//! and the agent stops that one before it starts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{BranchName, ListBranches, Role, SandboxId, ServiceName};
use time::OffsetDateTime;

use super::{Lifecycle, Scheduled, new_deployment_id};
use crate::db::{Audit, DeploymentState, NewDelivery, WriteError};
use crate::dispatch::{Target, call};

/// Why a followed commit waits, as the sandbox shows it.
pub const WAITING_FOR_LOGIN: &str = "log in to deploy it";

/// How long the delivery log keeps an entry.
pub const DELIVERIES_KEPT: time::Duration = time::Duration::days(7);

/// How often the delivery log is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The first 12 hex digits of a commit, for people.
pub fn short(commit: &str) -> &str {
    commit.get(..12).unwrap_or(commit)
}

/// A repository URL as deliveries and the catalog are matched by: host (with a port that is
/// not the scheme's default), then the path without a trailing `/` or `.git`, lower case.
/// `https://Bitbucket.example.com/scm/Shop/orders.git` is `bitbucket.example.com/scm/shop/orders`.
/// User names in the URL are left out. `None` for what is not an http(s) or ssh URL.
pub fn repo_key(url: &str) -> Option<String> {
    let url = url::Url::parse(url.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https" | "ssh") {
        return None;
    }
    let host = url.host_str()?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let path = url.path().trim_end_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    Some(format!("{host}{port}{path}").to_lowercase())
}

impl Lifecycle {
    /// A push of `commit` to `service@branch`: every live sandbox whose `service` follows
    /// `branch` redeploys it, or, without its owner's credentials, records the commit as
    /// waiting. Says what it did, for the delivery log; `None` when no sandbox follows it.
    pub async fn pushed(
        self: &Arc<Self>,
        service: &ServiceName,
        branch: &BranchName,
        commit: &str,
    ) -> Option<String> {
        if let Err(e) = self.db.saw_tip(service, branch, commit).await {
            tracing::error!(%service, %branch, error = %e, "cannot record a followed branch's tip");
        }
        let followers = match self.db.followers(service, branch).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(%service, %branch, error = %e, "cannot read who follows a branch");
                return Some(format!(
                    "{service}@{branch}: the followers could not be read"
                ));
            }
        };
        if followers.is_empty() {
            return None;
        }
        let now = OffsetDateTime::now_utc();
        let mut did = Vec::with_capacity(followers.len());
        for f in followers {
            let queued = self
                .follows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&(f.sandbox_id.clone(), service.clone()));
            if f.commit.as_deref() == Some(commit) && !f.deploying && !queued {
                // Told twice (a webhook after a poll, a retry): nothing new to deploy.
                did.push(format!(
                    "{service} in {} runs {} already",
                    f.sandbox,
                    short(commit)
                ));
            } else if self.vault.credentials_of(&f.owner, now).is_some() {
                self.queue_follow(f.sandbox_id, service.clone(), commit.to_owned());
                did.push(format!("redeploying {service} in {}", f.sandbox));
            } else {
                self.wait_for_login(&f.sandbox_id, service, commit).await;
                did.push(format!(
                    "{service} in {} waits for {}'s login",
                    f.sandbox, f.owner
                ));
            }
        }
        Some(did.join("; "))
    }

    async fn wait_for_login(&self, sandbox_id: &SandboxId, service: &ServiceName, commit: &str) {
        tracing::info!(%sandbox_id, %service, commit = short(commit), "a followed commit waits for its owner's login");
        if let Err(e) = self
            .db
            .set_pending(sandbox_id, service, commit, WAITING_FOR_LOGIN)
            .await
        {
            tracing::error!(%sandbox_id, %service, error = %e, "cannot record a waiting commit");
        }
    }

    /// Redeploys `service` of the sandbox after the debounce; a push meanwhile joins the
    /// redeploy already waiting.
    fn queue_follow(self: &Arc<Self>, sandbox_id: SandboxId, service: ServiceName, commit: String) {
        let key = (sandbox_id, service);
        {
            let mut queued = self.follows.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(newest) = queued.get_mut(&key) {
                *newest = commit;
                return;
            }
            queued.insert(key.clone(), commit);
        }
        let this = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = this.shutdown.cancelled() => return,
                _ = tokio::time::sleep(this.settings.follow.debounce) => {}
            }
            let commit = this
                .follows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            if let Some(commit) = commit {
                this.follow_redeploy(&key.0, &key.1, &commit).await;
            }
        });
    }

    /// Starts the redeploy of a followed service with its owner's credentials, superseding a
    /// deployment in progress.
    async fn follow_redeploy(
        self: &Arc<Self>,
        sandbox_id: &SandboxId,
        service: &ServiceName,
        commit: &str,
    ) {
        let sandbox = match self.db.sandbox(sandbox_id.as_str()).await {
            Ok(Some(s)) if !s.state.has_ended() => s,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(%sandbox_id, error = %e, "cannot read a followed sandbox");
                return;
            }
        };
        let Some(row) = sandbox
            .services
            .iter()
            .find(|s| s.service == service.as_str() && s.follow)
        else {
            // No longer followed.
            return;
        };
        let Ok(branch) = BranchName::parse(row.branch.clone()) else {
            return;
        };
        let Some(credentials) = self
            .vault
            .credentials_of(&sandbox.owner, OffsetDateTime::now_utc())
        else {
            // Logged out since the push.
            return self.wait_for_login(sandbox_id, service, commit).await;
        };
        let deployment = new_deployment_id();
        let reason = format!("superseded by a new commit of {service}");
        let detail = format!("{service}@{branch} {}", short(commit));
        let audit = Audit {
            actor: "sdp",
            action: "follow_redeploy",
            target: sandbox.name.as_str(),
            detail: &detail,
        };
        let written = self
            .db
            .follow_redeploy(
                sandbox_id,
                &sandbox.owner,
                &deployment,
                service,
                &branch,
                &reason,
                OffsetDateTime::now_utc(),
                &audit,
            )
            .await;
        let (superseded, selections) = match written {
            Ok((done, selections)) => (done.superseded, selections),
            Err(WriteError::Ended) => return,
            Err(e) => {
                tracing::error!(%sandbox_id, %service, error = %e, "cannot start a follow-redeploy");
                return;
            }
        };
        if let Some(old) = &superseded {
            tracing::info!(deployment = %old, by = %deployment, "deployment superseded by a new commit");
            self.metrics.deployment_ended(DeploymentState::Cancelled);
            self.end_log(old, "cancelled", Some(reason)).await;
            // Its gateway's half, if it was waiting, never goes.
            self.gateway_halves
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(old);
        }
        let specs = selections
            .iter()
            .filter_map(|s| {
                let config = self
                    .settings
                    .follow
                    .catalog
                    .iter()
                    .find(|c| c.name.as_str() == s.service)?;
                Some(config.spec(BranchName::parse(s.branch.clone()).ok()?))
            })
            .collect();
        tracing::info!(sandbox = %sandbox.name, %service, %branch, commit = short(commit), %deployment, "follow-redeploy started");
        self.start(Scheduled {
            deployment,
            sandbox_id: sandbox.id.clone(),
            sandbox: sandbox.name.clone(),
            agent: sandbox.agent.clone(),
            gateway_agent: sandbox.gateway_agent.clone(),
            credentials,
            specs,
            supersedes: superseded,
        });
    }

    /// `owner` has logged in: the commits of their followed branches that waited for it are
    /// deployed now.
    pub fn logged_in(self: &Arc<Self>, owner: &str) {
        let (this, owner) = (self.clone(), owner.to_owned());
        self.spawn(async move {
            match this.db.pending_of(&owner).await {
                Ok(pending) => {
                    for (sandbox_id, service, commit) in pending {
                        tracing::info!(%sandbox_id, %service, user = %owner, "deploying a commit that waited for its owner's login");
                        this.queue_follow(sandbox_id, service, commit);
                    }
                }
                Err(e) => tracing::error!(user = %owner, error = %e, "cannot read waiting commits"),
            }
        });
    }

    /// Checks every followed branch's tip every `every`, and treats a tip that moved as a
    /// push (recorded in the delivery log as a poll).
    pub(super) async fn poll_loop(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.poll_once().await;
        }
    }

    async fn poll_once(self: &Arc<Self>) {
        let followers = match self.db.all_followers().await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot read followed branches");
                return;
            }
        };
        let mut by_service: BTreeMap<ServiceName, Vec<_>> = BTreeMap::new();
        for f in followers {
            by_service.entry(f.service.clone()).or_default().push(f);
        }
        let now = OffsetDateTime::now_utc();
        for (service, followers) in by_service {
            let Some(config) = self
                .settings
                .follow
                .catalog
                .iter()
                .find(|c| c.name == service)
            else {
                continue;
            };
            // Any follower's own credentials may read the tips; each sandbox is then
            // deployed (or waits) under its own owner's. Without any, nothing is known.
            let Some(credentials) = followers
                .iter()
                .find_map(|f| self.vault.credentials_of(&f.owner, now))
            else {
                tracing::debug!(%service, "no follower of the service is logged in; not polled");
                continue;
            };
            let job = ListBranches {
                repo: config.repo.clone(),
                credentials,
            };
            let branches = match call(
                self.dispatch.as_ref(),
                Target::Any(Role::Micro),
                job,
                self.settings.job_timeout,
            )
            .await
            {
                Ok((_, branches)) => branches,
                Err(e) => {
                    tracing::warn!(%service, error = %e, "cannot poll the followed branches");
                    continue;
                }
            };
            let mut moved: BTreeMap<BranchName, String> = BTreeMap::new();
            for f in &followers {
                let Some(tip) = branches.iter().find(|b| b.name == f.branch) else {
                    continue;
                };
                match f.seen.as_ref().or(f.commit.as_ref()) {
                    Some(known) if *known != tip.commit => {
                        moved.insert(f.branch.clone(), tip.commit.clone());
                    }
                    Some(_) => {}
                    // Never deployed nor seen: this tip is where it stands.
                    None => {
                        if let Err(e) = self.db.saw_tip(&service, &f.branch, &tip.commit).await {
                            tracing::error!(%service, error = %e, "cannot record a tip");
                        }
                    }
                }
            }
            for (branch, tip) in moved {
                tracing::info!(%service, %branch, commit = short(&tip), "polling found a push");
                let outcome = self
                    .pushed(&service, &branch, &tip)
                    .await
                    .unwrap_or_else(|| format!("no sandbox follows {service}@{branch}"));
                let services = serde_json::json!([service.as_str()]).to_string();
                let refs = serde_json::json!([{"branch": branch.as_str(), "commit": tip, "change": "update"}])
                    .to_string();
                let repository = repo_key(config.repo.as_str());
                let delivery = NewDelivery {
                    source: "poll",
                    delivery_id: None,
                    event: None,
                    repository: repository.as_deref(),
                    services: &services,
                    refs: &refs,
                    signature: "none",
                    outcome: &outcome,
                };
                if let Err(e) = self.db.record_delivery(&delivery).await {
                    tracing::error!(error = %e, "cannot record a polling trigger");
                }
            }
        }
    }

    /// Deletes delivery log entries older than [`DELIVERIES_KEPT`], hourly.
    pub(super) async fn prune_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self
                .db
                .prune_deliveries(OffsetDateTime::now_utc() - DELIVERIES_KEPT)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(count = n, "old deliveries pruned"),
                Err(e) => tracing::error!(error = %e, "cannot prune deliveries"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_match_by_host_and_path_without_git_whatever_the_case() {
        let catalog = repo_key("https://Bitbucket.example.com/scm/Shop/orders.git").unwrap();
        assert_eq!(catalog, "bitbucket.example.com/scm/shop/orders");
        for same in [
            "https://bitbucket.example.com/scm/shop/orders",
            "http://bitbucket.example.com/scm/shop/orders.git/",
            "https://alice@bitbucket.example.com/scm/shop/orders.git",
        ] {
            assert_eq!(repo_key(same).as_deref(), Some(catalog.as_str()), "{same}");
        }
        assert_ne!(
            repo_key("https://bitbucket.example.com:8443/scm/shop/orders.git").unwrap(),
            catalog
        );
        assert_ne!(
            repo_key("https://bitbucket.example.com/scm/shop/orders-api.git").unwrap(),
            catalog
        );
        assert_eq!(repo_key("/srv/git/orders.git"), None);
        assert_eq!(repo_key("file:///srv/git/orders.git"), None);
    }
}
