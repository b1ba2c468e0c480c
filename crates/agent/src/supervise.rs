//! Supervision of instances once they are healthy, and of those found again when the agent
//! starts: their end (the runtime's [`crate::runtime::Exit`]), their health every
//! `health_interval`, and the service's restart policy. Each change is an
//! [`InstanceReport`] in the sandbox's runtime log, with a `system` line saying what
//! happened.
//!
//! `on-failure` restarts a crashed instance, or one unhealthy three checks in a row, after a
//! backoff that doubles from [`Policy::first_backoff`] up to [`Policy::max_backoff`]; after
//! [`Policy::give_up_after`] restarts within [`Policy::window`] it gives up and leaves it
//! `crashed`. `never` leaves it as it is. A restart stops the old instance first (its whole
//! process group, or its container), and may give it another port.
//!
//! What is needed to start an instance again (after a crash, after the agent restarted, on a
//! wake) is kept in `state/<sandbox_id>/<service>.instance.json`: never a credential (a
//! deploy job's env holds none). A sleeping service has `<service>.sleeping` beside it.
//!
//! Whoever stops an instance on purpose (a redeploy, a teardown, a sleep) unwatches it first,
//! so that nothing restarts it and its end is not reported as a crash; and a deployment, a
//! sleep, a wake and a teardown of one sandbox never run at once: each holds the sandbox's
//! lock ([`Supervisor::hold`]), so none starts what another is stopping.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_protocol::{
    DeploymentId, GatewaySpec, InstanceReport, InstanceState, RestartPolicy, SandboxId,
    SandboxName, ServiceName, ServiceOutcome,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::events::Outbox;
use crate::health;
use crate::isolation::Layout;
use crate::runtime::{Address, Change, Exit, Instance, Output, Runtime, StartRequest};
use crate::runtime_log::{RuntimeLog, Tail};

/// How long after an instance's end its last output is waited for: followers read output
/// files every 20 ms while an instance prints, and Docker's log stream lags a little.
const LAST_LINES_GRACE: Duration = Duration::from_millis(300);

/// How long the agent's stop waits for a supervision task to end.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What starts an instance again, as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub service: ServiceName,
    pub sandbox: SandboxName,
    pub deployment: DeploymentId,
    pub commit: String,
    pub run: String,
    pub port: u16,
    /// The catalog's env and the `SDP_*` variables; never a credential.
    pub env: BTreeMap<String, String>,
    pub health: String,
    pub restart: RestartPolicy,
    pub health_interval_ms: u64,
    pub checkout: PathBuf,
    pub home: PathBuf,
    /// Set for a sandbox's own API gateway: how it learns the sandbox's routes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewaySpec>,
}

/// The numbers of the restart policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Restarts within `window` before giving up.
    pub give_up_after: usize,
    pub window: Duration,
    /// Failed health checks in a row that make an instance unhealthy.
    pub health_failures: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            give_up_after: 5,
            window: Duration::from_secs(600),
            health_failures: 3,
        }
    }
}

impl Policy {
    /// The wait before the `n`th restart in the window (0 first).
    fn backoff(&self, n: usize) -> Duration {
        let factor = 1u32 << n.min(16);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

struct Watch {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

pub struct Supervisor {
    pub runtime: Arc<dyn Runtime>,
    pub log: Arc<RuntimeLog>,
    pub layout: Layout,
    pub http: health::Client,
    pub advertise_host: String,
    pub health_timeout: Duration,
    pub policy: Policy,
    watched: Mutex<HashMap<(SandboxId, ServiceName), Watch>>,
    /// Where each watched instance serves now (a restart may move it).
    upstreams: Mutex<HashMap<(SandboxId, ServiceName), String>>,
    /// Per sandbox: held by its deployment, sleep, wake or teardown.
    locks: Mutex<HashMap<SandboxId, Arc<tokio::sync::Mutex<()>>>>,
}

/// What went wrong with a running instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trouble {
    Crashed,
    Unhealthy,
}

impl Supervisor {
    pub fn new(
        runtime: Arc<dyn Runtime>,
        log: Arc<RuntimeLog>,
        layout: Layout,
        advertise_host: &str,
        health_timeout: Duration,
    ) -> Supervisor {
        Supervisor {
            runtime,
            log,
            layout,
            http: health::client(),
            advertise_host: advertise_host.to_owned(),
            health_timeout,
            policy: Policy::default(),
            watched: Mutex::default(),
            upstreams: Mutex::default(),
            locks: Mutex::default(),
        }
    }

    /// Waits until nothing else changes `sandbox`'s instances (a deployment, a sleep, a wake,
    /// a teardown), and keeps it so while the guard lives.
    pub async fn hold(&self, sandbox: &SandboxId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sandbox.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// The sandbox is gone: its lock too, unless someone waits for it (a job that then finds
    /// nothing of it).
    pub fn release(&self, sandbox: &SandboxId) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks
            .get(sandbox)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            locks.remove(sandbox);
        }
    }

    fn set_upstream(&self, sandbox: &SandboxId, service: &ServiceName, upstream: Option<String>) {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        let key = (sandbox.clone(), service.clone());
        match upstream {
            Some(upstream) => {
                upstreams.insert(key, upstream);
            }
            None => {
                upstreams.remove(&key);
            }
        }
    }

    fn current_upstream(&self, sandbox: &SandboxId, service: &ServiceName) -> Option<String> {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(sandbox.clone(), service.clone()))
            .cloned()
    }

