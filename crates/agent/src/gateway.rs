//! The gateway agent's side of routing: the router, fed with the control plane's tables, and
//! the last table kept on disk so that a restart of either side routes as before.
//!
//! The router's reports go the other way ([`Gateway::report`], one task per connection): a
//! `wake` as soon as the router asks for one, and every [`ACTIVITY_PERIOD`] the sandboxes
//! that had requests routed, which keeps them awake. Without a connection, wakes are dropped
//! (the router asks again while requests wait) and activity accumulates in the router, one
//! flag per sandbox of its table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sdp_protocol::{AgentMessage, JobError, JobErrorCode, JobOutput, RouteTable, SandboxName};
use sdp_router::{Reports, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;

/// How often the sandboxes with routed requests are reported: far below any `idle_after`
/// worth having, and a frame every few seconds at most.
pub const ACTIVITY_PERIOD: Duration = Duration::from_secs(5);
/// Wakes waiting to be sent; past it they are dropped, and asked again by the router.
const WAKES: usize = 256;
/// Sandboxes named in one activity frame at most: 64 bytes each encoded at most, far within
/// the frame limit.
const ACTIVITY_BATCH: usize = 4096;
const _: () = assert!(ACTIVITY_BATCH * 80 < sdp_protocol::MAX_FRAME_BYTES);

/// The router's wakes, queued while a connection takes them.
struct WakeQueue {
    queue: mpsc::Sender<SandboxName>,
    /// A connection's [`Gateway::report`] is running.
    connected: AtomicBool,
}

impl Reports for WakeQueue {
    fn wake(&self, sandbox: &str) {
        if !self.connected.load(Ordering::Relaxed) {
            tracing::debug!(sandbox, "not connected to the control plane: wake dropped");
            return;
        }
        // Names come from the table, which holds valid ones.
        if let Ok(name) = SandboxName::parse(sandbox) {
            let _ = self.queue.try_send(name);
        }
    }
}

pub struct Gateway {
    router: Router,
    wakes: Arc<WakeQueue>,
    /// Taken by one connection's [`Gateway::report`] at a time.
    wakes_out: tokio::sync::Mutex<mpsc::Receiver<SandboxName>>,
    /// [`ACTIVITY_PERIOD`], shorter in tests.
    activity_period: Duration,
    listen: SocketAddr,
    /// Where the router's metrics are served, if anywhere.
    metrics_listen: Option<SocketAddr>,
    /// `<work_dir>/routes.json`.
    saved: PathBuf,
    /// One table at a time is installed and saved, so the file is the table in use. Holds
    /// the generation last applied on this connection to the control plane.
    installing: Mutex<u64>,
}

impl Gateway {
    /// A router serving the table saved by the previous run, if there is one.
    pub fn new(config: &GatewayConfig, work_dir: &Path) -> Self {
        let (queue, wakes_out) = mpsc::channel(WAKES);
        let wakes = Arc::new(WakeQueue {
            queue,
            connected: AtomicBool::new(false),
        });
        let router = Router::with_reports(
            RouterConfig {
                connect_timeout: config.connect_timeout.get(),
                response_timeout: config.upstream_timeout.get(),
                // Checked by `AgentConfig::validate` before; were it not, trusting nobody is the
                // safe side.
                trusted_proxies: config.trusted_proxies().unwrap_or_default(),
                ..RouterConfig::default()
            },
            wakes.clone(),
        );
        let saved = work_dir.join("routes.json");
        match std::fs::read(&saved) {
            Ok(bytes) => match serde_json::from_slice::<RouteTable>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|table| {
                    router.install(&table).map_err(|e| e.to_string())?;
                    Ok(table)
                }) {
                Ok(table) => tracing::info!(
                    path = %saved.display(),
                    sandboxes = table.sandboxes.len(),
                    services = table.services.len(),
                    "routing by the table saved before the restart"
                ),
                Err(e) => {
                    tracing::warn!(path = %saved.display(), error = %e, "the saved route table is unusable; routing nothing until the control plane sends one")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %saved.display(), error = %e, "cannot read the saved route table")
            }
        }
        Self {
            router,
            wakes,
            wakes_out: tokio::sync::Mutex::new(wakes_out),
            activity_period: ACTIVITY_PERIOD,
            listen: config.listen,
            metrics_listen: config.metrics_listen,
            saved,
            installing: Mutex::new(0),
        }
    }

    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        let listener = TcpListener::bind(self.listen).await?;
        tracing::info!(addr = %listener.local_addr()?, "router listening");
        Ok(listener)
    }

    pub async fn serve(&self, listener: TcpListener, shutdown: CancellationToken) {
        self.router.serve(listener, shutdown).await;
    }

    /// Binds the metrics listener, when `metrics_listen` asks for one.
    pub async fn bind_metrics(&self) -> Result<Option<TcpListener>, (SocketAddr, std::io::Error)> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr).await.map_err(|e| (addr, e))?;
        let bound = listener.local_addr().map_err(|e| (addr, e))?;
        tracing::info!(addr = %bound, "router metrics listening at /metrics");
        Ok(Some(listener))
    }

    pub async fn serve_metrics(&self, listener: TcpListener, shutdown: CancellationToken) {
        self.router.serve_metrics(listener, shutdown).await;
    }

    /// A new connection to the control plane: its tables count from the start again (it may
    /// be a restarted control plane).
    pub fn connected(&self) {
        *self.installing.lock().unwrap_or_else(|e| e.into_inner()) = 0;
    }

    /// Routes by `table` from now on, and saves it; an older table than the one applied on
    /// this connection is stale and changes nothing.
    pub fn install(&self, table: &RouteTable) -> JobOutput {
        let mut applied = self.installing.lock().unwrap_or_else(|e| e.into_inner());
        if table.generation < *applied {
            tracing::info!(
                generation = table.generation,
                applied = *applied,
                "stale route table ignored"
            );
            return JobOutput::RoutesApplied;
        }
        if let Err(e) = self.router.install(table) {
            tracing::error!(error = %e, "route table refused");
            return JobOutput::Failed(JobError {
                code: JobErrorCode::Failed,
                message: format!("the router refused the route table: {e}"),
            });
        }
        // Routing already uses it: a table that cannot be saved is still applied, and the
        // control plane sends it again when it next connects.
        *applied = table.generation;
        if let Err(e) = save(&self.saved, table) {
            tracing::error!(path = %self.saved.display(), error = %e, "cannot save the route table");
        }
        tracing::info!(
            sandboxes = table.sandboxes.len(),
            services = table.services.len(),
            "route table applied"
        );
        JobOutput::RoutesApplied
    }

    /// Sends the router's reports on one connection to the control plane (`outbox`) until
    /// `done`: each wake as it comes, and the activity every [`ACTIVITY_PERIOD`].
    pub async fn report(
        self: Arc<Self>,
        outbox: mpsc::Sender<AgentMessage>,
        done: CancellationToken,
    ) {
        let mut wakes = self.wakes_out.lock().await;
        // Asked for while no connection took them: dropped, as the router expects.
        while wakes.try_recv().is_ok() {}
        self.wakes.connected.store(true, Ordering::Relaxed);
        let period = self.activity_period;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let messages = tokio::select! {
                _ = done.cancelled() => break,
                Some(sandbox) = wakes.recv() => vec![AgentMessage::Wake { sandbox }],
                _ = tick.tick() => activity_frames(self.router.take_activity()),
            };
            for msg in messages {
                let sent = tokio::select! {
                    _ = done.cancelled() => false,
                    sent = outbox.send(msg) => sent.is_ok(),
                };
                if !sent {
                    // What was taken is lost with the connection: a few seconds of activity,
                    // against an `idle_after` of hours.
                    self.wakes.connected.store(false, Ordering::Relaxed);
                    return;
                }
            }
        }
        self.wakes.connected.store(false, Ordering::Relaxed);
    }

    pub fn requests(&self, sandbox: &SandboxName) -> JobOutput {
        JobOutput::Requests {
            requests: self.router.requests(sandbox.as_str()),
        }
    }
}

