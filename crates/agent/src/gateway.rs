//! The gateway agent's side of routing: the router, fed with the control plane's tables, and
//! the last table kept on disk so that a restart of either side routes as before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sdp_protocol::{JobError, JobErrorCode, JobOutput, RouteTable, SandboxName};
use sdp_router::{Router, RouterConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;

pub struct Gateway {
    router: Router,
    listen: SocketAddr,
    /// `<work_dir>/routes.json`.
    saved: PathBuf,
    /// One table at a time is installed and saved, so the file is the table in use. Holds
    /// the generation last applied on this connection to the control plane.
    installing: Mutex<u64>,
}

impl Gateway {
    /// A router serving the table saved by the previous run, if there is one.
    pub fn new(config: &GatewayConfig, work_dir: &Path) -> Self {
        let router = Router::new(RouterConfig {
            connect_timeout: config.connect_timeout.get(),
            response_timeout: config.upstream_timeout.get(),
            // Checked by `AgentConfig::validate` before; were it not, trusting nobody is the
            // safe side.
            trusted_proxies: config.trusted_proxies().unwrap_or_default(),
            ..RouterConfig::default()
        });
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
            listen: config.listen,
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

    pub fn requests(&self, sandbox: &SandboxName) -> JobOutput {
        JobOutput::Requests {
            requests: self.router.requests(sandbox.as_str()),
        }
    }
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
