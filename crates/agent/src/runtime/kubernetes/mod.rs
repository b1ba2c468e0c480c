//! The Kubernetes runtime (OpenShift included): each instance is a Deployment of one pod (a
//! bare Pod for `restart = "never"`) of the configured image, in the configured namespace
//! or one per sandbox, scheduled by the cluster. The agent fetches and builds on its own host,
//! as with the other runtimes; the pod's init container then fetches the checkout, build
//! included, from the agent with a one-time grant (`fetch.rs`), into an `emptyDir` that the
//! service sees read-only at `/src`. Nothing of the user's credentials reaches the cluster.
//!
//! Every object carries the labels `sdp.sandbox` (the sandbox's id), `sdp.service`,
//! `sdp.deployment` and `sdp.agent`, and is found, deleted and taken up again by them, never
//! by a name. One watch of this agent's pods (`sdp.agent=<name>`) feeds every instance's
//! monitor, which tells the supervisor what the kubelet does: an instance that ended and is
//! started again, a pod Kubernetes put in place of a deleted one, a pod that serves again.
//! Health is the pod's readiness (a probe of the catalog's health path) and then SDP's own
//! check, through the address the router uses.
//!
//! How the router reaches an instance (`expose`): the pod's IP and the service's port (with
//! `host_network`, the node's IP and a port of `port_range`); the node's IP and a NodePort
//! Service's port; or `https://` and the host of an OpenShift Route, edge-terminated.

mod fetch;
mod objects;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{AsyncReadExt, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{
    ContainerStateTerminated, ContainerStatus, Namespace, Pod, Service,
};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use sdp_protocol::{DeploymentId, LogStream, ReloadSignal, RestartPolicy, SandboxId, ServiceName};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{Address, Change, Exit, Instance, Output, Ports, Runtime, RuntimeError, StartRequest};
use crate::config::{DEFAULT_FETCH_PORT, Expose, KubernetesConfig, PER_SANDBOX};
use crate::isolation::{Layout, UserCode};
use crate::lines::Splitter;
use crate::runtime_log::InstanceOutput;
use fetch::{Grant, Grants, PodCheck};
use objects::{FETCH_CONTAINER, PodInput, SERVICE_CONTAINER};

pub const LABEL_SANDBOX: &str = "sdp.sandbox";
pub const LABEL_SERVICE: &str = "sdp.service";
pub const LABEL_DEPLOYMENT: &str = "sdp.deployment";
pub const LABEL_AGENT: &str = "sdp.agent";
/// The sandbox's name, for people reading `kubectl get`; never used to find anything.
const ANNOTATION_SANDBOX_NAME: &str = "sdp.sandbox-name";

/// Waiting reasons of a container that will not start as it is.
const HOPELESS: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// How often an instance's monitor looks again without a change in the watch (a Route's
/// host, a Deployment deleted while no pod was left).
const RECHECK: Duration = Duration::from_secs(2);

/// How long a teardown waits for the pods to be gone.
const TEARDOWN_WAIT: Duration = Duration::from_secs(60);

/// What the agent reads from its `[kubernetes]` table and elsewhere to run instances.
pub struct KubernetesSetup<'a> {
    pub config: &'a KubernetesConfig,
    pub agent: &'a str,
    pub ports: (u16, u16),
    pub advertise_host: &'a str,
    pub layout: Layout,
    pub users: UserCode,
    /// How long a pod may take to be ready.
    pub health_timeout: Duration,
}

pub struct KubernetesRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    agent: String,
    /// The fixed namespace; `None`: one per sandbox.
    namespace: Option<String>,
    config: KubernetesConfig,
    fetch_url: String,
    /// Host ports, with `host_network`.
    ports: Ports,
    /// The host port of each instance, with `host_network`.
    host_ports: Mutex<HashMap<(SandboxId, ServiceName), u16>>,
    /// This agent's pods, as the watch last saw them.
    pods: Store<Pod>,
    /// Counts the watch's events: monitors look again at each.
    changed: watch::Receiver<u64>,
    grants: Arc<Grants>,
    health_timeout: Duration,
}

