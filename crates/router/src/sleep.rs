//! Sandboxes that sleep (SPEC §3): what the router tells its owner, and how often. A request
//! naming a sleeping sandbox is held by `proxy::hold` while the router asks its owner to wake
//! the sandbox ([`Reports::wake`], once per [`WAKE_REPEAT`] however many requests wait); an
//! installed table that shows the sandbox awake releases it, and it is routed by that table.
//! Past the table's `wake_timeout` the client gets 503 `sandbox_waking` with `Retry-After`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::table::FastMap;

/// A wake is asked once per sandbox in this long, however many requests wait for it; asked
/// again after it while requests still wait (the owner may have dropped the first: it was
/// not connected to the control plane, say).
pub const WAKE_REPEAT: Duration = Duration::from_secs(5);

/// What a client that waited `wake_timeout` in vain is told to wait before trying again: the
/// sandbox is still starting, and another request asks nothing new.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// What the router tells its owner (the gateway agent). Called from serving threads: it must
/// not block.
pub trait Reports: Send + Sync + 'static {
    /// Requests wait for `sandbox`, which sleeps: it should be woken. Asked again every
    /// [`WAKE_REPEAT`] while they still wait.
    fn wake(&self, sandbox: &str);
}

/// For a router nobody listens to.
pub(crate) struct NoReports;

impl Reports for NoReports {
    fn wake(&self, _sandbox: &str) {}
}

/// The wakes asked lately, so that the owner hears of each sandbox once per [`WAKE_REPEAT`].
pub(crate) struct Wakes {
    reports: Arc<dyn Reports>,
    asked: Mutex<FastMap<String, Instant>>,
}

impl Wakes {
    pub(crate) fn new(reports: Arc<dyn Reports>) -> Self {
        Self {
            reports,
            asked: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<String, Instant>> {
        self.asked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the owner to wake `sandbox`, unless that was asked less than [`WAKE_REPEAT`] ago.
    pub(crate) fn ask(&self, sandbox: &str) {
        let now = Instant::now();
        {
            let mut asked = self.lock();
            match asked.get_mut(sandbox) {
                Some(at) if now.duration_since(*at) < WAKE_REPEAT => return,
                Some(at) => *at = now,
                None => {
                    asked.insert(sandbox.to_owned(), now);
                }
            }
        }
        tracing::info!(
            sandbox,
            "a request waits for a sleeping sandbox: asking to wake it"
        );
        self.reports.wake(sandbox);
    }

    /// Forgets the wakes of sandboxes no longer asleep: when one sleeps again, its first
    /// request asks at once.
    pub(crate) fn retain(&self, sleeping: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| sleeping(name));
    }
}
