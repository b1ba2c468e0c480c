//! Keep-alive connections to upstreams, one pool per serving thread.
//!
//! A connection goes back to the pool the moment its response body has been read to the
//! end, without a task of its own watching it (the reason this is not `hyper-util`'s pooled
//! client: that spawns one per request, which showed in the router's profile). A pooled
//! connection the upstream closed meanwhile hands the unsent request back, and it goes out on
//! a new connection.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::table::{FastMap, Upstream};

/// Idle connections kept per upstream and thread; more are closed when they come back.
const MAX_IDLE: usize = 256;
/// How long a pooled connection may take to be ready for its next request.
const READY_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Failed(String),
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

pub struct Pool {
    idle: Mutex<FastMap<String, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    tls: Arc<Tls>,
}

/// TLS to `https://` upstreams, verified against the system's trusted certificates (or
/// `SSL_CERT_FILE`), made on first use and shared by every thread.
#[derive(Default)]
pub struct Tls(std::sync::OnceLock<tokio_rustls::TlsConnector>);

impl Tls {
    fn connector(&self) -> &tokio_rustls::TlsConnector {
        self.0.get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "cannot read some trusted certificates");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::info!(
                added,
                ignored,
                "trusted certificates loaded for https upstreams"
            );
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
    }
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, tls: Arc<Tls>) -> Self {
        Self {
            idle: Mutex::default(),
            connect_timeout,
            idle_timeout,
            tls,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` (origin-form URI, `Host` set) to `upstream`.
    pub async fn send(
        self: &Arc<Self>,
        upstream: &Upstream,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let key = upstream.key();
        while let Some(mut sender) = self.take(key).await {
            match sender.try_send_request(req).await {
                Ok(response) => return Ok(self.wrap(response, key, sender)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection was closed or busy.
                    Some(unsent) => req = unsent,
                    None => return Err(UpstreamError::Failed(error_chain(&e.into_error()))),
                },
            }
        }
        let mut sender = self.connect(upstream).await?;
        match sender.send_request(req).await {
            Ok(response) => Ok(self.wrap(response, key, sender)),
            Err(e) => Err(UpstreamError::Failed(error_chain(&e))),
        }
    }

    /// An idle connection to `key` that can take a request now.
    async fn take(&self, key: &str) -> Option<SendRequest<RequestBody>> {
        loop {
            let mut entry = self.lock().get_mut(key)?.pop()?;
            if entry.sender.is_closed() || entry.since.elapsed() >= self.idle_timeout {
                continue;
            }
            if entry.sender.is_ready() {
                return Some(entry.sender);
            }
            // Given back the moment its last response ended, the connection's task may not
            // have caught up yet: it runs on this thread, so a short wait is enough. One
            // still busy after that (an early answer to an upload) is let go.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, entry.sender.ready()).await {
                return Some(entry.sender);
            }
        }
    }

    fn give_back(&self, key: &str, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = match idle.get_mut(key) {
            Some(list) => list,
            None => idle.entry(key.to_owned()).or_default(),
        };
        if list.len() < MAX_IDLE {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle too long, and forgets closed ones.
    pub fn sweep(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            list.retain(|e| !e.sender.is_closed() && e.since.elapsed() < self.idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }

    fn wrap(
        self: &Arc<Self>,
        response: Response<Incoming>,
        key: &str,
        sender: SendRequest<RequestBody>,
    ) -> Response<PooledBody> {
        // An upgraded connection belongs to the upgrade, never to the pool.
        let give_back =
            (response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS).then(|| GiveBack {
                pool: self.clone(),
                key: key.to_owned(),
                sender,
            });
        response.map(|inner| Watched::new(inner, give_back))
    }

    /// A new connection (TCP, and TLS for `https://`) within `connect_timeout`.
    async fn connect(
        &self,
        upstream: &Upstream,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        tokio::time::timeout(self.connect_timeout, self.open(upstream))
            .await
            .map_err(|_| {
                UpstreamError::Connect(format!(
                    "no connection within {}s",
                    self.connect_timeout.as_secs_f32()
                ))
            })?
    }

    async fn open(&self, upstream: &Upstream) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let stream = tokio::net::TcpStream::connect(upstream.socket_address())
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        if !upstream.is_https() {
            return handshake(stream).await;
        }
        let name = rustls::pki_types::ServerName::try_from(upstream.host_name().to_owned())
            .map_err(|e| UpstreamError::Connect(format!("not a TLS server name: {e}")))?;
        let stream = self
            .tls
            .connector()
            .connect(name, stream)
            .await
            .map_err(|e| UpstreamError::Connect(format!("TLS: {}", error_chain(&e))))?;
        handshake(stream).await
    }
}

/// HTTP/1.1 over `io`; the connection runs in a task of this thread.
async fn handshake<T>(io: T) -> Result<SendRequest<RequestBody>, UpstreamError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::Connect(error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// What happens once a body has been read to the end; dropped unrun if the body breaks or
/// is dropped before.
pub trait AtEnd {
    fn ended(self);
}

/// A body that runs its [`AtEnd`] the moment it has been read to the end.
pub struct Watched<E: AtEnd> {
    inner: Incoming,
    at_end: Option<E>,
}

impl<E: AtEnd> Watched<E> {
    fn new(inner: Incoming, at_end: Option<E>) -> Self {
        let mut body = Self { inner, at_end };
        // An empty body is never polled.
        if body.inner.is_end_stream() {
            body.end();
        }
        body
    }

    fn end(&mut self) {
        if let Some(at_end) = self.at_end.take() {
            at_end.ended();
        }
    }
}

impl<E: AtEnd + Unpin> Body for Watched<E> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.end(),
            // The reader stops polling once the body says it has ended.
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.end(),
            Poll::Ready(Some(Err(_))) => this.at_end = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that tells when it has been sent whole: the wait for the response starts
/// then, so that an upload takes as long as it takes. A broken body tells it too (the
/// sender is dropped).
pub type RequestBody = Watched<Sent>;

pub struct Sent(tokio::sync::oneshot::Sender<()>);

impl AtEnd for Sent {
    fn ended(self) {
        let _ = self.0.send(());
    }
}

impl RequestBody {
    /// The body, and what resolves once it is sent (none when there is nothing to send).
    pub fn sent(inner: Incoming) -> (Self, Option<tokio::sync::oneshot::Receiver<()>>) {
        if inner.is_end_stream() {
            return (Watched::new(inner, None), None);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Watched::new(inner, Some(Sent(tx))), Some(rx))
    }
}

/// A response body that puts its connection back in the pool once read to the end; a body
/// broken or dropped before closes its connection instead.
pub type PooledBody = Watched<GiveBack>;

pub struct GiveBack {
    pool: Arc<Pool>,
    key: String,
    sender: SendRequest<RequestBody>,
}

impl AtEnd for GiveBack {
    fn ended(self) {
        self.pool.give_back(&self.key, self.sender);
    }
}

/// An error and its causes, for a person: "connection closed before message completed".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
