//! How a pod gets its checkout without a registry: the agent serves it over HTTP, and each
//! pod's init container fetches it once into an `emptyDir` mounted at `/src`.
//!
//! Each start of an instance issues a *grant*: an id and a 256-bit secret, which the pod
//! template carries (the init container's environment), and the agent keeps only the
//! SHA-256 of the secret. A fetch names the grant, shows the secret, and names the pod that
//! asks (its name and uid, from the downward API). The agent serves it only when that pod
//! exists in the grant's namespace with that uid, carries the grant's `sdp.sandbox`,
//! `sdp.service`, `sdp.deployment` and `sdp.agent` labels, is still starting (`Pending`),
//! and has not fetched before: a grant serves each pod of its instance once, and nothing
//! else. A pod Kubernetes makes in place of a deleted one fetches with the same grant, as a
//! pod of its own. A grant ends with its instance (stopped, replaced, torn down).
//!
//! Grants are kept in `state/<sandbox_id>/<service>.fetch.json` (the agent's, mode 600), so
//! that a restarted agent still serves the pods Kubernetes replaces. The tarball is made by
//! `tar` run as user code's user, so it never holds more than that user can read.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use sdp_protocol::{DeploymentId, SandboxId, ServiceName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::isolation::{Layout, UserCode};

/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;
/// Connections of one address at once; more are closed at once. User code that reaches the
/// server (a build on the agent's host, a pod) cannot take every slot from other nodes' pods
/// by opening connections and sending nothing.
const MAX_PER_PEER: usize = 32;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What one instance's pods may fetch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    /// Hex SHA-256 of the secret; the secret itself is only in the pod template.
    pub secret_sha256: String,
    pub namespace: String,
    pub sandbox: SandboxId,
    pub service: ServiceName,
    pub deployment: DeploymentId,
    pub checkout: PathBuf,
    /// Uids of the pods served already.
    #[serde(default)]
    pub served: Vec<String>,
}

/// The grants of this agent's instances.
pub struct Grants {
    layout: Layout,
    by_id: Mutex<HashMap<String, Grant>>,
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

impl Grants {
    pub fn new(layout: Layout) -> Grants {
        Grants {
            layout,
            by_id: Mutex::default(),
        }
    }

    fn path(&self, sandbox: &SandboxId, service: &ServiceName) -> PathBuf {
        self.layout
            .state_of(sandbox)
            .join(format!("{service}.fetch.json"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, grant: &Grant) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(&grant.sandbox, &grant.service);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let aside = path.with_extension("json.new");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)?;
        file.write_all(&serde_json::to_vec(grant).expect("serializes"))?;
        std::fs::rename(&aside, &path)
    }

    /// A new grant for `service`'s instance in `sandbox`, in place of any earlier one;
    /// returns its id and secret.
    pub fn issue(
        &self,
        namespace: &str,
        sandbox: &SandboxId,
        service: &ServiceName,
        deployment: &DeploymentId,
        checkout: &Path,
    ) -> std::io::Result<(String, String)> {
        self.revoke(sandbox, service);
        let (id, secret) = (
            hex::encode(rand::random::<[u8; 8]>()),
            hex::encode(rand::random::<[u8; 32]>()),
        );
        let grant = Grant {
            id: id.clone(),
            secret_sha256: sha256_hex(&secret),
            namespace: namespace.to_owned(),
            sandbox: sandbox.clone(),
            service: service.clone(),
            deployment: deployment.clone(),
            checkout: checkout.to_owned(),
            served: Vec::new(),
        };
        self.keep(&grant)?;
        self.lock().insert(id.clone(), grant);
        Ok((id, secret))
    }

    /// Takes up the grant kept for `service` (an agent that restarted).
    pub fn reload(&self, sandbox: &SandboxId, service: &ServiceName) {
        let kept = std::fs::read(self.path(sandbox, service))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Grant>(&bytes).ok());
        if let Some(grant) = kept
            && grant.sandbox == *sandbox
            && grant.service == *service
        {
            self.lock().insert(grant.id.clone(), grant);
        }
    }