    fn spec_path(&self, sandbox: &SandboxId, service: &ServiceName) -> PathBuf {
        self.layout
            .state_of(sandbox)
            .join(format!("{service}.instance.json"))
    }

    fn sleeping_path(&self, sandbox: &SandboxId, service: &ServiceName) -> PathBuf {
        self.layout
            .state_of(sandbox)
            .join(format!("{service}.sleeping"))
    }

    /// Keeps `spec` (written aside and renamed).
    pub fn save(&self, sandbox: &SandboxId, spec: &InstanceSpec) -> std::io::Result<()> {
        let path = self.spec_path(sandbox, &spec.service);
        let aside = path.with_extension("json.new");
        std::fs::write(&aside, serde_json::to_vec(spec).expect("serializes"))?;
        std::fs::rename(&aside, &path)
    }

    /// Forgets the spec of `service` (it is being replaced) and that it slept.
    pub fn forget(&self, sandbox: &SandboxId, service: &ServiceName) {
        let _ = std::fs::remove_file(self.spec_path(sandbox, service));
        let _ = std::fs::remove_file(self.sleeping_path(sandbox, service));
    }

    /// The specs kept of `sandbox`'s services.
    fn specs(&self, sandbox: &SandboxId) -> Vec<InstanceSpec> {
        let mut specs: Vec<InstanceSpec> = std::fs::read_dir(self.layout.state_of(sandbox))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".instance.json"))
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
            .collect();
        specs.sort_by(|a, b| a.service.cmp(&b.service));
        specs
    }

    /// What starts `spec`'s instance, its output going to the deployment's log too when
    /// given; and where its last lines will be.
    pub fn request(
        &self,
        sandbox: &SandboxId,
        spec: &InstanceSpec,
        deployment_log: Option<Arc<Outbox>>,
    ) -> (StartRequest, Tail) {
        let tail = Tail::default();
        let request = StartRequest {
            sandbox_id: sandbox.clone(),
            sandbox: spec.sandbox.clone(),
            service: spec.service.clone(),
            deployment: spec.deployment.clone(),
            checkout: spec.checkout.clone(),
            home: spec.home.clone(),
            run: spec.run.clone(),
            port: spec.port,
            health: spec.health.clone(),
            env: spec.env.clone(),
            restart: spec.restart,
            output: Output {
                log: self.log.clone(),
                deployment: deployment_log,
                tail: tail.clone(),
            },
        };
        (request, tail)
    }

    pub fn upstream(&self, instance: &Instance) -> String {
        instance.upstream.clone().unwrap_or_else(|| {
            crate::deploy::upstream_address(&self.advertise_host, instance.host_port)
        })
    }

    /// Stops `spec`'s instance if it runs, starts it again and waits until it is healthy.
    async fn restart(
        &self,
        sandbox: &SandboxId,
        spec: &InstanceSpec,
    ) -> Result<(Instance, Tail), String> {
        let _ = self.runtime.stop_service(sandbox, &spec.service).await;
        let (request, tail) = self.request(sandbox, spec, None);
        let instance = self
            .runtime
            .start(request)
            .await
            .map_err(|e| format!("it did not start: {e}"))?;
        let healthy = health::wait_healthy(
            &self.http,
            &instance.health,
            &spec.health,
            self.health_timeout,
        )
        .await;
        if let Err(reason) = healthy {
            let _ = self.runtime.stop_service(sandbox, &spec.service).await;
            return Err(reason);
        }
        Ok((instance, tail))
    }

    #[allow(clippy::too_many_arguments)]
    async fn report(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        state: InstanceState,
        reason: Option<String>,
        last_lines: Vec<String>,
        upstream: Option<String>,
        restarts: u32,
    ) {
        let report = InstanceReport {
            service: service.clone(),
            state,
            reason,
            last_lines,
            upstream,
            restarts,
            gave_up: false,
        };
        self.log.report(sandbox, report).await;
    }

    /// Reports `service` running at `upstream`.
    pub async fn running(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        upstream: String,
        restarts: u32,
    ) {
        self.report(
            sandbox,
            service,
            InstanceState::Running,
            None,
            Vec::new(),
            Some(upstream),
            restarts,
        )
        .await;
    }

    /// Watches `spec`'s instance from now on: `current` when it runs, else it is started again
    /// under the restart policy.
    pub fn watch(
        self: &Arc<Self>,
        sandbox: &SandboxId,
        spec: InstanceSpec,
        current: Option<(Instance, Tail)>,
    ) {
        let cancel = CancellationToken::new();
        let key = (sandbox.clone(), spec.service.clone());
        let upstream = current
            .as_ref()
            .map(|(instance, _)| self.upstream(instance));
        self.set_upstream(sandbox, &spec.service, upstream);
        let task =
            tokio::spawn(
                self.clone()
                    .supervise(sandbox.clone(), spec, current, cancel.clone()),
            );
        let old = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, Watch { cancel, task });
        if let Some(old) = old {
            old.cancel.cancel();
        }
    }

    /// The watched instances that are a sandbox's own API gateway, with their specs.
    pub fn gateways(&self) -> Vec<(SandboxId, InstanceSpec)> {
        let keys: Vec<(SandboxId, ServiceName)> = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|(sandbox, service)| {
                let spec: InstanceSpec = serde_json::from_slice(
                    &std::fs::read(self.spec_path(&sandbox, &service)).ok()?,
                )
                .ok()?;
                spec.gateway.is_some().then_some((sandbox, spec))
            })
            .collect()
    }

    /// Starts a watched instance again now (a gateway reloaded by `restart`), and reports
    /// where it runs. Nothing happens to one no longer watched (redeployed, asleep, torn
    /// down meanwhile); one that does not come up is left to the restart policy.
    pub async fn restart_now(
        self: &Arc<Self>,
        sandbox: &SandboxId,
        spec: InstanceSpec,
    ) -> Result<(), String> {
        let _held = self.hold(sandbox).await;
        let key = (sandbox.clone(), spec.service.clone());
        let watched = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key);
        // A deployment that held the sandbox meanwhile started its own instance, with the
        // routes of its time: this one is not to be restarted.
        let current = std::fs::read(self.spec_path(sandbox, &spec.service))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<InstanceSpec>(&bytes).ok());
        if !watched || current.is_none_or(|c| c.deployment != spec.deployment) {
            return Ok(());
        }
        self.unwatch(sandbox, &spec.service).await;
        match self.restart(sandbox, &spec).await {
            Ok((instance, tail)) => {
                let upstream = self.upstream(&instance);
                self.log
                    .system(
                        sandbox,
                        &spec.service,
                        format!("{} restarted to read its routes", spec.service),
                    )
                    .await;
                self.running(sandbox, &spec.service, upstream, 0).await;
                self.watch(sandbox, spec, Some((instance, tail)));
                Ok(())
            }
            Err(reason) => {
                self.watch(sandbox, spec, None);
                Err(reason)
            }
        }
    }

    /// Stops watching `service` of `sandbox`, and waits until its supervision has ended: an
    /// instance stopped after this is not restarted nor reported.
    pub async fn unwatch(&self, sandbox: &SandboxId, service: &ServiceName) {
        let watch = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(sandbox.clone(), service.clone()));
        if let Some(watch) = watch {
            watch.cancel.cancel();
            let _ = watch.task.await;
        }
        self.set_upstream(sandbox, service, None);
    }

    pub async fn unwatch_sandbox(&self, sandbox: &SandboxId) {
        let services: Vec<ServiceName> = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|(s, _)| s == sandbox)
            .map(|(_, service)| service.clone())
            .collect();
        for service in services {
            self.unwatch(sandbox, &service).await;
        }
    }

    /// The agent stops: nothing is watched any more; the instances run on. A task waiting
    /// for room in the runtime log (the control plane is gone, the queue full) is not waited
    /// for past [`STOP_GRACE`]: the agent's exit must not hang on it.
    pub async fn stop(&self) {
        let all: Vec<Watch> = self
            .watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, w)| w)
            .collect();
        for watch in &all {
            watch.cancel.cancel();
        }
        for watch in all {
            let abort = watch.task.abort_handle();
            if tokio::time::timeout(STOP_GRACE, watch.task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// At the agent's start: takes up every kept instance that is not asleep. One that runs
    /// is watched (its output followed from where the acknowledgements end); one that ended
    /// while the agent was away is reported `crashed`, and started again under `on-failure`.
    pub async fn recover(self: &Arc<Self>) {
        for sandbox in self.layout.sandboxes() {
            for spec in self.specs(&sandbox) {
                if self.sleeping_path(&sandbox, &spec.service).exists() {
                    continue;
                }
                let tail = Tail::default();
                let output = Output {
                    log: self.log.clone(),
                    deployment: None,
                    tail: tail.clone(),
                };
                match self
                    .runtime
                    .adopt(&sandbox, &spec.service, &spec.deployment, output)
                    .await
                {
                    Ok(Some(instance)) => self.watch(&sandbox, spec, Some((instance, tail))),
                    Ok(None) => {
                        let reason = "it ended while the agent was away".to_owned();
                        self.log
                            .system(
                                &sandbox,
                                &spec.service,
                                format!("{} crashed: {reason}", spec.service),
                            )
                            .await;
                        self.report(
                            &sandbox,
                            &spec.service,
                            InstanceState::Crashed,
                            Some(reason),
                            Vec::new(),
                            None,
                            0,
                        )
                        .await;
                        if spec.restart == RestartPolicy::OnFailure {
                            self.watch(&sandbox, spec, None);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(%sandbox, service = %spec.service, error = %e, "cannot take up an instance");
                    }
                }
            }
        }
    }

    /// Stops `sandbox`'s instances and keeps what starts them again. A service that cannot
    /// be stopped does not keep the others awake: each is tried, and the first failure is
    /// returned.
    pub async fn sleep(&self, sandbox: &SandboxId) -> Result<(), String> {
        let _held = self.hold(sandbox).await;
        self.unwatch_sandbox(sandbox).await;
        let specs = self.specs(sandbox);
        if specs.is_empty() {
            return Err(format!("nothing of sandbox {sandbox} runs on this agent"));
        }
        let mut failed = None;
        for spec in specs {
            // Marked first: an agent that dies while stopping it wakes nothing at its start.
            if let Err(e) = std::fs::write(self.sleeping_path(sandbox, &spec.service), b"") {
                failed.get_or_insert(format!("cannot record that {} sleeps: {e}", spec.service));
                continue;
            }
            if let Err(e) = self.runtime.stop_service(sandbox, &spec.service).await {
                failed.get_or_insert(format!("cannot stop {}: {e}", spec.service));
                continue;
            }
            self.log
                .system(sandbox, &spec.service, format!("{} sleeps", spec.service))
                .await;
            self.report(
                sandbox,
                &spec.service,
                InstanceState::Sleeping,
                None,
                Vec::new(),
                None,
                0,
            )
            .await;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Starts `sandbox`'s kept instances again (no fetch, no build) and waits until each is
    /// healthy; returns where each runs. One that runs and is watched already (woken by an
    /// earlier wake, or deployed since) is left running, and answered with where it serves:
    /// a wake asked for again, after the control plane gave up waiting for one, never stops
    /// what the first is starting.
    pub async fn wake(
        self: &Arc<Self>,
        sandbox: &SandboxId,
    ) -> Result<Vec<ServiceOutcome>, String> {
        let _held = self.hold(sandbox).await;
        let specs = self.specs(sandbox);
        if specs.is_empty() {
            return Err(format!(
                "nothing of sandbox {sandbox} is kept on this agent to wake"
            ));
        }
        let mut outcomes = Vec::new();
        for spec in specs {
            let service = spec.service.clone();
            if !self.sleeping_path(sandbox, &service).exists()
                && let Some(upstream) = self.current_upstream(sandbox, &service)
            {
                outcomes.push(ServiceOutcome {
                    service,
                    commit: Some(spec.commit.clone()),
                    upstream: Some(upstream),
                });
                continue;
            }
            self.unwatch(sandbox, &service).await;
            let (instance, tail) = self
                .restart(sandbox, &spec)
                .await
                .map_err(|reason| format!("{service} did not wake: {reason}"))?;
            let _ = std::fs::remove_file(self.sleeping_path(sandbox, &service));
            let upstream = self.upstream(&instance);
            self.log
                .system(sandbox, &service, format!("{service} woke at {upstream}"))
                .await;
            self.running(sandbox, &service, upstream.clone(), 0).await;
            outcomes.push(ServiceOutcome {
                service,
                commit: Some(spec.commit.clone()),
                upstream: Some(upstream),
            });
            self.watch(sandbox, spec, Some((instance, tail)));
        }
        Ok(outcomes)
    }

    /// Waits until the instance is unhealthy: its health path failed
    /// [`Policy::health_failures`] times in a row. Returns why.
    async fn until_unhealthy(&self, origin: &str, spec: &InstanceSpec) -> String {
        let interval = Duration::from_millis(spec.health_interval_ms.max(10));
        let mut failed = 0;
        loop {
            tokio::time::sleep(interval).await;
            match health::check(&self.http, origin, &spec.health).await {
                Ok(()) => failed = 0,
                Err(e) => {
                    failed += 1;
                    if failed >= self.policy.health_failures {
                        return format!("{} gave {e}, {failed} times in a row", spec.health);
                    }
                }
            }
        }
    }

    /// Waits until the instance's health path answers again.
    async fn until_healthy(&self, origin: &str, spec: &InstanceSpec) {
        let interval = Duration::from_millis(spec.health_interval_ms.max(10));
        loop {
            tokio::time::sleep(interval).await;
            if health::check(&self.http, origin, &spec.health)
                .await
                .is_ok()
            {
                return;
            }
        }
    }

    /// An instance whose runtime restarts it itself (the kubelet): reports each end and each
    /// return the runtime tells of, and checks its health while it serves. Returns when it
    /// is gone for good or unhealthy (`None`: no longer watched); `at` is where it served last.
    #[allow(clippy::too_many_arguments)]
    async fn follow_managed(
        &self,
        sandbox: &SandboxId,
        spec: &InstanceSpec,
        at: &mut Address,
        (exit, changes): (&mut Exit, &mut tokio::sync::mpsc::Receiver<Change>),
        tail: &Tail,
        restarts: &mut u32,
        cancel: &CancellationToken,
    ) -> Option<(Trouble, String)> {
        let service = &spec.service;
        let mut serving = true;
        loop {
            let change = tokio::select! {
                _ = cancel.cancelled() => return None,
                reason = &mut *exit => return Some((Trouble::Crashed, reason)),
                reason = self.until_unhealthy(&at.health, spec), if serving => {
                    return Some((Trouble::Unhealthy, reason));
                }
                change = changes.recv() => change,
            };
            match change {
                None => return Some((Trouble::Crashed, "the runtime stopped following it".into())),
                Some(Change::Ended(reason)) => {
                    serving = false;
                    self.set_upstream(sandbox, service, None);
                    self.log
                        .system(sandbox, service, format!("{service} crashed: {reason}"))
                        .await;
                    self.report(
                        sandbox,
                        service,
                        InstanceState::Crashed,
                        Some(reason),
                        tail.lines(),
                        None,
                        *restarts,
                    )
                    .await;
                    *restarts += 1;
                    self.log
                        .system(sandbox, service, format!("the runtime restarts {service}"))
                        .await;
                    self.report(
                        sandbox,
                        service,
                        InstanceState::Restarting,
                        None,
                        Vec::new(),
                        None,
                        *restarts,
                    )
                    .await;
                }
                Some(Change::Serving(address)) => {
                    *at = address;
                    let healthy = health::wait_healthy(
                        &self.http,
                        &at.health,
                        &spec.health,
                        self.health_timeout,
                    )
                    .await;
                    if let Err(reason) = healthy {
                        return Some((Trouble::Unhealthy, reason));
                    }
                    serving = true;
                    let upstream = at.upstream.clone();
                    self.set_upstream(sandbox, service, Some(upstream.clone()));
                    self.log
                        .system(
                            sandbox,
                            service,
                            format!("{service} runs again at {upstream} (restart {restarts})"),
                        )
                        .await;
                    self.running(sandbox, service, upstream, *restarts).await;
                }
                Some(Change::Failing(reason)) => {
                    self.log
                        .system(sandbox, service, format!("{service}: {reason}"))
                        .await;
                }
                Some(Change::Waiting(_)) => {}
            }
        }
    }

    async fn supervise(
        self: Arc<Self>,
        sandbox: SandboxId,
        spec: InstanceSpec,
        mut current: Option<(Instance, Tail)>,
        cancel: CancellationToken,
    ) {
        let service = spec.service.clone();
        let mut restarts = 0u32;
        let mut failures: VecDeque<Instant> = VecDeque::new();
        loop {
            if let Some((instance, tail)) = current.take() {
                let upstream = self.upstream(&instance);
                let Instance {
                    health,
                    mut exit,
                    changes,
                    ..
                } = instance;
                let mut at = Address { health, upstream };
                let (trouble, reason) = match changes {
                    // The runtime restarts it itself: followed until it is gone or unhealthy.
                    Some(mut changes) => {
                        let managed = self
                            .follow_managed(
                                &sandbox,
                                &spec,
                                &mut at,
                                (&mut exit, &mut changes),
                                &tail,
                                &mut restarts,
                                &cancel,
                            )
                            .await;
                        match managed {
                            Some(trouble) => trouble,
                            None => return,
                        }
                    }
                    None => tokio::select! {
                        _ = cancel.cancelled() => return,
                        reason = &mut exit => (Trouble::Crashed, reason),
                        reason = self.until_unhealthy(&at.health, &spec) => (Trouble::Unhealthy, reason),
                    },
                };
                let Address { health, upstream } = at;
                // Not serving: a wake asked for now starts it again rather than pointing at it.
                self.set_upstream(&sandbox, &service, None);
                if trouble == Trouble::Crashed {
                    // Its last lines reach the followers a moment after its end.
                    tokio::time::sleep(LAST_LINES_GRACE).await;
                }
                let (state, what, last_lines) = match trouble {
                    Trouble::Crashed => (InstanceState::Crashed, "crashed", tail.lines()),
                    Trouble::Unhealthy => (InstanceState::Unhealthy, "is unhealthy", Vec::new()),
                };
                self.log
                    .system(&sandbox, &service, format!("{service} {what}: {reason}"))
                    .await;
                self.report(
                    &sandbox,
                    &service,
                    state,
                    Some(reason),
                    last_lines,
                    None,
                    restarts,
                )
                .await;
                if spec.restart == RestartPolicy::Never {
                    // Left as it is. An unhealthy one is still checked: it is running again
                    // once it answers, unhealthy again when it stops answering, crashed
                    // when it ends.
                    if trouble == Trouble::Unhealthy {
                        let mut healthy = false;
                        loop {
                            let (state, reason, last_lines) = tokio::select! {
                                _ = cancel.cancelled() => return,
                                reason = &mut exit => {
                                    tokio::time::sleep(LAST_LINES_GRACE).await;
                                    (InstanceState::Crashed, Some(reason), tail.lines())
                                }
                                reason = self.until_unhealthy(&health, &spec), if healthy => {
                                    (InstanceState::Unhealthy, Some(reason), Vec::new())
                                }
                                () = self.until_healthy(&health, &spec), if !healthy => {
                                    (InstanceState::Running, None, Vec::new())
                                }
                            };
                            healthy = state == InstanceState::Running;
                            let upstream = healthy.then(|| upstream.clone());
                            self.set_upstream(&sandbox, &service, upstream.clone());
                            self.report(
                                &sandbox, &service, state, reason, last_lines, upstream, restarts,
                            )
                            .await;
                            if state == InstanceState::Crashed {
                                return;
                            }
                        }
                    }
                    return;
                }
            }
            let now = Instant::now();
            while failures
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.policy.window)
            {
                failures.pop_front();
            }
            if failures.len() >= self.policy.give_up_after {
                let reason = format!(
                    "gave up after {} restarts within {}s",
                    failures.len(),
                    self.policy.window.as_secs()
                );
                self.log
                    .system(&sandbox, &service, format!("{service}: {reason}"))
                    .await;
                let report = InstanceReport {
                    service: service.clone(),
                    state: InstanceState::Crashed,
                    reason: Some(reason),
                    last_lines: Vec::new(),
                    upstream: None,
                    restarts,
                    gave_up: true,
                };
                self.log.report(&sandbox, report).await;
                return;
            }
            let delay = self.policy.backoff(failures.len());
            failures.push_back(now);
            self.log
                .system(
                    &sandbox,
                    &service,
                    format!("restarting {service} in {} ms", delay.as_millis()),
                )
                .await;
            self.report(
                &sandbox,
                &service,
                InstanceState::Restarting,
                None,
                Vec::new(),
                None,
                restarts,
            )
            .await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            restarts += 1;
            let attempt = tokio::select! {
                _ = cancel.cancelled() => return,
                attempt = self.restart(&sandbox, &spec) => attempt,
            };
            match attempt {
                Ok((instance, tail)) => {
                    let upstream = self.upstream(&instance);
                    self.set_upstream(&sandbox, &service, Some(upstream.clone()));
                    self.log
                        .system(
                            &sandbox,
                            &service,
                            format!("{service} runs again at {upstream} (restart {restarts})"),
                        )
                        .await;
                    self.running(&sandbox, &service, upstream, restarts).await;
                    current = Some((instance, tail));
                }
                Err(reason) => {
                    self.log
                        .system(
                            &sandbox,
                            &service,
                            format!("restarting {service} failed: {reason}"),
                        )
                        .await;
                    self.report(
                        &sandbox,
                        &service,
                        InstanceState::Crashed,
                        Some(reason),
                        Vec::new(),
                        None,
                        restarts,
                    )
                    .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sdp_protocol::RuntimeBody;

    use super::*;
    use crate::isolation::UserCode;
    use crate::runtime::ProcessRuntime;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let policy = Policy::default();
        let waits: Vec<u64> = (0..7).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
    }

    fn id() -> SandboxId {
        SandboxId::parse("sbx_00000000000000a1").unwrap()
    }

    /// A supervisor of the process runtime under `work`, with quick backoffs.
    fn supervisor(work: &std::path::Path) -> Arc<Supervisor> {
        let layout = Layout::new(work).unwrap();
        let users = UserCode::default();
        layout.prepare(&users).unwrap();
        std::fs::create_dir_all(layout.state_of(&id())).unwrap();
        // A window of its own: tests run side by side, and two of them trying the same free
        // port at once would see one instance crash at its start.
        let first = 20000 + 500 * (rand::random::<u16>() % 80);
        let runtime = Arc::new(ProcessRuntime::new(
            &layout.run,
            users,
            (first, first + 499),
            "127.0.0.1",
        ));
        let log = Arc::new(RuntimeLog::new(&layout.state));
        let mut supervisor =
            Supervisor::new(runtime, log, layout, "127.0.0.1", Duration::from_secs(10));
        supervisor.policy = Policy {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            give_up_after: 2,
            window: Duration::from_secs(600),
            health_failures: 3,
        };
        Arc::new(supervisor)
    }

    /// A service run by `run` in a checkout holding `healthz`, which Python's file server
    /// ([`SERVE`]) answers.
    fn spec(work: &std::path::Path, run: &str, restart: RestartPolicy) -> InstanceSpec {
        let checkout = work.join("checkout");
        std::fs::create_dir_all(&checkout).unwrap();
        std::fs::write(checkout.join("healthz"), "ok").unwrap();
        InstanceSpec {
            service: ServiceName::parse("orders").unwrap(),
            sandbox: SandboxName::parse("pay-42").unwrap(),
            deployment: DeploymentId::parse("dep_0000000000000001").unwrap(),
            commit: "0123abcd".into(),
            run: run.into(),
            port: 8080,
            env: BTreeMap::new(),
            health: "/healthz".into(),
            restart,
            health_interval_ms: 50,
            home: work.join("home"),
            gateway: None,
            checkout,
        }
    }

    const SERVE: &str = "exec python3 -m http.server --bind 127.0.0.1 $PORT";

    /// Starts `spec` as a deployment would, and watches it.
    async fn deployed(supervisor: &Arc<Supervisor>, spec: InstanceSpec) -> String {
        supervisor.save(&id(), &spec).unwrap();
        let (instance, tail) = supervisor.restart(&id(), &spec).await.unwrap();
        let upstream = supervisor.upstream(&instance);
        supervisor.watch(&id(), spec, Some((instance, tail)));
        upstream
    }

    /// The instance reports that arrive until one satisfies `until`.
    async fn reports_until(
        log: &RuntimeLog,
        until: impl Fn(&InstanceReport) -> bool,
    ) -> Vec<InstanceReport> {
        let mut seen = Vec::new();
        let wait = async {
            loop {
                for event in log.next_batch(1000, usize::MAX) {
                    if let RuntimeBody::Instance(report) = event.body {
                        let done = until(&report);
                        seen.push(report);
                        if done {
                            return;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .is_err()
        {
            panic!("not reported; saw {seen:#?}");
        }
        seen
    }

    fn pid(supervisor: &Supervisor) -> i32 {
        let path = supervisor
            .layout
            .run
            .join(id().as_str())
            .join("orders.pid.json");
        let text = std::fs::read_to_string(path).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["pid"]
            .as_i64()
            .unwrap() as i32
    }

    fn kill9(pid: i32) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }

    #[tokio::test]
    async fn an_instance_killed_with_sigkill_is_reported_crashed_and_runs_again_on_a_new_upstream()
    {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        let before = deployed(
            &supervisor,
            spec(work.path(), SERVE, RestartPolicy::OnFailure),
        )
        .await;
        kill9(pid(&supervisor));
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Running).await;
        let states: Vec<InstanceState> = reports.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [
                InstanceState::Crashed,
                InstanceState::Restarting,
                InstanceState::Running
            ]
        );
        assert_eq!(reports[0].reason.as_deref(), Some("killed by SIGKILL"));
        let running = &reports[2];
        assert_eq!(running.restarts, 1);
        assert_ne!(running.upstream.as_deref(), Some(before.as_str()));
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn under_never_a_crashed_instance_stays_crashed() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        deployed(
            &supervisor,
            spec(
                work.path(),
                "python3 -m http.server --bind 127.0.0.1 $PORT & sleep 0.5; echo bye; exit 3",
                RestartPolicy::Never,
            ),
        )
        .await;
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Crashed).await;
        let crashed = reports.last().unwrap();
        assert_eq!(crashed.reason.as_deref(), Some("exit code 3"));
        assert!(
            crashed.last_lines.contains(&"bye".to_owned()),
            "{crashed:?}"
        );
        // Nothing restarts it.
        let more = tokio::time::timeout(
            Duration::from_millis(500),
            reports_until(&supervisor.log, |_| true),
        )
        .await;
        assert!(more.is_err(), "reported again: {more:?}");
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn an_instance_that_keeps_crashing_is_given_up_on() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        deployed(
            &supervisor,
            spec(
                work.path(),
                "python3 -m http.server --bind 127.0.0.1 $PORT & sleep 0.5; exit 1",
                RestartPolicy::OnFailure,
            ),
        )
        .await;
        let reports = reports_until(&supervisor.log, |r| {
            r.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("gave up"))
        })
        .await;
        let gave_up = reports.last().unwrap();
        assert_eq!(gave_up.state, InstanceState::Crashed);
        assert!(gave_up.gave_up);
        assert_eq!(gave_up.restarts, 2);
        assert_eq!(
            reports
                .iter()
                .filter(|r| r.state == InstanceState::Running)
                .count(),
            2
        );
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn three_failed_health_checks_in_a_row_make_an_instance_unhealthy() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        let spec = spec(work.path(), SERVE, RestartPolicy::Never);
        let health = spec.checkout.join("healthz");
        deployed(&supervisor, spec).await;
        std::fs::remove_file(health).unwrap();
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Unhealthy).await;
        let reason = reports.last().unwrap().reason.clone().unwrap();
        assert!(reason.contains("status 404, 3 times in a row"), "{reason}");
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn under_never_an_unhealthy_instance_that_answers_again_is_running_again() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        let spec = spec(work.path(), SERVE, RestartPolicy::Never);
        let health = spec.checkout.join("healthz");
        let upstream = deployed(&supervisor, spec).await;
        std::fs::remove_file(&health).unwrap();
        reports_until(&supervisor.log, |r| r.state == InstanceState::Unhealthy).await;
        // A slow spell ends: it answers again, and is routed again, where it ran.
        std::fs::write(&health, "ok").unwrap();
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Running).await;
        let running = reports.last().unwrap();
        assert_eq!(running.upstream.as_deref(), Some(upstream.as_str()));
        assert_eq!(running.restarts, 0);
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn a_wake_asked_for_again_leaves_the_woken_instance_running_where_it_is() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        deployed(
            &supervisor,
            spec(work.path(), SERVE, RestartPolicy::OnFailure),
        )
        .await;
        supervisor.sleep(&id()).await.unwrap();
        // The control plane gave up waiting and asks again while the first wake runs: the
        // second waits for the first, and stops nothing it started.
        let sandbox = id();
        let (first, second) = tokio::join!(supervisor.wake(&sandbox), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            supervisor.wake(&sandbox).await
        });
        let (first, second) = (first.unwrap(), second.unwrap());
        assert_eq!(first[0].upstream, second[0].upstream);
        let running = pid(&supervisor);
        assert!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(running), None).is_ok());
        // And a wake of an awake sandbox changes nothing.
        let third = supervisor.wake(&id()).await.unwrap();
        assert_eq!(third[0].upstream, first[0].upstream);
        assert_eq!(pid(&supervisor), running);
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    /// `pid` is gone, or has ended and waits to be reaped.
    fn ended(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next()
                == Some("Z")
        })
    }

    #[tokio::test]
    async fn a_sleeping_sandbox_wakes_from_what_was_kept_and_runs_on_a_new_upstream() {
        let work = tempfile::tempdir().unwrap();
        let supervisor = supervisor(work.path());
        let spec = spec(work.path(), SERVE, RestartPolicy::OnFailure);
        let before = deployed(&supervisor, spec).await;
        let first = pid(&supervisor);

        supervisor.sleep(&id()).await.unwrap();
        assert!(ended(first), "the instance still runs");
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Sleeping).await;
        assert_eq!(reports.len(), 1, "{reports:?}");

        let woken = supervisor.wake(&id()).await.unwrap();
        assert_eq!(woken.len(), 1);
        assert_eq!(woken[0].commit.as_deref(), Some("0123abcd"));
        let upstream = woken[0].upstream.clone().unwrap();
        assert_ne!(upstream, before);
        let reports = reports_until(&supervisor.log, |r| r.state == InstanceState::Running).await;
        assert_eq!(
            reports.last().unwrap().upstream.as_deref(),
            Some(upstream.as_str())
        );
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }

    #[tokio::test]
    async fn a_restarted_agent_resumes_the_runtime_log_with_no_line_lost_or_doubled() {
        let work = tempfile::tempdir().unwrap();
        let counting =
            "i=0; while [ $i -lt 400 ]; do i=$((i+1)); echo line $i; sleep 0.005; done; sleep 60";
        let mut spec = spec(work.path(), counting, RestartPolicy::Never);
        // It serves no health path: no check comes during the test.
        spec.health_interval_ms = 600_000;
        let lines_of = |log: &RuntimeLog| -> Vec<(u64, String)> {
            log.next_batch(10_000, usize::MAX)
                .into_iter()
                .filter_map(|e| match e.body {
                    RuntimeBody::Log {
                        line,
                        stream: sdp_protocol::LogStream::Stdout,
                        ..
                    } => Some((e.seq, line)),
                    _ => None,
                })
                .collect()
        };
        // The first run of the agent: the control plane acknowledges some of what it sent.
        let acked: Vec<(u64, String)> = {
            let supervisor = supervisor(work.path());
            supervisor.save(&id(), &spec).unwrap();
            let (request, _) = supervisor.request(&id(), &spec, None);
            supervisor.runtime.start(request).await.unwrap();
            let mut seen = Vec::new();
            while seen.len() < 50 {
                seen.extend(lines_of(&supervisor.log));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let last = seen[39].0;
            supervisor.log.ack(&id(), last);
            seen.truncate(40);
            seen
        };
        // The second run takes the instance up where the acknowledgements end.
        let supervisor = supervisor(work.path());
        supervisor.recover().await;
        let mut seen = acked;
        let wait = async {
            while seen.len() < 400 {
                seen.extend(lines_of(&supervisor.log));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap();
        let lines: Vec<String> = seen.iter().map(|(_, l)| l.clone()).collect();
        let expected: Vec<String> = (1..=400).map(|i| format!("line {i}")).collect();
        assert_eq!(lines, expected);
        let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        supervisor.unwatch_sandbox(&id()).await;
        supervisor.runtime.stop_sandbox(&id()).await.unwrap();
    }
}