fn err(context: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError(format!("{context}: {e}"))
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// A name of at most 63 characters, unique per agent, sandbox and service, readable enough:
/// `sdp-<service>-<10 hex digits>`.
fn object_name(agent: &str, sandbox: &SandboxId, service: &ServiceName) -> String {
    let digest = Sha256::digest(format!("{agent}\0{sandbox}\0{service}").as_bytes());
    let service: String = service.as_str().chars().take(40).collect();
    format!("sdp-{service}-{}", &hex::encode(digest)[..10])
}

/// `namespace = "per-sandbox"`: `sdp-sbx-<16 hex digits>`.
fn sandbox_namespace(sandbox: &SandboxId) -> String {
    format!("sdp-{}", sandbox.as_str().replace('_', "-"))
}

fn selector(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a container ended, as people read it.
fn ended(t: &ContainerStateTerminated) -> String {
    let code = match t.signal {
        Some(signal) => nix::sys::signal::Signal::try_from(signal)
            .map_or(format!("killed by signal {signal}"), |s| {
                format!("killed by {}", s.as_str())
            }),
        None => super::docker::exit_reason(i64::from(t.exit_code)),
    };
    match t.reason.as_deref() {
        Some("OOMKilled") => format!("{code}: out of memory (OOMKilled)"),
        _ => code,
    }
}

impl KubernetesRuntime {
    /// Connects to the cluster, starts the watch of this agent's pods and the fetch server.
    pub async fn new(setup: KubernetesSetup<'_>) -> Result<KubernetesRuntime, RuntimeError> {
        let config = setup.config;
        let (client, default_namespace) = connect(config).await?;
        let namespace = match config.namespace.as_deref() {
            Some(PER_SANDBOX) => None,
            Some(namespace) => Some(namespace.to_owned()),
            None => Some(default_namespace),
        };
        let listen = config.fetch_listen.unwrap_or_else(|| {
            let ip = setup
                .advertise_host
                .parse()
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
            SocketAddr::new(ip, DEFAULT_FETCH_PORT)
        });
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            err(
                &format!("cannot listen on `kubernetes.fetch_listen` {listen}"),
                e,
            )
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| err("cannot read the fetch server's address", e))?;
        let fetch_url = match &config.fetch_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if bound.ip().is_unspecified() => format!(
                "http://{}",
                crate::deploy::upstream_address(setup.advertise_host, bound.port())
            ),
            None => format!("http://{bound}"),
        };
        let pods_api: Api<Pod> = match &namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        let (pods, writer) = reflector::store();
        let (tick, changed) = watch::channel(0u64);
        let label = format!("{LABEL_AGENT}={}", setup.agent);
        let stream = reflector::reflector(
            writer,
            watcher(pods_api, watcher::Config::default().labels(&label)).default_backoff(),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // Each failure is retried with a backoff; the same one again is not logged again.
            let mut failing: Option<String> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Err(e) => {
                        let error = e.to_string();
                        if failing.as_ref() != Some(&error) {
                            tracing::warn!(%error, "the watch of this agent's pods failed; it starts again");
                            failing = Some(error);
                        }
                    }
                    Ok(_) => {
                        if failing.take().is_some() {
                            tracing::info!("the watch of this agent's pods works again");
                        }
                    }
                }
                tick.send_modify(|n| *n += 1);
            }
        });
        let grants = Arc::new(Grants::new(setup.layout.clone()));
        let inner = Arc::new(Inner {
            client,
            agent: setup.agent.to_owned(),
            namespace,
            config: config.clone(),
            fetch_url: fetch_url.clone(),
            ports: Ports::new(setup.ports, setup.advertise_host),
            host_ports: Mutex::default(),
            pods,
            changed,
            grants: grants.clone(),
            health_timeout: setup.health_timeout,
        });
        let checker: Arc<dyn PodCheck> = Arc::new(Checker(inner.clone()));
        tokio::spawn(fetch::serve(listener, grants, checker, setup.users));
        tracing::info!(listen = %bound, url = %fetch_url, "pods fetch their checkouts here");
        Ok(KubernetesRuntime { inner })
    }
}

/// A client of the cluster, and the namespace its configuration names (the context's, or
/// the pod's own in a cluster).
async fn connect(config: &KubernetesConfig) -> Result<(Client, String), RuntimeError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                err(
                    &format!("cannot read `kubernetes.kubeconfig` {}", path.display()),
                    e,
                )
            })?;
            let options = kube::config::KubeConfigOptions {
                context: config.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| {
                    err(
                        &format!("cannot use `kubernetes.kubeconfig` {}", path.display()),
                        e,
                    )
                })?
        }
        None => kube::Config::incluster().map_err(|e| {
            err(
                "no `kubernetes.kubeconfig`, and this is not a pod with a service account",
                e,
            )
        })?,
    };
    let namespace = kube_config.default_namespace.clone();
    let client =
        Client::try_from(kube_config).map_err(|e| err("cannot make a client of the cluster", e))?;
    Ok((client, namespace))
}

/// The fetch server's question: is this pod one of the grant's, starting?
struct Checker(Arc<Inner>);

