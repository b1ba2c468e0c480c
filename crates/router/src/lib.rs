//! The sandbox router (SPEC §5): one HTTP listener that sends the services a sandbox runs to
//! the sandbox's instances and everything else to the shared baseline.
//!
//! A request's life: [`table::Table::sandbox_of`] reads which sandbox it names (Host, then
//! `X-SDP-Sandbox`, then the baggage member `sdp-sandbox`); [`table::Table::route`] picks the
//! service by the longest route prefix and the upstream (the sandbox's instance, else the
//! baseline); [`proxy`] rewrites the headers a proxy must, streams the request there through
//! a keep-alive pool, and streams the answer back with `X-SDP-Route`. Decisions for sandboxes
//! are kept by the [`inspector::Inspector`].
//!
//! The table is swapped whole ([`Router::install`]); each request holds the table it started
//! with until it ends, so a change never drops or reroutes a request in flight. The router
//! knows nothing of the database or the control plane: the gateway agent feeds it.

mod inspector;
mod proxy;
pub mod table;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sdp_protocol::{RouteDecision, RouteTable};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use inspector::KEPT_PER_SANDBOX;
use table::Table;
pub use table::TableError;

/// The router's bounded waits.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// To open a connection to an upstream; past it the client gets a 502.
    pub connect_timeout: Duration,
    /// From sending a request to the head of its response; past it the client gets a 504.
    /// Bodies and upgraded connections stream for as long as they last.
    pub response_timeout: Duration,
    /// An idle pooled connection to an upstream is closed after it.
    pub idle_timeout: Duration,
    /// For a client to send a request's head.
    pub header_read_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// A cheap handle: clones share one table, pool and inspector.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    table: ArcSwap<Table>,
    inspector: inspector::Inspector,
    client: Client<HttpConnector, hyper::body::Incoming>,
    config: RouterConfig,
}

impl Router {
    /// A router with an empty table: every request gets a 404 until [`Router::install`].
    pub fn new(config: RouterConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.idle_timeout)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self {
            inner: Arc::new(Inner {
                table: ArcSwap::from_pointee(Table::default()),
                inspector: inspector::Inspector::default(),
                client,
                config,
            }),
        }
    }

    /// Routes new requests by `table` from now on; requests in flight finish on the table they
    /// started with. A table that does not compile changes nothing.
    pub fn install(&self, table: &RouteTable) -> Result<(), TableError> {
        let compiled = Table::compile(table)?;
        self.inner
            .inspector
            .retain(|name| compiled.has_sandbox(name));
        self.inner.table.store(Arc::new(compiled));
        Ok(())
    }

    /// The last decisions for `sandbox`, newest first.
    pub fn requests(&self, sandbox: &str) -> Vec<RouteDecision> {
        self.inner.inspector.recent(sandbox)
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown`; connections open then run to their
    /// end.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, typically: wait rather than spin.
                        tracing::warn!(error = %e, "router cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let inner = self.inner.clone();
            tokio::spawn(serve_connection(inner, stream, peer));
        }
    }
}

async fn serve_connection(inner: Arc<Inner>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let header_read_timeout = inner.config.header_read_timeout;
    let service = service_fn(move |req| {
        let inner = inner.clone();
        async move { Ok::<_, Infallible>(proxy::handle(&inner, req, peer).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "router connection ended with an error");
    }
}
