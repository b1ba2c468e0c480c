//! The route inspector: the last routing decisions of each sandbox, in memory only.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use sdp_protocol::{MAX_FRAME_BYTES, RouteDecision, split_escaped};

/// Decisions kept per sandbox.
pub const KEPT_PER_SANDBOX: usize = 200;

/// The most of a request's path and method kept, encoded; longer ones are cut (marked `…`).
/// A client chooses them, up to the size of a request head: uncut, the kept decisions could
/// take megabytes of memory per sandbox, and more than a frame in the route inspector's answer.
const MAX_PATH: usize = 1024;
const MAX_METHOD: usize = 32;

// The inspector's answer fits one frame, fields besides the path and method included (the
// agent would send it in parts otherwise).
const _: () = assert!(KEPT_PER_SANDBOX * (MAX_PATH + MAX_METHOD + 1024) < MAX_FRAME_BYTES);

/// One shard per serving thread, so that threads recording at full speed never wait for each
/// other; a reader merges the shards.
pub struct Inspector {
    shards: Box<[Mutex<Shard>]>,
}

/// One thread's decisions, by sandbox, oldest first.
type Shard = HashMap<String, VecDeque<RouteDecision>>;

impl Inspector {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, shard: usize, sandbox: &str, mut decision: RouteDecision) {
        cut(&mut decision.path, MAX_PATH);
        cut(&mut decision.method, MAX_METHOD);
        let mut all = self.lock(shard);
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

    /// The last [`KEPT_PER_SANDBOX`] of all shards, newest first.
    pub fn recent(&self, sandbox: &str) -> Vec<RouteDecision> {
        let mut all = Vec::new();
        for shard in 0..self.shards.len() {
            if let Some(kept) = self.lock(shard).get(sandbox) {
                all.extend(kept.iter().rev().cloned());
            }
        }
        // By when the answer came, as each shard keeps them (a request that waited for a
        // nested one is recorded after it); stable, and each shard's newest first, so that
        // decisions of the same instant stay newest first.
        all.sort_by_key(|d| std::cmp::Reverse(answered(d)));
        all.truncate(KEPT_PER_SANDBOX);
        all
    }

    /// Forgets the sandboxes no longer routed, so that memory stays bounded by the live ones.
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        for shard in 0..self.shards.len() {
            self.lock(shard).retain(|name, _| live(name));
        }
    }
}

/// Cuts `text` to at most `max` bytes encoded, between characters, marking the cut.
fn cut(text: &mut String, max: usize) {
    let (kept, rest) = split_escaped(text, max - '…'.len_utf8());
    if !rest.is_empty() {
        let kept = kept.len();
        text.truncate(kept);
        text.push('…');
    }
}

fn answered(d: &RouteDecision) -> time::OffsetDateTime {
    d.time + time::Duration::seconds_f64(d.duration_ms / 1000.0)
}

#[cfg(test)]
mod tests {
    use sdp_protocol::RouteKind;
    use time::OffsetDateTime;

    use super::*;

    fn decision(status: u16) -> RouteDecision {
        RouteDecision {
            time: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(status.into()),
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
    fn only_the_last_decisions_of_all_threads_are_kept_newest_first() {
        let inspector = Inspector::new(2);
        for status in 0..(KEPT_PER_SANDBOX as u16 + 50) {
            inspector.record(usize::from(status % 3 == 0), "a", decision(status));
        }
        inspector.record(0, "b", decision(7));
        let recent = inspector.recent("a");
        assert_eq!(recent.len(), KEPT_PER_SANDBOX);
        let statuses: Vec<u16> = recent.iter().map(|d| d.status).collect();
        let expected: Vec<u16> = (50..KEPT_PER_SANDBOX as u16 + 50).rev().collect();
        assert_eq!(statuses, expected);
        inspector.retain(|name| name == "b");
        assert!(inspector.recent("a").is_empty());
        assert_eq!(inspector.recent("b").len(), 1);
    }

    #[test]
    fn decisions_of_the_same_instant_stay_newest_first() {
        let inspector = Inspector::new(1);
        for status in [1, 2, 3] {
            let mut d = decision(0);
            d.status = status;
            inspector.record(0, "a", d);
        }
        let statuses: Vec<u16> = inspector.recent("a").iter().map(|d| d.status).collect();
        assert_eq!(statuses, [3, 2, 1]);
    }

    #[test]
    fn a_request_that_waited_for_a_nested_one_comes_after_it_newest_first() {
        let inspector = Inspector::new(2);
        let mut outer = decision(1);
        outer.duration_ms = 5000.0;
        inspector.record(0, "a", outer);
        inspector.record(1, "a", decision(2));
        let statuses: Vec<u16> = inspector.recent("a").iter().map(|d| d.status).collect();
        assert_eq!(statuses, [1, 2]);
    }

    #[test]
    fn long_paths_and_methods_are_cut_so_that_the_answer_fits_a_frame() {
        let inspector = Inspector::new(1);
        for status in 0..KEPT_PER_SANDBOX as u16 {
            let mut d = decision(status);
            // Quotes take two bytes each once encoded, 'é' two as it is.
            d.path = format!("/{}{}", "\"".repeat(20_000), "é".repeat(20_000));
            d.method = "X".repeat(10_000);
            inspector.record(0, "a", d);
        }
        let recent = inspector.recent("a");
        for d in &recent {
            assert!(sdp_protocol::escaped_len(&d.path) <= MAX_PATH);
            assert!(d.path.ends_with('…'));
            assert!(d.method.len() <= MAX_METHOD);
        }
        let answer = sdp_protocol::encode(&sdp_protocol::JobOutput::Requests { requests: recent });
        assert!(answer.len() < MAX_FRAME_BYTES, "{}", answer.len());
    }
}