#[async_trait::async_trait]
impl PodCheck for Checker {
    async fn check(&self, grant: &Grant, pod: &str, uid: &str) -> Result<(), String> {
        let api: Api<Pod> = Api::namespaced(self.0.client.clone(), &grant.namespace);
        let found = api
            .get_opt(pod)
            .await
            .map_err(|e| format!("cannot look the pod up: {e}"))?
            .ok_or_else(|| format!("no pod {pod} in namespace {}", grant.namespace))?;
        if found.metadata.uid.as_deref() != Some(uid) {
            return Err(format!("pod {pod} has another uid"));
        }
        let labels = found.metadata.labels.unwrap_or_default();
        let expected = [
            (LABEL_SANDBOX, grant.sandbox.as_str()),
            (LABEL_SERVICE, grant.service.as_str()),
            (LABEL_DEPLOYMENT, grant.deployment.as_str()),
            (LABEL_AGENT, self.0.agent.as_str()),
        ];
        if expected
            .iter()
            .any(|(k, v)| labels.get(*k).map(String::as_str) != Some(*v))
        {
            return Err(format!("pod {pod} is not this grant's instance"));
        }
        let phase = found.status.and_then(|s| s.phase).unwrap_or_default();
        if phase != "Pending" {
            return Err(format!("pod {pod} is {phase}, not starting"));
        }
        Ok(())
    }
}

/// One instance's objects, as its monitor finds them.
#[derive(Clone)]
struct Key {
    namespace: String,
    name: String,
    sandbox: SandboxId,
    service: ServiceName,
    deployment: DeploymentId,
    /// A bare Pod (`restart = "never"`), not a Deployment.
    bare: bool,
}

impl Inner {
    fn namespace_of(&self, sandbox: &SandboxId) -> String {
        self.namespace
            .clone()
            .unwrap_or_else(|| sandbox_namespace(sandbox))
    }

