//! A deployment on the micro agent: for each service, fetch the branch, build it on the host,
//! start it in the runtime, wait for its health path; then report the outcome.
//!
//! Every step is an event of the deployment (see [`crate::events`]); the last event is the
//! outcome, with each service's commit and upstream address. The one an instance replaces is
//! unwatched before it is stopped, so that its end is no crash. The healthy instances are
//! handed to the [`Supervisor`], with what starts them again, only once the control plane has
//! the outcome (or after [`OUTCOME_ACK_WAIT`]): an instance that dies meanwhile is then
//! reported after the outcome that recorded where it ran, never before it (a report about a
//! service still deploying is left out), so the routes never keep pointing at a dead port.
//! The whole deployment holds the sandbox ([`Supervisor::hold`]): no sleep, wake or teardown
//! of it runs meanwhile.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use sdp_protocol::{
    DeployJob, EventBody, LogStream, SandboxId, ServiceOutcome, ServiceSpec, Step, StepState,
};
use tokio_util::sync::CancellationToken;

use crate::events::Outbox;
use crate::gateway_routes::GatewayRoutesFiles;
use crate::git::{BASE_PASS_THROUGH, Git};
use crate::group::GroupGuard;
use crate::health;
use crate::isolation::{Layout, UserCode};
use crate::lines::{LineSink, pump};
use crate::shared_builds::{BuildKey, SharedBuilds};
use crate::supervise::{InstanceSpec, Supervisor};

/// A build's own variables on top of [`BASE_PASS_THROUGH`]: the locale and Go's.
const BUILD_PASS_THROUGH: &[&str] = &[
    "LANG",
    "GOPROXY",
    "GOFLAGS",
    "GOPRIVATE",
    "GONOSUMDB",
    "GOTOOLCHAIN",
];

/// The longest the supervision of a deployment's instances waits for the control plane to
/// acknowledge its outcome (it may be away; the instances are watched all the same then).
const OUTCOME_ACK_WAIT: Duration = Duration::from_secs(10);

/// An instance started and healthy, to be watched once the outcome is in.
struct Started {
    spec: InstanceSpec,
    instance: crate::runtime::Instance,
    tail: crate::runtime_log::Tail,
}

/// How long a build's last output may take to arrive once it has exited.
const OUTPUT_AFTER_BUILD: Duration = Duration::from_secs(1);

/// The longest a healthy service's startup output is waited for.
const OUTPUT_GRACE: Duration = Duration::from_millis(300);
/// Output is taken as settled after this long without a new line.
const OUTPUT_QUIET: Duration = Duration::from_millis(50);

/// Docker's log stream lags the container a little: lets the startup lines in before the
/// deployment's log ends, that is until the output has been quiet for a moment after its
/// first line, but never longer than [`OUTPUT_GRACE`] for a quiet service.
async fn settle(mut lines: tokio::sync::watch::Receiver<u64>) {
    let settled = async {
        let _ = lines.wait_for(|n| *n > 0).await;
        while let Ok(Ok(())) = tokio::time::timeout(OUTPUT_QUIET, lines.changed()).await {}
    };
    let _ = tokio::time::timeout(OUTPUT_GRACE, settled).await;
}

pub struct Deployer {
    pub git: Git,
    pub supervisor: Arc<Supervisor>,
    pub outbox: Arc<Outbox>,
    pub layout: Layout,
    pub users: UserCode,
    pub build_timeout: Duration,
    pub health_timeout: Duration,
    /// Gateway agents: the routes files of the sandboxes' own API gateways.
    pub gateway_routes: Option<Arc<GatewayRoutesFiles>>,
    /// Builds at once on this agent (`max_builds`), every deployment's together.
    pub builds: Arc<tokio::sync::Semaphore>,
    pub max_builds: usize,
    /// Builds shared between sandboxes (`share_builds`, with `run_as`).
    pub shared: Option<SharedBuilds>,
    /// What a build is for besides its source: the runtime (and image) its instance runs in.
    pub build_runtime: String,
}

/// A service fetched and built, to be started.
struct Prepared<'j> {
    spec: &'j ServiceSpec,
    commit: String,
    checkout: std::path::PathBuf,
}