    pub fn revoke(&self, sandbox: &SandboxId, service: &ServiceName) {
        self.lock()
            .retain(|_, g| !(g.sandbox == *sandbox && g.service == *service));
        let _ = std::fs::remove_file(self.path(sandbox, service));
    }

    pub fn revoke_sandbox(&self, sandbox: &SandboxId) {
        let services: Vec<ServiceName> = self
            .lock()
            .values()
            .filter(|g| g.sandbox == *sandbox)
            .map(|g| g.service.clone())
            .collect();
        for service in services {
            self.revoke(sandbox, &service);
        }
    }

    /// The grant `id` when `secret` is its secret and pod `uid` has not fetched with it.
    fn check(&self, id: &str, secret: &str, uid: &str) -> Result<Grant, Refusal> {
        let grants = self.lock();
        let grant = grants
            .get(id)
            .filter(|g| g.secret_sha256 == sha256_hex(secret))
            .ok_or(Refusal::Unauthorized)?;
        if grant.served.iter().any(|u| u == uid) {
            return Err(Refusal::Forbidden(
                "this pod fetched its checkout already".into(),
            ));
        }
        Ok(grant.clone())
    }

    /// Records that pod `uid` fetched with grant `id`; false when another fetch of the same
    /// pod got there first, or the grant ended meanwhile.
    fn mark_served(&self, id: &str, uid: &str) -> bool {
        let mut grants = self.lock();
        let Some(grant) = grants.get_mut(id) else {
            return false;
        };
        if grant.served.iter().any(|u| u == uid) {
            return false;
        }
        grant.served.push(uid.to_owned());
        let grant = grant.clone();
        drop(grants);
        if let Err(e) = self.keep(&grant) {
            tracing::warn!(error = %e, grant = %id, "cannot record a served fetch");
        }
        true
    }
}

enum Refusal {
    Unauthorized,
    Forbidden(String),
    BadRequest(String),
    NotFound,
}

/// Asks the cluster whether the pod that fetches is one of the grant's: `Err` says why not.
#[async_trait::async_trait]
pub trait PodCheck: Send + Sync {
    async fn check(&self, grant: &Grant, pod: &str, uid: &str) -> Result<(), String>;
}

type Body = BoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(format!("{message}\n")))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a valid response")
}

/// Open connections per peer address.
#[derive(Default)]
struct Peers(Mutex<HashMap<std::net::IpAddr, usize>>);

/// One connection's place among its peer's, given back when dropped.
struct PeerSlot(Arc<Peers>, std::net::IpAddr);

impl Peers {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= MAX_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot(self.clone(), ip))
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.1) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Serves fetches on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    grants: Arc<Grants>,
    pods: Arc<dyn PodCheck>,
    users: UserCode,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let peers = Arc::new(Peers::default());
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "fetch server: cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = peers.take(peer.ip()) else {
            tracing::warn!(%peer, "fetch server: too many connections from this address; closed");
            continue;
        };
        let (grants, pods, users) = (grants.clone(), pods.clone(), users.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (grants, pods, users) = (grants.clone(), pods.clone(), users.clone());
                async move { Ok::<_, Infallible>(answer(req, &grants, &*pods, &users).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            drop((permit, slot));
        });
    }
}

/// `GET /v1/checkouts/<grant>?pod=<name>&uid=<uid>` with `Authorization: Bearer <secret>`.
async fn answer(
    req: Request<hyper::body::Incoming>,
    grants: &Grants,
    pods: &dyn PodCheck,
    users: &UserCode,
) -> Response<Body> {
    match authorize(&req, grants, pods).await {
        Ok(grant) => tarball(&grant, users).await,
        Err(Refusal::Unauthorized) => text(
            StatusCode::UNAUTHORIZED,
            "unknown grant or wrong secret (a grant ends with its instance)",
        ),
        Err(Refusal::Forbidden(why)) => text(StatusCode::FORBIDDEN, &why),
        Err(Refusal::BadRequest(why)) => text(StatusCode::BAD_REQUEST, &why),
        Err(Refusal::NotFound) => text(StatusCode::NOT_FOUND, "no such path"),
    }
}