    fn labels(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
    ) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_SANDBOX.to_owned(), sandbox.to_string()),
            (LABEL_SERVICE.to_owned(), service.to_string()),
            (LABEL_DEPLOYMENT.to_owned(), deployment.to_string()),
            (LABEL_AGENT.to_owned(), self.agent.clone()),
        ])
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn routes(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &objects::route_resource())
    }

    /// `per-sandbox`: the sandbox's namespace, made when missing.
    async fn ensure_namespace(
        &self,
        namespace: &str,
        sandbox: &SandboxId,
    ) -> Result<(), RuntimeError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let made: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": namespace,
                "labels": {LABEL_SANDBOX: sandbox.as_str(), LABEL_AGENT: self.agent},
            }
        }))
        .map_err(|e| err("cannot describe the namespace", e))?;
        match api.create(&PostParams::default(), &made).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(err(&format!("cannot create namespace {namespace}"), e)),
        }
    }

    /// Creates the instance's objects.
    async fn create(&self, key: &Key, input: &PodInput<'_>, port: u16) -> Result<(), RuntimeError> {
        let post = PostParams::default();
        let ns = key.namespace.as_str();
        let invalid = |e: serde_json::Error| err("cannot describe the instance", e);
        if key.bare {
            let pod = objects::pod(input).map_err(invalid)?;
            self.api::<Pod>(ns)
                .create(&post, &pod)
                .await
                .map_err(|e| err(&format!("cannot create pod {}", key.name), e))?;
        } else {
            let deployment = objects::deployment(input).map_err(invalid)?;
            self.api::<Deployment>(ns)
                .create(&post, &deployment)
                .await
                .map_err(|e| err(&format!("cannot create deployment {}", key.name), e))?;
        }
        if self.config.expose != Expose::PodIp {
            let node_port = self.config.expose == Expose::Nodeport;
            let service =
                objects::service(&key.name, ns, input.labels, port, node_port).map_err(invalid)?;
            self.api::<Service>(ns)
                .create(&post, &service)
                .await
                .map_err(|e| err(&format!("cannot create service {}", key.name), e))?;
        }
        if self.config.expose == Expose::Route {
            let host = self
                .config
                .route_domain
                .as_ref()
                .map(|domain| format!("{}.{domain}", key.name));
            let route = objects::route(&key.name, ns, input.labels, host.as_deref());
            self.routes(ns)
                .create(&post, &route)
                .await
                .map_err(|e| err(&format!("cannot create route {}", key.name), e))?;
        }
        Ok(())
    }

    /// Deletes every object carrying `labels` (and this agent's), and waits until their pods
    /// and ReplicaSets are gone.
    async fn delete_labelled(
        &self,
        namespace: &str,
        labels: &[(&str, &str)],
    ) -> Result<(), RuntimeError> {
        let mut pairs = labels.to_vec();
        pairs.push((LABEL_AGENT, &self.agent));
        let list = ListParams::default().labels(&selector(&pairs));
        // The Deployment first, so that nothing makes pods again; its ReplicaSets and pods go
        // with it, and are deleted too so as not to wait for the collector.
        self.delete_all::<Deployment>(self.api(namespace), &list)
            .await?;
        self.delete_all::<Service>(self.api(namespace), &list)
            .await?;
        if self.config.expose == Expose::Route {
            self.delete_all::<DynamicObject>(self.routes(namespace), &list)
                .await?;
        }
        self.delete_all::<Pod>(self.api(namespace), &list).await?;
        let deadline = tokio::time::Instant::now() + TEARDOWN_WAIT;
        loop {
            let pods = self
                .api::<Pod>(namespace)
                .list_metadata(&list)
                .await
                .map_err(|e| err("cannot list pods", e))?;
            let sets = self
                .api::<ReplicaSet>(namespace)
                .list_metadata(&list)
                .await
                .map_err(|e| err("cannot list replicasets", e))?;
            if pods.items.is_empty() && sets.items.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(RuntimeError(format!(
                    "{} pods still there {}s after their deletion",
                    pods.items.len(),
                    TEARDOWN_WAIT.as_secs()
                )));
            }
            // A pod of a ReplicaSet deleted after it may have been made meanwhile.
            self.delete_all::<Pod>(self.api(namespace), &list).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn delete_all<K>(&self, api: Api<K>, list: &ListParams) -> Result<(), RuntimeError>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
    {
        let found = match api.list_metadata(list).await {
            Ok(found) => found,
            // No such kind here (a cluster without Routes): nothing of it to delete.
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(err("cannot list objects to delete", e)),
        };
        for object in found.items {
            let Some(name) = object.metadata.name else {
                continue;
            };
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(err(&format!("cannot delete {name}"), e)),
            }
        }
        Ok(())
    }

    /// `host_network`: `port` is the instance's until it stops.
    fn hold_port(&self, sandbox: &SandboxId, service: &ServiceName, port: u16) {
        self.host_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((sandbox.clone(), service.clone()), port);
    }

    fn release(&self, sandbox: &SandboxId, service: Option<&ServiceName>) {
        let mut held = self.host_ports.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|(s, svc), port| {
            let matches = s == sandbox && service.is_none_or(|wanted| wanted == svc);
            if matches {
                self.ports.release(*port);
            }
            !matches
        });
    }

    /// Where the router reaches `pod`'s instance on `port` (the container's port).
    async fn address(&self, key: &Key, pod: &Pod, port: u16) -> Option<Address> {
        let status = pod.status.as_ref()?;
        match self.config.expose {
            Expose::PodIp => {
                let ip = status.pod_ip.clone()?;
                Some(Address {
                    upstream: crate::deploy::upstream_address(&ip, port),
                    health: crate::health::origin(&ip, port),
                })
            }
            Expose::Nodeport => {
                let ip = status.host_ip.clone()?;
                let service = self
                    .api::<Service>(&key.namespace)
                    .get_opt(&key.name)
                    .await
                    .ok()??;
                let node_port = service.spec?.ports?.first()?.node_port?;
                let node_port = u16::try_from(node_port).ok()?;
                Some(Address {
                    upstream: crate::deploy::upstream_address(&ip, node_port),
                    health: crate::health::origin(&ip, node_port),
                })
            }
            Expose::Route => {
                let route = self
                    .routes(&key.namespace)
                    .get_opt(&key.name)
                    .await
                    .ok()??;
                let host = route.data["spec"]["host"]
                    .as_str()
                    .or_else(|| route.data["status"]["ingress"][0]["host"].as_str())?
                    .to_owned();
                Some(Address {
                    upstream: format!("https://{host}"),
                    health: format!("https://{host}"),
                })
            }
        }
    }

    /// Whether the instance's Deployment (or bare Pod) is gone.
    async fn workload_gone(&self, key: &Key) -> bool {
        let found = if key.bare {
            self.api::<Pod>(&key.namespace)
                .get_opt(&key.name)
                .await
                .map(|p| p.is_some())
        } else {
            self.api::<Deployment>(&key.namespace)
                .get_opt(&key.name)
                .await
                .map(|d| d.is_some())
        };
        matches!(found, Ok(false))
    }
}

/// Follows one instance's pods: tells the supervisor (or the start waiting for it) each
/// change, follows each container's output, and resolves `exit` once the instance is gone.
struct Monitor {
    inner: Arc<Inner>,
    key: Key,
    /// The container's port (the router's, with `pod-ip`).
    port: u16,
    out: InstanceOutput,
    changes: mpsc::Sender<Change>,
    lines: watch::Sender<u64>,
    /// Where the output that reached the log ends (nanoseconds): a container that restarts
    /// is followed from there, never twice.
    last: Arc<AtomicU64>,
    stop: CancellationToken,
}

/// What a monitor remembers of the pod it last saw.
#[derive(Default)]
struct Seen {
    /// Taking up an instance an earlier run of the agent started: the restarts its pod had
    /// then were reported by that run.
    adopting: bool,
    pod: Option<(String, String)>,
    restarts: i32,
    serving: bool,
    followed: Option<String>,
    said: Option<String>,
}

