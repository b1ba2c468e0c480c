//! The login limiter (SPEC §6: "logins are rate-limited"): every `POST /api/login` is
//! checked against a token bucket of its username, one of its client address, and one for
//! everyone before a job goes to an agent, so a flood of guesses never becomes a flood of
//! git processes, even from many addresses with made-up usernames that flush the tables.
//!
//! Each bucket is a GCRA cell (one instant: when the bucket will be full again), so a key
//! costs a few dozen bytes. A refused attempt changes no bucket, so a client that keeps
//! hammering is refused for no longer than one that waits. Memory is bounded: buckets full
//! again are swept every minute (a full bucket is the same as none), and each table keeps at
//! most two generations of [`GENERATION`] keys, the older dropped whole when the newer fills.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::config::Cidr;

/// At most `burst` attempts at once, then one every `period`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub burst: u32,
    pub period: Duration,
}

/// Per username: enough for a person who mistypes a few times, too few for guessing; a
/// person who mistyped five times waits at most 12 seconds for the next try.
pub const PER_USER: Rate = Rate {
    burst: 5,
    period: Duration::from_secs(12),
};

/// Per client address: an office behind one NAT logs in by the score in the morning, so it
/// gets more than a user; one machine still gets only 20 at once, then 20 a minute.
pub const PER_ADDRESS: Rate = Rate {
    burst: 20,
    period: Duration::from_secs(3),
};

/// For all logins together: however many users and addresses take part (or are made up to
/// flush the tables), git is asked at most this often.
pub const FOR_EVERYONE: Rate = Rate {
    burst: 60,
    period: Duration::from_millis(100),
};

/// Keys per generation of a table; a table holds at most two.
const GENERATION: usize = 16_384;

/// How often buckets that are full again are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Which limit refused an attempt, and when the next one would be let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub by: Limit,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    User,
    Address,
    Everyone,
}

impl Refused {
    /// Whole seconds to wait, rounded up, at least one: what `Retry-After` says.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

struct Table<K> {
    rate: Rate,
    /// When each key's bucket is full again.
    current: HashMap<K, Instant>,
    previous: HashMap<K, Instant>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new(rate: Rate) -> Self {
        Table {
            rate,
            current: HashMap::new(),
            previous: HashMap::new(),
        }
    }

    /// When `key`'s bucket would be full again after one more attempt now, or how long until
    /// one is allowed.
    fn check(&self, key: &K, now: Instant) -> Result<Instant, Duration> {
        let full_at = self
            .current
            .get(key)
            .or_else(|| self.previous.get(key))
            .copied()
            .unwrap_or(now)
            .max(now);
        let next = full_at + self.rate.period;
        let ahead = next - now;
        let allowance = self.rate.period * self.rate.burst;
        if ahead > allowance {
            return Err(ahead - allowance);
        }
        Ok(next)
    }

    fn commit(&mut self, key: K, full_at: Instant) {
        if !self.current.contains_key(&key) {
            self.previous.remove(&key);
            if self.current.len() >= GENERATION {
                self.previous = std::mem::take(&mut self.current);
            }
        }
        self.current.insert(key, full_at);
    }

    fn sweep(&mut self, now: Instant) {
        self.current.retain(|_, full_at| *full_at > now);
        self.previous.retain(|_, full_at| *full_at > now);
    }
}

struct Tables {
    users: Table<String>,
    addresses: Table<IpAddr>,
    everyone: Table<()>,
    swept: Instant,
}

pub struct LoginLimiter {
    tables: Mutex<Tables>,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(PER_USER, PER_ADDRESS, FOR_EVERYONE)
    }
}

impl LoginLimiter {
    pub fn new(per_user: Rate, per_address: Rate, for_everyone: Rate) -> Self {
        LoginLimiter {
            tables: Mutex::new(Tables {
                users: Table::new(per_user),
                addresses: Table::new(per_address),
                everyone: Table::new(for_everyone),
                swept: Instant::now(),
            }),
        }
    }