/// Why a service did not come up, as the user reads it.
struct Failure(String);

impl Deployer {
    /// Runs a deploy job to its outcome, or until `cancel` (a teardown, or a deployment that
    /// supersedes it) stops it.
    pub async fn run(&self, job: DeployJob, cancel: CancellationToken) {
        if job.after_seq > 0 {
            // The log holds another agent's half of this deployment already.
            self.outbox.continue_after(&job.deployment, job.after_seq);
        }
        let _held = tokio::select! {
            _ = cancel.cancelled() => None,
            held = self.supervisor.hold(&job.sandbox_id) => Some(held),
        };
        let deployment = job.deployment.clone();
        let cancelled = || {
            Failure(
                "cancelled: the sandbox was torn down, or a newer deployment superseded this one"
                    .into(),
            )
        };
        // Every service is fetched and built side by side (builds within `max_builds`), and
        // nothing running is stopped until all are built: a failed build leaves every
        // instance of the sandbox as it was. The first failure stops the others' work, which
        // could no longer be of use to this deployment.
        let stop = cancel.child_token();
        let first_failure = std::sync::Mutex::new(None::<String>);
        let prepared = futures_util::future::join_all(job.services.iter().map(|spec| async {
            let result = tokio::select! {
                _ = stop.cancelled() => None,
                r = self.prepare(&job, spec) => Some(r),
            };
            match result {
                Some(Ok(prepared)) => Some(prepared),
                Some(Err(Failure(reason))) => {
                    first_failure
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(reason);
                    stop.cancel();
                    None
                }
                None => {
                    if !cancel.is_cancelled() {
                        self.outbox
                            .system(
                                &deployment,
                                Some(&spec.service),
                                "stopped: another service of this deployment failed".into(),
                            )
                            .await;
                    }
                    None
                }
            }
        }))
        .await;
        let mut failure = first_failure
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        if failure.is_none() && cancel.is_cancelled() {
            failure = Some(cancelled().0);
        }
        let mut outcomes = Vec::new();
        let mut started = Vec::new();
        let ready: Vec<Prepared> = prepared.into_iter().flatten().collect();
        if failure.is_none() {
            let starts = futures_util::future::join_all(ready.into_iter().map(|p| async {
                let mut replacing = false;
                let service = p.spec.service.clone();
                let result = tokio::select! {
                    _ = cancel.cancelled() => Err(cancelled()),
                    r = self.start(&job, p, &mut replacing) => r,
                };
                (service, replacing, result)
            }))
            .await;
            for (service, replacing, result) in starts {
                match result {
                    Ok((outcome, instance)) => {
                        outcomes.push(outcome);
                        started.push(instance);
                    }
                    Err(Failure(reason)) => {
                        // Its previous instance is stopped: the route must not point there.
                        // One not reached yet still runs, keeps its upstream, and has no
                        // outcome.
                        if replacing {
                            outcomes.push(ServiceOutcome {
                                service,
                                commit: None,
                                upstream: None,
                            });
                        }
                        failure.get_or_insert(reason);
                    }
                }
            }
        }
        let ok = failure.is_none();
        self.outbox
            .emit(
                &deployment,
                EventBody::Outcome {
                    ok,
                    error: failure,
                    services: outcomes,
                },
            )
            .await;
        self.outbox.close(&deployment);
        let acked = async {
            while self.outbox.pending_deployments().contains(&deployment) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            // Torn down: its teardown unwatches and stops them right after.
            _ = cancel.cancelled() => {}
            _ = tokio::time::timeout(OUTCOME_ACK_WAIT, acked) => {}
        }
        for Started {
            spec,
            instance,
            tail,
        } in started
        {
            self.supervisor
                .watch(&job.sandbox_id, spec, Some((instance, tail)));
        }
    }