/// The activity frames for `sandboxes`: none when empty.
fn activity_frames(sandboxes: Vec<String>) -> Vec<AgentMessage> {
    let names: Vec<SandboxName> = sandboxes
        .into_iter()
        .filter_map(|name| SandboxName::parse(name).ok())
        .collect();
    names
        .chunks(ACTIVITY_BATCH)
        .map(|chunk| AgentMessage::Activity {
            sandboxes: chunk.to_vec(),
        })
        .collect()
}

/// Written aside, flushed to disk and renamed over: a crash or a power cut leaves the old
/// table or the new one, never half of one.
fn save(path: &Path, table: &RouteTable) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec(table)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sdp_protocol::{SandboxRoutes, ServiceName, ServiceRoutes};

    use super::*;

    /// A table where `asleep` sleeps and `awake` runs `orders` on `upstream`.
    fn table(upstream: SocketAddr) -> RouteTable {
        let orders = ServiceName::parse("orders").unwrap();
        let sandbox = |name: &str, sleeping| SandboxRoutes {
            sandbox: SandboxName::parse(name).unwrap(),
            upstreams: BTreeMap::from([(orders.clone(), upstream.to_string())]),
            down: BTreeMap::new(),
            sleeping,
            gateway: None,
        };
        RouteTable {
            generation: 1,
            base_domain: "sandbox.test".into(),
            services: vec![ServiceRoutes {
                service: orders.clone(),
                routes: vec!["/orders".into()],
                baseline: String::new(),
            }],
            sandboxes: vec![sandbox("asleep", true), sandbox("awake", false)],
            wake_timeout_ms: 200,
        }
    }

    /// A gateway routing by [`table`] on a loopback port, reporting every 100 ms. The
    /// instance of `awake` is a port nobody listens on: a 502 is activity all the same.
    async fn gateway(work: &Path) -> (Arc<Gateway>, String, CancellationToken) {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let mut gateway = Gateway::new(
            &GatewayConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))),
            work,
        );
        gateway.activity_period = Duration::from_millis(100);
        let gateway = Arc::new(gateway);
        assert_eq!(gateway.install(&table(dead_addr)), JobOutput::RoutesApplied);
        let listener = gateway.bind().await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let serving = gateway.clone();
        let shutdown = stop.clone();
        tokio::spawn(async move { serving.serve(listener, shutdown).await });
        (gateway, url, stop)
    }

    async fn get(url: &str, sandbox: &str) -> u16 {
        reqwest::Client::new()
            .get(format!("{url}/orders/1"))
            .header("x-sdp-sandbox", sandbox)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn next(frames: &mut mpsc::Receiver<AgentMessage>) -> AgentMessage {
        tokio::time::timeout(Duration::from_secs(20), frames.recv())
            .await
            .expect("no frame within 20 s")
            .expect("the report task ended")
    }

    #[tokio::test]
    async fn on_a_connection_wakes_go_out_at_once_and_activity_every_period() {
        let work = tempfile::tempdir().unwrap();
        let (gateway, url, _stop) = gateway(work.path()).await;
        let (outbox, mut frames) = mpsc::channel(16);
        let done = CancellationToken::new();
        tokio::spawn(gateway.clone().report(outbox, done.clone()));
        // The task has the queue once it drained it; a wake before would be dropped.
        while !gateway.wakes.connected.load(Ordering::Relaxed) {
            tokio::task::yield_now().await;
        }

        assert_eq!(get(&url, "asleep").await, 503);
        match next(&mut frames).await {
            AgentMessage::Wake { sandbox } => assert_eq!(sandbox.as_str(), "asleep"),
            other => panic!("{other:?}"),
        }
        assert_eq!(get(&url, "awake").await, 502);
        // The held request may be reported in a period of its own.
        let mut reported = std::collections::BTreeSet::new();
        while reported.len() < 2 {
            match next(&mut frames).await {
                AgentMessage::Activity { sandboxes } => {
                    assert!(!sandboxes.is_empty());
                    reported.extend(sandboxes.iter().map(|s| s.as_str().to_owned()));
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(Vec::from_iter(reported), ["asleep", "awake"]);
        // Nothing routed since: no more frames.
        assert!(
            tokio::time::timeout(Duration::from_millis(400), frames.recv())
                .await
                .is_err()
        );

        done.cancel();
        tokio::time::timeout(Duration::from_secs(20), async {
            while gateway.wakes.connected.load(Ordering::Relaxed) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the report task never ended");
    }

    #[tokio::test]
    async fn without_a_connection_wakes_are_dropped_and_activity_waits_for_the_next() {
        let work = tempfile::tempdir().unwrap();
        let (gateway, url, _stop) = gateway(work.path()).await;

        assert_eq!(get(&url, "asleep").await, 503);
        assert_eq!(get(&url, "awake").await, 502);

        let (outbox, mut frames) = mpsc::channel(16);
        let done = CancellationToken::new();
        let _stop_reporting = done.clone().drop_guard();
        tokio::spawn(gateway.clone().report(outbox, done));
        match next(&mut frames).await {
            AgentMessage::Activity { sandboxes } => {
                let names: Vec<&str> = sandboxes.iter().map(SandboxName::as_str).collect();
                assert_eq!(names, ["asleep", "awake"]);
            }
            other => panic!("the wake was not dropped: {other:?}"),
        }
    }
}