    /// Takes one attempt from `username`'s bucket and `client`'s, or neither when either is
    /// empty: an attempt refused costs nothing.
    pub fn attempt(&self, username: &str, client: IpAddr) -> Result<(), Refused> {
        self.attempt_at(username, client, Instant::now())
    }

    fn attempt_at(&self, username: &str, client: IpAddr, now: Instant) -> Result<(), Refused> {
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_duration_since(tables.swept) >= SWEEP_EVERY {
            tables.users.sweep(now);
            tables.addresses.sweep(now);
            tables.swept = now;
        }
        // Bitbucket takes usernames in any case: `Alice` must not get buckets of its own.
        let user = username.to_lowercase();
        let address = address_key(client);
        let address_full_at = tables
            .addresses
            .check(&address, now)
            .map_err(|retry_after| Refused {
                by: Limit::Address,
                retry_after,
            })?;
        let user_full_at = tables
            .users
            .check(&user, now)
            .map_err(|retry_after| Refused {
                by: Limit::User,
                retry_after,
            })?;
        let everyone_full_at = tables
            .everyone
            .check(&(), now)
            .map_err(|retry_after| Refused {
                by: Limit::Everyone,
                retry_after,
            })?;
        tables.addresses.commit(address, address_full_at);
        tables.users.commit(user, user_full_at);
        tables.everyone.commit((), everyone_full_at);
        Ok(())
    }
}

/// The bucket an address counts against: IPv6 clients by their /64, the block one host or
/// one home is given, which it can hop around in at will.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

/// The address of the client: the TCP peer, unless the peer is a trusted proxy, in which
/// case the last hop of `X-Forwarded-For` (what the proxy itself appended: earlier hops are
/// whatever the client sent).
pub fn client_address(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    if !trusted.iter().any(|net| net.contains(peer_ip)) {
        return peer_ip;
    }
    let last_hop = headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .map(str::trim);
    match last_hop.and_then(parse_hop) {
        Some(ip) => ip.to_canonical(),
        None => {
            tracing::debug!(peer = %peer_ip, "a trusted proxy sent no usable X-Forwarded-For; counting the proxy itself");
            peer_ip
        }
    }
}