    /// Fetches one service's branch and builds it, unless this sandbox has that build already
    /// or another sandbox made it (shared builds).
    async fn prepare<'j>(
        &self,
        job: &DeployJob,
        spec: &'j ServiceSpec,
    ) -> Result<Prepared<'j>, Failure> {
        let d = &job.deployment;
        let service = &spec.service;
        let out = &self.outbox;
        // By the sandbox's id: a checkout and its marker never pass to another sandbox, even
        // one that took the name of an ended one.
        let checkout = self
            .layout
            .checkouts_of(&job.sandbox_id)
            .join(service.as_str());
        // The agent's own record of what was built, out of user code's reach: a build cannot
        // claim a commit it was not given.
        let marker = self
            .layout
            .state_of(&job.sandbox_id)
            .join(format!("{service}.built"));

        out.step(d, service, Step::Fetching, StepState::Running)
            .await;
        // With the user's own credentials, always first: a shared build is only ever found
        // by a commit this user could fetch.
        let commit = match self
            .git
            .fetch(&spec.repo, &spec.branch, &job.credentials)
            .await
        {
            Ok(commit) => commit,
            Err(e) => {
                out.step(d, service, Step::Fetching, StepState::Failed)
                    .await;
                return Err(Failure(format!(
                    "fetching {service}@{}: {}",
                    spec.branch, e.message
                )));
            }
        };
        out.system(d, Some(service), format!("{} is at {commit}", spec.branch))
            .await;

        let key = BuildKey::new(
            spec.repo.as_str(),
            &commit,
            &spec.build,
            &self.build_runtime,
        );
        let built = std::fs::read_to_string(&marker).ok();
        if built.as_deref() == Some(key.as_str()) && checkout.is_dir() {
            out.step(d, service, Step::Building, StepState::Skipped)
                .await;
            out.system(
                d,
                Some(service),
                format!("commit {} was built already: not rebuilding", &commit[..12]),
            )
            .await;
            return Ok(Prepared {
                spec,
                commit,
                checkout,
            });
        }
        let _ = std::fs::remove_file(&marker);
        if !self.copy_shared(job, spec, &key, &commit, &checkout).await {
            if let Err(reason) = self.check_out(&spec.repo, &commit, &checkout).await {
                out.step(d, service, Step::Fetching, StepState::Failed)
                    .await;
                return Err(Failure(format!("checking out {commit}: {reason}")));
            }
            out.step(d, service, Step::Building, StepState::Running)
                .await;
            if let Err(Failure(reason)) = self.build(job, spec, &checkout).await {
                out.step(d, service, Step::Building, StepState::Failed)
                    .await;
                return Err(Failure(reason));
            }
            if let Some(shared) = &self.shared
                && let Err(reason) = shared.publish(&key, &checkout).await
            {
                out.system(
                    d,
                    Some(service),
                    format!("this build is not shared with other sandboxes: {reason}"),
                )
                .await;
            }
        }
        marker
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&marker, key.as_str()))
            .map_err(|e| Failure(format!("cannot record the build: {e}")))?;
        Ok(Prepared {
            spec,
            commit,
            checkout,
        })
    }

    /// Gives the sandbox a copy of the shared build of `key`, if there is one; false when it
    /// must build (none, or the copy failed: building is never worse than before).
    async fn copy_shared(
        &self,
        job: &DeployJob,
        spec: &ServiceSpec,
        key: &BuildKey,
        commit: &str,
        checkout: &Path,
    ) -> bool {
        let (d, service, out) = (&job.deployment, &spec.service, &self.outbox);
        let Some((shared, dir)) = self
            .shared
            .as_ref()
            .and_then(|shared| Some((shared, shared.get(key)?)))
        else {
            return false;
        };
        let copied = match self.fresh_checkout(checkout) {
            Ok(()) => {
                shared
                    .copy_to(&dir, checkout, &self.users, self.build_timeout)
                    .await
            }
            Err(reason) => Err(reason),
        };
        match copied {
            Ok(()) => {
                out.step(d, service, Step::Building, StepState::Skipped)
                    .await;
                out.system(
                    d,
                    Some(service),
                    format!(
                        "commit {} was built already by another sandbox: using a copy of that build",
                        &commit[..12]
                    ),
                )
                .await;
                true
            }
            Err(reason) => {
                out.system(
                    d,
                    Some(service),
                    format!("the shared build could not be copied ({reason}): building"),
                )
                .await;
                false
            }
        }
    }

    /// Starts a built service and waits for its health path. `replacing` turns true once
    /// its previous instance, if any, is being stopped.
    async fn start(
        &self,
        job: &DeployJob,
        prepared: Prepared<'_>,
        replacing: &mut bool,
    ) -> Result<(ServiceOutcome, Started), Failure> {
        let Prepared {
            spec,
            commit,
            checkout,
        } = prepared;
        let d = &job.deployment;
        let service = &spec.service;
        let out = &self.outbox;
        out.step(d, service, Step::Starting, StepState::Running)
            .await;
        *replacing = true;
        let sandbox = &job.sandbox_id;
        // Unwatched first: the end of the instance it replaces is no crash, and nothing may
        // start that one again.
        self.supervisor.unwatch(sandbox, service).await;
        self.supervisor.forget(sandbox, service);
        let runtime = &self.supervisor.runtime;
        let _ = runtime.stop_service(sandbox, service).await;
        let mut env = spec.env.clone();
        env.insert("SDP_SANDBOX".into(), job.sandbox.to_string());
        env.insert("SDP_SERVICE".into(), service.to_string());
        env.insert("SDP_GATEWAY_URL".into(), job.gateway_url.clone());
        let kept = InstanceSpec {
            service: service.clone(),
            sandbox: job.sandbox.clone(),
            deployment: job.deployment.clone(),
            commit: commit.clone(),
            run: spec.run.clone(),
            port: spec.port,
            env,
            health: spec.health.clone(),
            restart: spec.restart,
            health_interval_ms: spec.health_interval_ms,
            checkout: checkout.clone(),
            home: self.layout.home_of(sandbox),
            gateway: spec.gateway.clone(),
        };
        if let Some(gateway) = &spec.gateway {
            // Its routes are in place before it starts.
            let Some(files) = &self.gateway_routes else {
                out.step(d, service, Step::Starting, StepState::Failed)
                    .await;
                return Err(Failure(format!(
                    "{service} is an API gateway, which only a gateway agent runs"
                )));
            };
            let routes = files.routes_of(&job.sandbox);
            if let Err(reason) = files
                .write(sandbox, service, gateway, &checkout, &routes)
                .await
            {
                out.step(d, service, Step::Starting, StepState::Failed)
                    .await;
                return Err(Failure(format!("{service}: {reason}")));
            }
            out.system(
                d,
                Some(service),
                format!(
                    "{} routes of table generation {} written to {}",
                    routes.routes.len(),
                    routes.generation,
                    gateway.routes_file
                ),
            )
            .await;
        }
        let (request, tail) = self
            .supervisor
            .request(sandbox, &kept, Some(self.outbox.clone()));
        let mut instance = match runtime.start(request).await {
            Ok(instance) => instance,
            Err(e) => {
                out.step(d, service, Step::Starting, StepState::Failed)
                    .await;
                return Err(Failure(format!("starting {service}: {e}")));
            }
        };
        if let Err(reason) = health::wait_healthy(
            &self.supervisor.http,
            &instance.health,
            &spec.health,
            self.health_timeout,
        )
        .await
        {
            out.step(d, service, Step::Starting, StepState::Failed)
                .await;
            let _ = runtime.stop_service(sandbox, service).await;
            return Err(Failure(format!("{service} {reason}")));
        }
        if let Some(lines) = instance.output_lines.take() {
            settle(lines).await;
        }
        self.supervisor
            .save(sandbox, &kept)
            .map_err(|e| Failure(format!("cannot keep what starts {service} again: {e}")))?;
        out.step(d, service, Step::Healthy, StepState::Done).await;
        let upstream = self.supervisor.upstream(&instance);
        let outcome = ServiceOutcome {
            service: service.clone(),
            commit: Some(commit),
            upstream: Some(upstream),
        };
        Ok((
            outcome,
            Started {
                spec: kept,
                instance,
                tail,
            },
        ))
    }

    /// An empty folder of user code's user at `checkout`, in place of whatever was there.
    fn fresh_checkout(&self, checkout: &Path) -> Result<(), String> {
        if let Some(parent) = checkout.parent() {
            // The sandbox's folder stays the agent's: user code can write in its checkouts,
            // never swap them for links.
            std::fs::create_dir_all(parent)
                .and_then(|()| {
                    std::fs::set_permissions(
                        parent,
                        std::os::unix::fs::PermissionsExt::from_mode(0o711),
                    )
                })
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        match std::fs::remove_dir_all(checkout) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot clear {}: {e}", checkout.display())),
        }
        self.users
            .create_dir(checkout)
            .map_err(|e| format!("cannot create {}: {e}", checkout.display()))
    }

    /// Replaces whatever is in `checkout` with the files of `commit`: a fresh folder of user
    /// code's user, written from the mirror, with no `.git`.
    async fn check_out(
        &self,
        repo: &sdp_protocol::RepoUrl,
        commit: &str,
        checkout: &Path,
    ) -> Result<(), String> {
        self.fresh_checkout(checkout)?;
        self.git
            .export(repo, commit, checkout, &self.users)
            .await
            .map_err(|e| e.message)
    }

    /// The catalog's `build` through `sh -c` in the checkout, as user code's user, its output
    /// streamed line by line with the user's password masked, under the build timeout.
    async fn build(
        &self,
        job: &DeployJob,
        spec: &ServiceSpec,
        checkout: &Path,
    ) -> Result<(), Failure> {
        let _slot = match self.builds.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                self.outbox
                    .system(
                        &job.deployment,
                        Some(&spec.service),
                        format!(
                            "waiting for a build slot: this agent builds at most {} at once",
                            self.max_builds
                        ),
                    )
                    .await;
                self.builds
                    .acquire()
                    .await
                    .map_err(|_| Failure("the agent is stopping".into()))?
            }
        };
        let mut env = BTreeMap::new();
        for key in BASE_PASS_THROUGH.iter().chain(BUILD_PASS_THROUGH) {
            if let Ok(v) = std::env::var(key) {
                env.insert((*key).to_owned(), v);
            }
        }
        let cache = &self.layout.cache;
        let home = self.layout.home_of(&job.sandbox_id);
        self.users
            .create_dir(&home)
            .map_err(|e| Failure(format!("cannot create {}: {e}", home.display())))?;
        env.insert("HOME".into(), home.display().to_string());
        env.insert(
            "GOCACHE".into(),
            cache.join("go-build").display().to_string(),
        );
        env.insert("GOPATH".into(), cache.join("go").display().to_string());
        env.insert("SDP_SANDBOX".into(), job.sandbox.to_string());
        env.insert("SDP_SERVICE".into(), spec.service.to_string());
        let mut child = self
            .users
            .command("sh")
            .arg("-c")
            .arg(&spec.build)
            .current_dir(checkout)
            .env_clear()
            .envs(&env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0)
            .spawn()
            .map_err(|e| Failure(format!("cannot run the build of {}: {e}", spec.service)))?;
        let mut group = GroupGuard::new(child.id());
        let sink = |stream: LogStream| LineSink {
            outbox: self.outbox.clone(),
            deployment: job.deployment.clone(),
            service: spec.service.clone(),
            stream,
            mask: Some(job.credentials.clone()),
        };
        let stdout = pump(child.stdout.take().expect("piped"), sink(LogStream::Stdout));
        let stderr = pump(child.stderr.take().expect("piped"), sink(LogStream::Stderr));
        let mut output = std::pin::pin!(async {
            tokio::join!(stdout, stderr);
        });
        let run = async {
            let mut drained = false;
            let status = tokio::select! {
                () = &mut output => {
                    drained = true;
                    child.wait().await
                }
                status = child.wait() => status,
            };
            // What the build started and left behind (`cmd &`, a daemon) ends with it: it
            // would run on as user code nobody watches, and hold the output pipes open.
            group.kill();
            if !drained {
                let _ = tokio::time::timeout(OUTPUT_AFTER_BUILD, &mut output).await;
            }
            status
        };
        let result = tokio::time::timeout(self.build_timeout, run).await;
        match result {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(Failure(match status.code() {
                Some(code) => format!("the build of {} failed with exit code {code}", spec.service),
                None => format!("the build of {} was killed ({status})", spec.service),
            })),
            Ok(Err(e)) => Err(Failure(format!(
                "the build of {} failed to run: {e}",
                spec.service
            ))),
            Err(_) => {
                group.kill();
                Err(Failure(format!(
                    "the build of {} did not finish within {}s",
                    spec.service,
                    self.build_timeout.as_secs()
                )))
            }
        }
    }

    /// Every sandbox this agent holds anything of: what the runtime runs, and the folders left
    /// (a sandbox deleted while the agent was away, or one whose instances all stopped).
    pub async fn sandboxes(&self) -> Vec<SandboxId> {
        let mut ids = self
            .supervisor
            .runtime
            .sandboxes()
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot list what the runtime runs");
                Vec::new()
            });
        ids.extend(self.layout.sandboxes());
        ids.sort();
        ids.dedup();
        ids
    }

    /// Stops everything of sandbox `sandbox` and deletes its checkouts, its home and what the
    /// agent recorded of it; nothing of another id, whatever its name.
    pub async fn teardown(&self, sandbox: &SandboxId) -> Result<(), String> {
        let held = self.supervisor.hold(sandbox).await;
        // Unwatched first: nothing may start again what is being removed.
        self.supervisor.unwatch_sandbox(sandbox).await;
        self.supervisor
            .runtime
            .stop_sandbox(sandbox)
            .await
            .map_err(|e| e.to_string())?;
        let strays = self.users.end_strays(&[
            self.layout.checkouts_of(sandbox),
            self.layout.home_of(sandbox),
        ]);
        if strays > 0 {
            tracing::info!(%sandbox, processes = strays, "ended what the sandbox's builds left running");
        }
        for dir in self.layout.folders_of(sandbox) {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot delete {}: {e}", dir.display())),
            }
        }
        self.supervisor.log.close(sandbox);
        drop(held);
        self.supervisor.release(sandbox);
        Ok(())
    }
}

