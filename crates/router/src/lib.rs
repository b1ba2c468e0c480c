//! The sandbox router (SPEC §5): one HTTP listener that sends the services a sandbox runs to
//! the sandbox's instances and everything else to the shared baseline.
//!
//! A request's life: [`table::Table::sandbox_of`] reads which sandbox it names (Host, then
//! `X-SDP-Sandbox`, then the baggage member `sdp-sandbox`); [`table::Table::route`] picks the
//! service by the longest route prefix and the upstream (the sandbox's instance, else the
//! baseline); [`proxy`] rewrites the headers a proxy must, streams the request there through
//! a keep-alive pool, and streams the answer back with `X-SDP-Route`. Decisions for sandboxes
//! are kept by the [`inspector::Inspector`]; every answer is counted by where it went and its
//! status class, with the upstream's latency ([`metrics`]), which [`Router::serve_metrics`]
//! serves apart from the routed traffic.
//!
//! A request naming a sandbox that sleeps is held instead (`proxy::hold`): the router asks its
//! owner to wake the sandbox ([`Reports::wake`], once per [`WAKE_REPEAT`] however many
//! requests wait), waits for installs until a table shows the sandbox awake, and routes the
//! request by that table; past the table's `wake_timeout`, 503 `sandbox_waking` with
//! `Retry-After`. The sandboxes whose requests reached their instances, or were held, are
//! noted (one flag per sandbox, read before written) until [`Router::take_activity`].
//!
//! The table is swapped whole ([`Router::install`]); each request holds the table it started
//! with until it ends, so a change never drops or reroutes a request in flight (a held
//! request, which no table could route, takes the one that wakes its sandbox). The router
//! knows nothing of the database or the control plane: the gateway agent feeds it, and hears
//! its wakes and activity.

mod fast;
pub mod h1;
mod inspector;
mod metrics;
mod pool;
mod proxy;
mod rewind;
mod sleep;
pub mod table;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
pub use ipnet::IpNet;
use sdp_protocol::{RouteDecision, RouteTable};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use inspector::KEPT_PER_SANDBOX;
pub use sleep::{RETRY_AFTER, Reports, WAKE_REPEAT};
pub use table::TableError;
use table::{Activity, Table};

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
    /// Threads that serve connections; 0 means one per CPU.
    pub threads: usize,
    /// Peers whose `X-Forwarded-For/-Proto/-Host` are kept (a proxy in front, such as nginx
    /// for TLS); from any other peer they are replaced. Empty: nobody's are kept.
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(30),
            threads: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// A cheap handle: clones share one table and inspector.
#[derive(Clone)]
pub struct Router {
    shared: Arc<Shared>,
}

/// What every serving thread reads.
struct Shared {
    /// One table per serving thread, each compiled on its own: each request holds its
    /// thread's, and threads sharing one would contend for its reference counts.
    tables: Box<[ArcSwap<Table>]>,
    inspector: inspector::Inspector,
    config: RouterConfig,
    tls: Arc<pool::Tls>,
    /// Counts installs: requests held for a sleeping sandbox wait for it to change, rather
    /// than each polling the table.
    installed: tokio::sync::watch::Sender<u64>,
    /// Which sandboxes had requests routed, until [`Router::take_activity`].
    activity: Activity,
    /// Wakes asked, so that many held requests ask once.
    wakes: sleep::Wakes,
    /// Requests and upstream latencies, one shard per serving thread.
    metrics: Arc<metrics::Metrics>,
    /// What [`Router::metrics`] encodes: the metrics above.
    registry: prometheus_client::registry::Registry,
}

/// One serving thread's view: its table, and its own upstream pool. A connection and the
/// upstream connections it uses live on one thread, so a request never waits for a wake-up
/// from another thread.
struct Inner {
    shared: Arc<Shared>,
    /// This thread's index, in `tables` and in the inspector's shards.
    thread: usize,
    pool: Arc<pool::Pool>,
    /// The fast path's upstream connections and buffers.
    fast: fast::Local,
}

impl Inner {
    fn table(&self) -> Arc<Table> {
        self.shared.tables[self.thread].load_full()
    }
}

/// Accepted connections waiting for their thread; a full queue slows accepting.
const HANDOFF: usize = 256;

impl Router {
    /// A router with an empty table: every request gets a 404 until [`Router::install`].
    /// Nobody hears of its wakes: see [`Router::with_reports`].
    pub fn new(config: RouterConfig) -> Self {
        Self::with_reports(config, Arc::new(sleep::NoReports))
    }