async fn authorize(
    req: &Request<hyper::body::Incoming>,
    grants: &Grants,
    pods: &dyn PodCheck,
) -> Result<Grant, Refusal> {
    let id = req
        .uri()
        .path()
        .strip_prefix("/v1/checkouts/")
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or(Refusal::NotFound)?;
    if req.method() != hyper::Method::GET {
        return Err(Refusal::BadRequest("only GET".into()));
    }
    let secret = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(Refusal::Unauthorized)?;
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let (Some(pod), Some(uid)) = (query.get("pod"), query.get("uid")) else {
        return Err(Refusal::BadRequest(
            "name the pod that fetches: ?pod=<name>&uid=<uid>".into(),
        ));
    };
    // Both go into a request to the API server: nothing but a pod's name and uid.
    let name_like = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !name_like(pod, 253) || !name_like(uid, 64) {
        return Err(Refusal::BadRequest("not a pod's name and uid".into()));
    }
    let grant = grants.check(id, secret, uid)?;
    pods.check(&grant, pod, uid)
        .await
        .map_err(Refusal::Forbidden)?;
    if !grants.mark_served(id, uid) {
        return Err(Refusal::Forbidden(
            "this pod fetched its checkout already".into(),
        ));
    }
    tracing::info!(sandbox = %grant.sandbox, service = %grant.service, %pod, "a pod fetches its checkout");
    Ok(grant)
}

/// The checkout as a tar stream, made by `tar` as user code's user. A `tar` that fails ends
/// the body with an error, so the client sees a broken transfer, never a short tarball.
async fn tarball(grant: &Grant, users: &UserCode) -> Response<Body> {
    let mut tar = users.command("tar");
    tar.args(["-c", "-f", "-", "-C"])
        .arg(&grant.checkout)
        .arg(".")
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        )
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = match tar.spawn() {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(error = %e, "fetch server: cannot run tar");
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot pack the checkout",
            );
        }
    };
    let stdout = child.stdout.take().expect("piped");
    let data = tokio_util::io::ReaderStream::new(stdout).map_ok(Frame::data);
    let end = futures_util::stream::once(async move {
        match child.wait().await {
            Ok(status) if status.success() => None,
            Ok(status) => Some(Err(std::io::Error::other(format!("tar ended: {status}")))),
            Err(e) => Some(Err(e)),
        }
    })
    .filter_map(std::future::ready);
    Response::builder()
        .header("content-type", "application/x-tar")
        .body(BodyExt::boxed(StreamBody::new(data.chain(end))))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Nobody;

    #[async_trait::async_trait]
    impl PodCheck for Nobody {
        async fn check(&self, _: &Grant, _: &str, _: &str) -> Result<(), String> {
            Err("no such pod".into())
        }
    }

    /// A request from `source` (an address of the loopback network), and the answer's first
    /// line; empty when the server closed the connection unanswered.
    async fn ask(port: u16, source: [u8; 4]) -> String {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let mut stream = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
        let _ = stream
            .write_all(b"GET /v1/checkouts/00ff?pod=p&uid=u HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s\r\nConnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test]
    async fn one_address_holding_its_share_of_idle_connections_blocks_no_other_and_an_unknown_grant_is_401()
     {
        let dir = tempfile::tempdir().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let grants = Arc::new(Grants::new(Layout::new(dir.path()).unwrap()));
        tokio::spawn(serve(
            listener,
            grants,
            Arc::new(Nobody),
            UserCode::default(),
        ));
        let mut idle = Vec::new();
        for _ in 0..MAX_PER_PEER {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(([127, 0, 0, 2], 0).into()).unwrap();
            idle.push(socket.connect(([127, 0, 0, 1], port).into()).await.unwrap());
        }
        // Let the server take them all up.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            ask(port, [127, 0, 0, 2]).await,
            "",
            "one more of that address is closed"
        );
        assert_eq!(ask(port, [127, 0, 0, 3]).await, "HTTP/1.1 401 Unauthorized");
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(ask(port, [127, 0, 0, 2]).await, "HTTP/1.1 401 Unauthorized");
    }
}
