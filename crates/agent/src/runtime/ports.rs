//! Host ports of `port_range` for instances, shared by both runtimes.

use std::collections::HashSet;
use std::sync::Mutex;

use super::RuntimeError;

/// Hands ports out in turn around the range, never the lowest free one: a port just freed is
/// the last to be given again. Until every gateway has the new route table, a request may
/// still be sent to the port of an instance that was stopped; it must find nothing there
/// (a 502), not another sandbox's new instance.
pub struct Ports {
    range: (u16, u16),
    /// Where a port is checked to be free.
    bind_host: String,
    state: Mutex<State>,
}

struct State {
    in_use: HashSet<u16>,
    next: u16,
}

impl Ports {
    pub fn new(range: (u16, u16), bind_host: &str) -> Self {
        Self {
            range,
            bind_host: bind_host.to_owned(),
            state: Mutex::new(State {
                in_use: HashSet::new(),
                next: range.0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A port of the range that is not handed out and that nothing listens on now.
    pub fn allocate(&self) -> Result<u16, RuntimeError> {
        let (lo, hi) = self.range;
        let mut state = self.lock();
        let start = state.next.clamp(lo, hi);
        let candidates = (start..=hi).chain(lo..start);
        for port in candidates {
            if state.in_use.contains(&port) {
                continue;
            }
            let free = match std::net::TcpListener::bind((self.bind_host.as_str(), port)) {
                Ok(_) => true,
                // Not an address of this network namespace: an agent in a container that
                // publishes on its host's address. Only the engine can tell, as it publishes.
                Err(e) => e.kind() == std::io::ErrorKind::AddrNotAvailable,
            };
            if free {
                state.in_use.insert(port);
                state.next = if port == hi { lo } else { port + 1 };
                return Ok(port);
            }
        }
        Err(RuntimeError(format!("no free port left in {lo}-{hi}")))
    }

    /// A port as [`Ports::allocate`] gives it, held by the returned lease until it is kept:
    /// a start that fails, or whose future is dropped halfway, frees it by dropping the lease.
    pub fn lease(&self) -> Result<Lease<'_>, RuntimeError> {
        let port = self.allocate()?;
        Ok(Lease {
            ports: self,
            port,
            kept: false,
        })
    }

    /// A port an instance found at start still holds.
    pub fn claim(&self, port: u16) {
        self.lock().in_use.insert(port);
    }

    pub fn release(&self, port: u16) {
        self.lock().in_use.remove(&port);
    }

    /// The ports handed out, lowest first.
    #[cfg(test)]
    pub fn taken(&self) -> Vec<u16> {
        let mut taken: Vec<u16> = self.lock().in_use.iter().copied().collect();
        taken.sort();
        taken
    }
}

/// A port handed out for an instance that is not started yet.
pub struct Lease<'a> {
    ports: &'a Ports,
    port: u16,
    kept: bool,
}

impl Lease<'_> {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The instance started: whoever tracks it frees the port from now on.
    pub fn keep(mut self) -> u16 {
        self.kept = true;
        self.port
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.ports.release(self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_port_is_given_again_only_after_the_rest_of_the_range() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = listener.local_addr().unwrap().port();
        drop(listener);
        // A small range around a port that was free a moment ago.
        let lo = base.saturating_sub(1).max(1024);
        let ports = Ports::new((lo, lo + 3), "127.0.0.1");
        let first = ports.allocate().unwrap();
        ports.release(first);
        let second = ports.allocate().unwrap();
        assert_ne!(first, second, "the freed port came back at once");
        ports.claim(second);
        assert!(ports.allocate().is_ok());
    }

    #[test]
    fn ports_on_an_address_of_another_network_namespace_are_left_to_the_engine() {
        // TEST-NET-3: an address no interface here holds, as the host's address is to an
        // agent in a container.
        let ports = Ports::new((20000, 20001), "203.0.113.7");
        assert_eq!(ports.allocate().unwrap(), 20000);
        assert_eq!(ports.allocate().unwrap(), 20001);
        assert!(ports.allocate().is_err(), "handed out twice");
    }

    #[test]
    fn a_lease_dropped_before_it_is_kept_frees_its_port() {
        let ports = Ports::new((20000, 60000), "127.0.0.1");
        let lease = ports.lease().unwrap();
        assert_eq!(ports.taken(), [lease.port()]);
        drop(lease);
        assert!(ports.taken().is_empty());
        let kept = ports.lease().unwrap().keep();
        assert_eq!(ports.taken(), [kept]);
    }
}