/// `host:port` as the router reads it: an IPv6 address goes in brackets.
pub(crate) fn upstream_address(host: &str, port: u16) -> String {
    match host.parse::<std::net::Ipv6Addr>() {
        Ok(ip) => format!("[{ip}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::process::{Child, Command};

    use sdp_protocol::{DeploymentId, SandboxName, ServiceName};

    use super::*;
    use crate::runtime::{ProcessRuntime, StartRequest};
    use crate::runtime_log::RuntimeLog;

    /// A micro agent's deployer with the process runtime, its folders under `work_dir`.
    pub(crate) fn deployer(work_dir: &Path) -> Deployer {
        let layout = Layout::new(work_dir).unwrap();
        let users = UserCode::default();
        layout.prepare(&users).unwrap();
        Deployer {
            git: Git::new(
                "askpass".into(),
                layout.git_home.clone(),
                layout.mirrors.clone(),
                Duration::from_secs(60),
                1,
                false,
            ),
            supervisor: Arc::new(Supervisor::new(
                Arc::new(ProcessRuntime::new(
                    &layout.run,
                    users.clone(),
                    (20000, 60000),
                    "127.0.0.1",
                )),
                Arc::new(RuntimeLog::new(&layout.state)),
                layout.clone(),
                "127.0.0.1",
                Duration::from_secs(5),
            )),
            outbox: Arc::new(Outbox::default()),
            layout,
            users,
            build_timeout: Duration::from_secs(60),
            health_timeout: Duration::from_secs(5),
            gateway_routes: None,
            builds: Arc::new(tokio::sync::Semaphore::new(1)),
            max_builds: 1,
            shared: None,
            build_runtime: "process".into(),
        }
    }

    pub(crate) fn id(n: u64) -> SandboxId {
        SandboxId::parse(format!("sbx_{n:016x}")).unwrap()
    }

    /// What starts a service that sleeps a minute.
    fn spec() -> InstanceSpec {
        InstanceSpec {
            service: ServiceName::parse("orders").unwrap(),
            sandbox: SandboxName::parse("pay-42").unwrap(),
            deployment: DeploymentId::parse("dep_0000000000000001").unwrap(),
            commit: "0123abcd".into(),
            run: "sleep 60".into(),
            port: 8080,
            env: BTreeMap::new(),
            health: "/healthz".into(),
            restart: sdp_protocol::RestartPolicy::Never,
            health_interval_ms: 1000,
            checkout: "/nonexistent".into(),
            home: "/nonexistent".into(),
            gateway: None,
        }
    }

    /// What a deployment of `sandbox` leaves: a built checkout with its marker, a home and a
    /// running instance of `orders`.
    async fn deployed(deployer: &Deployer, sandbox: &SandboxId, deployment: u64) {
        let layout = &deployer.layout;
        let checkout = layout.checkouts_of(sandbox).join("orders");
        std::fs::create_dir_all(&checkout).unwrap();
        std::fs::write(checkout.join("main.go"), "package main").unwrap();
        std::fs::create_dir_all(layout.state_of(sandbox)).unwrap();
        std::fs::write(layout.state_of(sandbox).join("orders.built"), "0123abcd").unwrap();
        let output = deployer.supervisor.request(sandbox, &spec(), None).0.output;
        deployer
            .supervisor
            .runtime
            .start(StartRequest {
                sandbox_id: sandbox.clone(),
                sandbox: SandboxName::parse("pay-42").unwrap(),
                service: ServiceName::parse("orders").unwrap(),
                deployment: DeploymentId::parse(format!("dep_{deployment:016x}")).unwrap(),
                checkout,
                home: layout.home_of(sandbox),
                run: "sleep 60".into(),
                port: 8080,
                health: "/healthz".into(),
                env: BTreeMap::new(),
                restart: sdp_protocol::RestartPolicy::Never,
                output,
            })
            .await
            .unwrap();
    }

    /// A process a build left behind in `dir`, outside any instance's process group.
    fn stray_in(dir: &Path) -> Child {
        Command::new("sleep")
            .arg("60")
            .current_dir(dir)
            .spawn()
            .unwrap()
    }

    fn exited(child: &mut Child) -> bool {
        for _ in 0..100 {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[tokio::test]
    async fn a_teardown_removes_its_sandbox_and_leaves_another_of_the_same_name_alone() {
        let work = tempfile::tempdir().unwrap();
        let deployer = deployer(work.path());
        let (old, new) = (id(0xa), id(0xb));
        deployed(&deployer, &old, 1).await;
        deployed(&deployer, &new, 2).await;
        let mut old_stray = stray_in(&deployer.layout.checkouts_of(&old));
        let mut new_stray = stray_in(&deployer.layout.home_of(&new));
        assert_eq!(deployer.sandboxes().await, [old.clone(), new.clone()]);

        deployer.teardown(&old).await.unwrap();

        assert!(exited(&mut old_stray), "the old sandbox's stray was ended");
        for dir in deployer.layout.folders_of(&old) {
            assert!(!dir.exists(), "{} is left", dir.display());
        }
        assert_eq!(
            deployer.supervisor.runtime.sandboxes().await.unwrap(),
            std::slice::from_ref(&new)
        );
        assert_eq!(deployer.sandboxes().await, std::slice::from_ref(&new));
        assert!(
            new_stray.try_wait().unwrap().is_none(),
            "the new sandbox's stray was ended"
        );
        let layout = &deployer.layout;
        assert!(layout.checkouts_of(&new).join("orders/main.go").exists());
        assert!(layout.state_of(&new).join("orders.built").exists());
        assert!(layout.home_of(&new).is_dir());

        deployer.teardown(&new).await.unwrap();
        assert!(exited(&mut new_stray));
        assert!(deployer.sandboxes().await.is_empty());
    }

    #[tokio::test]
    async fn the_sandboxes_held_include_those_only_folders_are_left_of() {
        let work = tempfile::tempdir().unwrap();
        let deployer = deployer(work.path());
        deployed(&deployer, &id(2), 1).await;
        // Deleted while the agent was away: its instance ended, its checkout stayed.
        std::fs::create_dir_all(deployer.layout.checkouts_of(&id(1)).join("orders")).unwrap();
        std::fs::create_dir_all(deployer.layout.state_of(&id(3))).unwrap();
        assert_eq!(deployer.sandboxes().await, [id(1), id(2), id(3)]);
        for n in 1..=3 {
            deployer.teardown(&id(n)).await.unwrap();
        }
        assert!(deployer.sandboxes().await.is_empty());
    }
}