    /// A router that asks `reports` to wake the sleeping sandboxes its requests name.
    pub fn with_reports(mut config: RouterConfig, reports: Arc<dyn Reports>) -> Self {
        if config.threads == 0 {
            config.threads = std::thread::available_parallelism().map_or(1, usize::from);
        }
        let metrics = Arc::new(metrics::Metrics::new(config.threads));
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(metrics.clone()));
        Self {
            shared: Arc::new(Shared {
                tables: (0..config.threads)
                    .map(|_| ArcSwap::from_pointee(Table::default()))
                    .collect(),
                inspector: inspector::Inspector::new(config.threads),
                config,
                tls: Arc::default(),
                installed: tokio::sync::watch::Sender::new(0),
                activity: Activity::default(),
                wakes: sleep::Wakes::new(reports),
                metrics,
                registry,
            }),
        }
    }

    /// Routes new requests by `table` from now on; requests in flight finish on the table they
    /// started with. A table that does not compile changes nothing.
    pub fn install(&self, table: &RouteTable) -> Result<(), TableError> {
        // Compiled once per thread rather than cloned: a clone would share the upstreams'
        // `Host` values, and threads would again contend for their reference counts.
        let compiled = (0..self.shared.tables.len())
            .map(|_| Table::compile_with(table, &self.shared.activity).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for skipped in &compiled[0].skipped {
            tracing::warn!(reason = %skipped, "route left out of the table");
        }
        for (slot, table) in self.shared.tables.iter().zip(&compiled) {
            slot.store(table.clone());
        }
        // After the swap: a request still on the old table records into a sandbox that is
        // then forgotten, not into a new one of the same name.
        self.shared
            .inspector
            .retain(|name| compiled[0].has_sandbox(name));
        self.shared
            .activity
            .retain(|name| compiled[0].has_sandbox(name));
        self.shared
            .wakes
            .retain(|name| compiled[0].sandbox(name).is_some_and(|s| s.sleeping()));
        // Last: a held request that sees the change finds every thread's table new.
        self.shared.installed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The sandboxes that had requests routed to their instances, or held while they slept,
    /// since the last call (sorted); what keeps a sandbox awake.
    pub fn take_activity(&self) -> Vec<String> {
        self.shared.activity.take()
    }

    /// The last decisions for `sandbox`, newest first.
    pub fn requests(&self, sandbox: &str) -> Vec<RouteDecision> {
        self.shared.inspector.recent(sandbox)
    }

    /// The router's metrics in the Prometheus text format: requests by target and status
    /// class, upstream latency by target.
    pub fn metrics(&self) -> String {
        metrics::encode(&self.shared.registry)
    }

    /// Serves `GET /metrics` ([`Router::metrics`]) on `listener` until `shutdown`: a
    /// listener of its own, apart from the routed traffic. Other paths are 404.
    pub async fn serve_metrics(&self, listener: TcpListener, shutdown: CancellationToken) {
        let header_read_timeout = self.shared.config.header_read_timeout;
        while let Some((stream, peer)) = accept(&listener, &shutdown, "router metrics").await {
            let router = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let answer =
                        metrics::answer(&router.shared.registry, req.method(), req.uri().path());
                    async move { Ok::<_, Infallible>(answer) }
                });
                let connection = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    ended = connection => if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
                    },
                }
            });
        }
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown`. Connections are handed round-robin to
    /// serving threads, each a single-threaded runtime (the way nginx runs one event loop per
    /// worker): on a proxy's hot path, wake-ups across threads cost more than the work.
    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        let threads = self.shared.tables.len();
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (tx, rx) = tokio::sync::mpsc::channel(HANDOFF);
            let shared = self.shared.clone();
            let stop = shutdown.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("sdp-router-{i}"))
                .spawn(move || serve_thread(shared, i, rx, stop));
            match spawned {
                Ok(_) => workers.push(tx),
                Err(e) => tracing::error!(error = %e, "cannot start a router thread"),
            }
        }
        if workers.is_empty() {
            return;
        }
        let mut next = 0usize;
        while let Some((stream, peer)) = accept(&listener, &shutdown, "router").await {
            let _ = stream.set_nodelay(true);
            let Ok(stream) = stream.into_std() else {
                continue;
            };
            next = (next + 1) % workers.len();
            if workers[next].send((stream, peer)).await.is_err() {
                tracing::error!("a router thread stopped");
                return;
            }
        }
    }
}

/// One serving thread: its runtime, its upstream pool, the connections handed to it.
fn serve_thread(
    shared: Arc<Shared>,
    thread: usize,
    mut connections: tokio::sync::mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a router runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let pool = Arc::new(pool::Pool::new(
            shared.config.connect_timeout,
            shared.config.idle_timeout,
            shared.tls.clone(),
        ));
        let idle_timeout = shared.config.idle_timeout;
        let inner = Arc::new(Inner {
            shared,
            thread,
            pool,
            fast: fast::Local::new(),
        });
        let sweeper = inner.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout / 2);
            loop {
                tick.tick().await;
                sweeper.pool.sweep();
                sweeper.fast.sweep(idle_timeout);
            }
        });
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = connections.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => {
                    tokio::spawn(serve_connection(inner.clone(), stream, peer));
                }
                Err(e) => tracing::warn!(error = %e, "router cannot take a connection"),
            }
        }
    });
}

async fn serve_connection(inner: Arc<Inner>, mut stream: tokio::net::TcpStream, peer: SocketAddr) {
    // Decided once per connection: the peer is the same for each of its requests. An IPv4
    // peer of a dual-stack listener comes as `::ffff:a.b.c.d`, and is matched as IPv4.
    let ip = peer.ip().to_canonical();
    let trusted = inner
        .shared
        .config
        .trusted_proxies
        .iter()
        .any(|net| net.contains(&ip));
    let client = Arc::new(proxy::Client::new(peer, trusted));
    let mut buf = inner.fast.buffer();
    let end = fast::serve(&inner, &mut stream, &mut buf, &client).await;
    let read = bytes::Bytes::copy_from_slice(&buf);
    inner.fast.give_buffer(buf);
    if let fast::End::Handover = end {
        serve_hyper(inner, rewind::Rewind::new(read, stream), peer, client).await;
    }
}

/// Serves a connection's requests with hyper, to its end: what the fast path hands over.
async fn serve_hyper(
    inner: Arc<Inner>,
    io: rewind::Rewind,
    peer: SocketAddr,
    client: Arc<proxy::Client>,
) {
    let header_read_timeout = inner.shared.config.header_read_timeout;
    let service = service_fn(move |req| {
        let inner = inner.clone();
        let client = client.clone();
        async move { Ok::<_, Infallible>(proxy::handle(&inner, req, &client).await) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(%peer, error = %e, "router connection ended with an error");
    }
}

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failing
/// accept (out of file descriptors, typically) is waited out rather than spun on.
async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    what: &str,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