impl Monitor {
    fn spawn(
        inner: Arc<Inner>,
        key: Key,
        port: u16,
        out: InstanceOutput,
        adopting: bool,
    ) -> (mpsc::Receiver<Change>, Exit, watch::Receiver<u64>) {
        let (changes, received) = mpsc::channel(16);
        let (lines, counted) = watch::channel(0);
        let (exit_tx, exit_rx) = oneshot::channel();
        let last = Arc::new(AtomicU64::new(out.acked_at(out.service.as_str())));
        let monitor = Monitor {
            inner,
            key,
            port,
            out,
            changes,
            lines,
            last,
            stop: CancellationToken::new(),
        };
        tokio::spawn(async move {
            let stop = monitor.stop.clone();
            if let Some(reason) = monitor.run(adopting).await {
                let _ = exit_tx.send(reason);
            }
            stop.cancel();
        });
        let exit: Exit = Box::pin(async move {
            exit_rx
                .await
                .unwrap_or_else(|_| "the agent stopped following it".to_owned())
        });
        (received, exit, counted)
    }

    async fn say(&self, seen: &mut Seen, change: Change) {
        if let Change::Waiting(why) | Change::Failing(why) = &change {
            if seen.said.as_ref() == Some(why) {
                return;
            }
            seen.said = Some(why.clone());
        }
        let _ = self.changes.send(change).await;
    }

