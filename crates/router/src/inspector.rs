//! The route inspector: the last routing decisions of each sandbox, in memory only.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use sdp_protocol::RouteDecision;

/// Decisions kept per sandbox.
pub const KEPT_PER_SANDBOX: usize = 200;

#[derive(Default)]
pub struct Inspector {
    by_sandbox: Mutex<HashMap<String, VecDeque<RouteDecision>>>,
}

impl Inspector {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<RouteDecision>>> {
        self.by_sandbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, sandbox: &str, decision: RouteDecision) {
        let mut all = self.lock();
        let kept = match all.get_mut(sandbox) {
            Some(kept) => kept,
            None => all
                .entry(sandbox.to_owned())
                .or_insert_with(|| VecDeque::with_capacity(16)),
        };
        if kept.len() == KEPT_PER_SANDBOX {
            kept.pop_front();
        }
        kept.push_back(decision);
    }

    /// Newest first.
    pub fn recent(&self, sandbox: &str) -> Vec<RouteDecision> {
        self.lock()
            .get(sandbox)
            .map(|kept| kept.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the sandboxes no longer routed, so that memory stays bounded by the live ones.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| live(name));
    }
}

#[cfg(test)]
mod tests {
    use sdp_protocol::RouteKind;
    use time::OffsetDateTime;

    use super::*;

    fn decision(status: u16) -> RouteDecision {
        RouteDecision {
            time: OffsetDateTime::UNIX_EPOCH,
            method: "GET".into(),
            path: "/".into(),
            service: None,
            route: RouteKind::Baseline,
            upstream: None,
            status,
            duration_ms: 0.0,
        }
    }

    #[test]
    fn only_the_last_decisions_are_kept_newest_first() {
        let inspector = Inspector::default();
        for status in 0..(KEPT_PER_SANDBOX as u16 + 50) {
            inspector.record("a", decision(status));
        }
        inspector.record("b", decision(7));
        let recent = inspector.recent("a");
        assert_eq!(recent.len(), KEPT_PER_SANDBOX);
        assert_eq!(recent[0].status, KEPT_PER_SANDBOX as u16 + 49);
        assert_eq!(recent.last().unwrap().status, 50);
        inspector.retain(|name| name == "b");
        assert!(inspector.recent("a").is_empty());
        assert_eq!(inspector.recent("b").len(), 1);
    }
}