/// `1.2.3.4`, `::1`, or with a port (`1.2.3.4:5678`, `[::1]:5678`), as some proxies write.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
impl LoginLimiter {
    fn keys(&self) -> usize {
        let t = self.tables.lock().unwrap();
        t.users.current.len()
            + t.users.previous.len()
            + t.addresses.current.len()
            + t.addresses.previous.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_user_gets_the_burst_then_one_attempt_a_period_whatever_the_address() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(limiter.attempt_at("alice", A, t0), Ok(()), "attempt {i}");
        }
        let refused = limiter.attempt_at("Alice", B, t0).unwrap_err();
        assert_eq!(refused.by, Limit::User);
        assert_eq!(refused.retry_after, Duration::from_secs(12));
        assert_eq!(refused.retry_after_secs(), 12);
        // Refused attempts cost nothing: after one period, exactly one more goes through.
        for _ in 0..50 {
            assert!(
                limiter
                    .attempt_at("alice", B, t0 + Duration::from_secs(5))
                    .is_err()
            );
        }
        let later = t0 + Duration::from_secs(12);
        assert_eq!(limiter.attempt_at("alice", B, later), Ok(()));
        assert!(limiter.attempt_at("alice", B, later).is_err());
        // Others are not held up by alice's guesses.
        assert_eq!(limiter.attempt_at("bob", B, later), Ok(()));
    }

    #[test]
    fn an_address_gets_its_burst_across_usernames_and_a_refusal_spends_no_user_attempt() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        for i in 0..20 {
            assert_eq!(limiter.attempt_at(&format!("user{i}"), A, t0), Ok(()));
        }
        let refused = limiter.attempt_at("carol", A, t0).unwrap_err();
        assert_eq!(refused.by, Limit::Address);
        assert_eq!(refused.retry_after_secs(), 3);
        // carol's own bucket was not touched by the refusal.
        for _ in 0..5 {
            assert_eq!(limiter.attempt_at("carol", B, t0), Ok(()));
        }
        // IPv6 clients count by their /64.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        for i in 0..20 {
            let ip = v6(&format!("2001:db8::{i:x}"));
            assert_eq!(limiter.attempt_at(&format!("v6user{i}"), ip, t0), Ok(()));
        }
        let other_host_same_64 = v6("2001:db8::ffff:1");
        assert!(limiter.attempt_at("dave", other_host_same_64, t0).is_err());
        assert_eq!(limiter.attempt_at("dave", v6("2001:db8:1::1"), t0), Ok(()));
    }

    #[test]
    fn buckets_full_again_are_swept_and_a_flood_of_names_stays_bounded() {
        let unlimited = Rate {
            burst: u32::MAX,
            period: Duration::from_nanos(1),
        };
        let limiter = LoginLimiter::new(PER_USER, unlimited, unlimited);
        let t0 = Instant::now();
        for i in 0..(5 * GENERATION) {
            limiter.attempt_at(&format!("u{i}"), A, t0).unwrap();
        }
        assert!(limiter.keys() <= 2 * GENERATION + 1, "{}", limiter.keys());
        // A minute on, every bucket is full again and the next attempt sweeps them all.
        limiter
            .attempt_at("last", A, t0 + Duration::from_secs(120))
            .unwrap();
        assert_eq!(limiter.keys(), 2);
    }

    #[test]
    fn logins_from_many_addresses_and_names_together_are_limited_for_everyone() {
        let limiter = LoginLimiter::default();
        let t0 = Instant::now();
        let address = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..FOR_EVERYONE.burst {
            assert_eq!(limiter.attempt_at(&format!("u{i}"), address(i), t0), Ok(()));
        }
        let refused = limiter.attempt_at("fresh", address(9999), t0).unwrap_err();
        assert_eq!(refused.by, Limit::Everyone);
        // One more a period later, for whoever comes first.
        let later = t0 + FOR_EVERYONE.period;
        assert_eq!(limiter.attempt_at("fresh", address(9999), later), Ok(()));
        assert!(limiter.attempt_at("other", address(9998), later).is_err());
    }

    #[test]
    fn forwarded_for_names_the_client_only_when_a_trusted_proxy_sent_it() {
        let trusted: Vec<Cidr> = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let mut headers = HeaderMap::new();
        headers.append(
            "x-forwarded-for",
            HeaderValue::from_static("198.51.100.7, 203.0.113.9"),
        );
        let proxy: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.50:4000".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // The last hop is what the proxy appended; the first is whatever the client claimed.
        assert_eq!(client_address(proxy, &headers, &trusted), ip("203.0.113.9"));
        assert_eq!(
            client_address(stranger, &headers, &trusted),
            ip("192.0.2.50")
        );
        assert_eq!(client_address(proxy, &headers, &[]), ip("127.0.0.1"));
        // A peer of a dual-stack listener.
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4000".parse().unwrap();
        assert_eq!(
            client_address(mapped, &headers, &trusted),
            ip("203.0.113.9")
        );
        // Nothing usable from the proxy: the proxy is the client.
        let mut junk = HeaderMap::new();
        junk.append("x-forwarded-for", HeaderValue::from_static("unknown"));
        assert_eq!(client_address(proxy, &junk, &trusted), ip("127.0.0.1"));
        assert_eq!(
            client_address(proxy, &HeaderMap::new(), &trusted),
            ip("127.0.0.1")
        );
        let mut with_port = HeaderMap::new();
        with_port.append(
            "x-forwarded-for",
            HeaderValue::from_static("[2001:db8::1]:5678"),
        );
        assert_eq!(
            client_address(proxy, &with_port, &trusted),
            ip("2001:db8::1")
        );
    }
}