    /// Until the instance is gone (`Some(why)`) or nobody listens any more (`None`).
    async fn run(&self, adopting: bool) -> Option<String> {
        let mut changed = self.inner.changed.clone();
        let mut seen = Seen {
            adopting,
            ..Seen::default()
        };
        loop {
            if let Some(gone) = self.look(&mut seen).await {
                return Some(gone);
            }
            tokio::select! {
                _ = self.changes.closed() => return None,
                _ = changed.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// The instance's pod now: the newest not being deleted.
    fn current(&self) -> Option<Arc<Pod>> {
        let key = &self.key;
        self.inner
            .pods
            .state()
            .into_iter()
            .filter(|p| {
                let labels = p.metadata.labels.as_ref();
                let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
                p.metadata.namespace.as_deref() == Some(key.namespace.as_str())
                    && label(LABEL_SANDBOX) == Some(key.sandbox.as_str())
                    && label(LABEL_SERVICE) == Some(key.service.as_str())
                    && label(LABEL_DEPLOYMENT) == Some(key.deployment.as_str())
                    && p.metadata.deletion_timestamp.is_none()
            })
            .max_by(|a, b| {
                a.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
            })
    }

    /// Looks at the pod once; `Some(why)` when the instance is gone for good.
    async fn look(&self, seen: &mut Seen) -> Option<String> {
        let Some(pod) = self.current() else {
            // A bare pod deleted is gone for good (below); nothing makes it again.
            if let Some((name, _)) = seen.pod.take()
                && !self.key.bare
            {
                self.lost(seen, format!("its pod {name} was deleted")).await;
            }
            if self.inner.workload_gone(&self.key).await {
                return Some(if self.key.bare {
                    "its pod was deleted behind the agent's back".to_owned()
                } else {
                    "its Deployment was deleted behind the agent's back".to_owned()
                });
            }
            self.say(
                seen,
                Change::Waiting("waiting for its pod to be made".into()),
            )
            .await;
            return None;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if seen.pod.as_ref().map(|(_, u)| u) != Some(&uid) {
            if let Some((old, _)) = seen.pod.take() {
                self.lost(seen, format!("its pod {old} was deleted")).await;
            }
            seen.pod = Some((name.clone(), uid.clone()));
            seen.restarts = 0;
            seen.followed = None;
        }
        let status = pod.status.clone().unwrap_or_default();
        let fetch = status
            .init_container_statuses
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|c| c.name == FETCH_CONTAINER);
        if let Some(why) = fetch.and_then(|c| failing(c, "fetching its checkout")) {
            self.say(seen, Change::Failing(why)).await;
        }
        let Some(container) = status
            .container_statuses
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|c| c.name == SERVICE_CONTAINER)
            .cloned()
        else {
            let why = status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .and_then(|c| c.message.clone())
                .map_or_else(
                    || {
                        format!(
                            "pod {name} is {}",
                            status.phase.as_deref().unwrap_or("Pending")
                        )
                    },
                    |m| format!("pod {name} is not scheduled: {m}"),
                );
            self.say(seen, Change::Waiting(why)).await;
            return None;
        };
        if let Some(why) = failing(&container, "starting it") {
            self.say(seen, Change::Failing(why)).await;
        }
        if std::mem::take(&mut seen.adopting) {
            seen.restarts = container.restart_count;
        }
        if container.restart_count > seen.restarts {
            seen.restarts = container.restart_count;
            let why = container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map_or_else(|| "it ended".to_owned(), ended);
            self.lost(seen, why).await;
        }
        let state = container.state.clone().unwrap_or_default();
        if let Some(terminated) = &state.terminated
            && self.key.bare
        {
            self.follow_done().await;
            return Some(ended(terminated));
        }
        if state.running.is_some()
            && let Some(id) = container.container_id.clone()
            && seen.followed.as_ref() != Some(&id)
        {
            seen.followed = Some(id);
            self.follow(name.clone());
        }
        let ready = container.ready
            && status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready && !seen.serving {
            if let Some(address) = self.inner.address(&self.key, &pod, self.port).await {
                seen.serving = true;
                seen.said = None;
                self.say(seen, Change::Serving(address)).await;
            }
        } else if !ready && !seen.serving {
            let why = match state.waiting.as_ref().and_then(|w| w.reason.clone()) {
                Some(reason) => format!("pod {name}: {reason}"),
                None if state.running.is_some() => {
                    format!("pod {name} runs, and is not ready yet")
                }
                None => format!("pod {name} is starting"),
            };
            self.say(seen, Change::Waiting(why)).await;
        }
        None
    }

    /// The instance stopped serving: it ended, or its pod went.
    async fn lost(&self, seen: &mut Seen, why: String) {
        seen.serving = false;
        seen.said = None;
        self.follow_done().await;
        let _ = self.changes.send(Change::Ended(why)).await;
    }

    /// Lets the last lines of a container that ended arrive.
    async fn follow_done(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Follows the output of `pod`'s service container from where the log's lines end.
    fn follow(&self, pod: String) {
        let api: Api<Pod> = self.inner.api(&self.key.namespace);
        let (out, lines, last, stop) = (
            self.out.clone(),
            self.lines.clone(),
            self.last.clone(),
            self.stop.clone(),
        );
        tokio::spawn(async move {
            let from = last.load(Ordering::SeqCst);
            let since = (from > 0)
                .then(|| {
                    let seconds = i64::try_from(from / 1_000_000_000).ok()?;
                    k8s_openapi::jiff::Timestamp::from_second(seconds).ok()
                })
                .flatten();
            let params = LogParams {
                container: Some(SERVICE_CONTAINER.to_owned()),
                follow: true,
                timestamps: true,
                since_time: since,
                ..LogParams::default()
            };
            let reader = match api.log_stream(&pod, &params).await {
                Ok(reader) => reader,
                Err(e) => {
                    tracing::warn!(%pod, error = %e, "cannot follow a pod's output");
                    return;
                }
            };
            let mut reader = std::pin::pin!(reader);
            let source = out.service.to_string();
            let mut splitter = Splitter::default();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                let n = tokio::select! {
                    _ = stop.cancelled() => return,
                    read = reader.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    },
                };
                for line in splitter.push(&buf[..n]) {
                    deliver(&out, &source, &last, &lines, &line).await;
                }
            }
            if let Some(line) = splitter.finish() {
                deliver(&out, &source, &last, &lines, &line).await;
            }
        });
    }
}

/// One line of a pod's output (`<RFC 3339 time> <text>`), unless it reached the log already.
async fn deliver(
    out: &InstanceOutput,
    source: &str,
    last: &AtomicU64,
    lines: &watch::Sender<u64>,
    line: &str,
) {
    let (at, text) = match line.split_once(' ') {
        Some((ts, text)) => match ts.parse::<k8s_openapi::jiff::Timestamp>() {
            Ok(ts) => (u64::try_from(ts.as_nanosecond()).unwrap_or(0), text),
            Err(_) => (0, line),
        },
        None => (0, line),
    };
    if at != 0 {
        if at <= last.load(Ordering::SeqCst) {
            return;
        }
        last.store(at, Ordering::SeqCst);
    }
    out.line(LogStream::Stdout, source, text.to_owned(), at)
        .await;
    lines.send_modify(|n| *n += 1);
}

/// Why a container will not start as it is: its image, or a run of it that failed.
fn failing(container: &ContainerStatus, doing: &str) -> Option<String> {
    let state = container.state.as_ref()?;
    if let Some(waiting) = &state.waiting
        && let Some(reason) = waiting.reason.as_deref()
        && HOPELESS.contains(&reason)
    {
        let message = waiting.message.as_deref().unwrap_or_default();
        return Some(format!("{doing}: {reason} {message}").trim_end().to_owned());
    }
    // An init container that failed is waiting to be run again, or has just ended.
    let terminated = state
        .terminated
        .as_ref()
        .or_else(|| container.last_state.as_ref()?.terminated.as_ref())
        .filter(|t| t.exit_code != 0)?;
    if container.name != FETCH_CONTAINER {
        return None;
    }
    let message = terminated
        .message
        .as_deref()
        .map(|m| m.trim().lines().last().unwrap_or_default().to_owned())
        .unwrap_or_default();
    Some(
        format!("{doing} failed ({}): {message}", ended(terminated))
            .trim_end_matches([':', ' '])
            .to_owned(),
    )
}

/// The instance whose pod serves at `address`, followed by its monitor from now on.
fn serving(
    port: u16,
    address: Address,
    output_lines: watch::Receiver<u64>,
    exit: Exit,
    changes: mpsc::Receiver<Change>,
) -> Instance {
    Instance {
        host_port: port,
        health: address.health,
        upstream: Some(address.upstream),
        output_lines: Some(output_lines),
        exit,
        changes: Some(changes),
    }
}

#[async_trait::async_trait]
impl Runtime for KubernetesRuntime {
    async fn start(&self, req: StartRequest) -> Result<Instance, RuntimeError> {
        let inner = &self.inner;
        let (sandbox, service) = (&req.sandbox_id, &req.service);
        let namespace = inner.namespace_of(sandbox);
        if inner.namespace.is_none() {
            inner.ensure_namespace(&namespace, sandbox).await?;
        }
        self.stop_service(sandbox, service).await?;
        let lease = if inner.config.host_network {
            Some(inner.ports.lease()?)
        } else {
            None
        };
        let port = lease.as_ref().map_or(req.port, |l| l.port());
        let (grant, secret) = inner
            .grants
            .issue(&namespace, sandbox, service, &req.deployment, &req.checkout)
            .map_err(|e| err("cannot record the checkout's grant", e))?;
        let key = Key {
            name: object_name(&inner.agent, sandbox, service),
            namespace,
            sandbox: sandbox.clone(),
            service: service.clone(),
            deployment: req.deployment.clone(),
            bare: req.restart == RestartPolicy::Never,
        };
        let labels = inner.labels(sandbox, service, &req.deployment);
        let annotations =
            BTreeMap::from([(ANNOTATION_SANDBOX_NAME.to_owned(), req.sandbox.to_string())]);
        let input = PodInput {
            name: &key.name,
            namespace: &key.namespace,
            labels: &labels,
            annotations: &annotations,
            image: &inner.config.image,
            pull_policy: &inner.config.image_pull_policy,
            run: &req.run,
            port,
            env: &req.env,
            health: &req.health,
            host_network: inner.config.host_network,
            memory: &inner.config.memory,
            cpu: &inner.config.cpu,
            run_as_user: inner.config.run_as_user,
            fetch_url: &inner.fetch_url,
            grant: &grant,
            secret: &secret,
            never_restart: key.bare,
        };
        if let Err(e) = inner.create(&key, &input, port).await {
            let _ = self.stop_service(sandbox, service).await;
            return Err(e);
        }
        if let Some(lease) = lease {
            inner.hold_port(sandbox, service, lease.keep());
        }
        let generation = req.output.log.begin(sandbox, service);
        let out = req.output.of(sandbox, service, &req.deployment, generation);
        let (mut changes, exit, output_lines) =
            Monitor::spawn(inner.clone(), key, port, out.clone(), false);
        let deadline = tokio::time::Instant::now() + inner.health_timeout;
        let mut waiting = "no pod yet".to_owned();
        let failed = loop {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Err(_) => {
                    break format!(
                        "its pod was not ready within {}s: {waiting}",
                        inner.health_timeout.as_secs()
                    );
                }
                Ok(None) => break "the agent stopped following it".to_owned(),
                Ok(Some(Change::Waiting(why))) => waiting = why,
                Ok(Some(Change::Failing(why))) => break why,
                Ok(Some(Change::Ended(why))) => break format!("it ended while starting: {why}"),
                Ok(Some(Change::Serving(address))) => {
                    return Ok(serving(port, address, output_lines, exit, changes));
                }
            }
        };
        drop(changes);
        let _ = self.stop_service(sandbox, service).await;
        Err(RuntimeError(failed))
    }

    async fn adopt(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        output: Output,
    ) -> Result<Option<Instance>, RuntimeError> {
        let inner = &self.inner;
        let namespace = inner.namespace_of(sandbox);
        let name = object_name(&inner.agent, sandbox, service);
        let bare = match inner.api::<Deployment>(&namespace).get_opt(&name).await {
            Ok(Some(_)) => false,
            Ok(None) => match inner.api::<Pod>(&namespace).get_opt(&name).await {
                Ok(Some(_)) => true,
                Ok(None) => return Ok(None),
                Err(e) => return Err(err("cannot look up the instance's pod", e)),
            },
            Err(e) => return Err(err("cannot look up the instance's deployment", e)),
        };
        inner.grants.reload(sandbox, service);
        let _ = inner.pods.wait_until_ready().await;
        let key = Key {
            namespace,
            name,
            sandbox: sandbox.clone(),
            service: service.clone(),
            deployment: deployment.clone(),
            bare,
        };
        let generation = output.log.generation(sandbox, service);
        let out = output.of(sandbox, service, deployment, generation);
        // The container's port: the one the pod was made with.
        let port = inner
            .pods
            .state()
            .iter()
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE))
                    .map(String::as_str)
                    == Some(service.as_str())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(LABEL_SANDBOX))
                        .map(String::as_str)
                        == Some(sandbox.as_str())
            })
            .find_map(|p| {
                let container = p
                    .spec
                    .as_ref()?
                    .containers
                    .iter()
                    .find(|c| c.name == SERVICE_CONTAINER)?;
                u16::try_from(container.ports.as_ref()?.first()?.container_port).ok()
            });
        let Some(port) = port else {
            return Ok(None);
        };
        let (mut changes, exit, output_lines) = Monitor::spawn(inner.clone(), key, port, out, true);
        let deadline = tokio::time::Instant::now() + inner.health_timeout;
        loop {
            match tokio::time::timeout_at(deadline, changes.recv()).await {
                Ok(Some(Change::Serving(address))) => {
                    if inner.config.host_network {
                        inner.ports.claim(port);
                        inner.hold_port(sandbox, service, port);
                    }
                    tracing::info!(%sandbox, %service, upstream = %address.upstream, "took up an instance an earlier run started");
                    return Ok(Some(serving(port, address, output_lines, exit, changes)));
                }
                Ok(Some(_)) => {}
                Err(_) | Ok(None) => return Ok(None),
            }
        }
    }

    async fn stop_service(
        &self,
        sandbox: &SandboxId,
        service: &ServiceName,
    ) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        inner.grants.revoke(sandbox, service);
        let namespace = inner.namespace_of(sandbox);
        let result = inner
            .delete_labelled(
                &namespace,
                &[
                    (LABEL_SANDBOX, sandbox.as_str()),
                    (LABEL_SERVICE, service.as_str()),
                ],
            )
            .await;
        inner.release(sandbox, Some(service));
        result
    }

    async fn signal(
        &self,
        _sandbox: &SandboxId,
        service: &ServiceName,
        _signal: ReloadSignal,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError(format!(
            "{service} runs in Kubernetes, where the agent sends no signals"
        )))
    }

    async fn stop_sandbox(&self, sandbox: &SandboxId) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        inner.grants.revoke_sandbox(sandbox);
        let namespace = inner.namespace_of(sandbox);
        let result = inner
            .delete_labelled(&namespace, &[(LABEL_SANDBOX, sandbox.as_str())])
            .await;
        inner.release(sandbox, None);
        result?;
        if inner.namespace.is_none() {
            let api: Api<Namespace> = Api::all(inner.client.clone());
            match api.delete(&namespace, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(err(&format!("cannot delete namespace {namespace}"), e)),
            }
        }
        Ok(())
    }

    async fn sandboxes(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        let inner = &self.inner;
        let list = ListParams::default().labels(&format!("{LABEL_AGENT}={}", inner.agent));
        let (deployments, pods): (Api<Deployment>, Api<Pod>) = match &inner.namespace {
            Some(ns) => (inner.api(ns), inner.api(ns)),
            None => (
                Api::all(inner.client.clone()),
                Api::all(inner.client.clone()),
            ),
        };
        let mut ids = Vec::new();
        let labelled = |items: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
            items
                .into_iter()
                .filter_map(|m| SandboxId::parse(m.labels?.get(LABEL_SANDBOX)?.as_str()).ok())
                .collect::<Vec<_>>()
        };
        let found = deployments
            .list_metadata(&list)
            .await
            .map_err(|e| err("cannot list deployments", e))?;
        ids.extend(labelled(
            found.items.into_iter().map(|o| o.metadata).collect(),
        ));
        let found = pods
            .list_metadata(&list)
            .await
            .map_err(|e| err("cannot list pods", e))?;
        ids.extend(labelled(
            found.items.into_iter().map(|o| o.metadata).collect(),
        ));
        if inner.namespace.is_none() {
            let namespaces: Api<Namespace> = Api::all(inner.client.clone());
            let found = namespaces
                .list_metadata(&list)
                .await
                .map_err(|e| err("cannot list namespaces", e))?;
            ids.extend(labelled(
                found.items.into_iter().map(|o| o.metadata).collect(),
            ));
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

impl std::fmt::Debug for KubernetesRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesRuntime")
            .field("agent", &self.inner.agent)
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels_unique_per_agent_sandbox_and_service() {
        let id = |n: u64| SandboxId::parse(format!("sbx_{n:016x}")).unwrap();
        let svc = |s: &str| ServiceName::parse(s).unwrap();
        let long = "a".repeat(63);
        for name in [
            object_name("deploy-1", &id(1), &svc("orders")),
            object_name("deploy-1", &id(1), &svc(&long)),
            sandbox_namespace(&id(1)),
        ] {
            assert!(crate::config::is_dns_label(&name), "{name}");
        }
        let a = object_name("deploy-1", &id(1), &svc("orders"));
        assert_ne!(a, object_name("deploy-2", &id(1), &svc("orders")));
        assert_ne!(a, object_name("deploy-1", &id(2), &svc("orders")));
        assert_ne!(a, object_name("deploy-1", &id(1), &svc("billing")));
        assert!(a.starts_with("sdp-orders-"));
    }
}
