//! The router's integration tests, on real sockets on loopback: one binary, so they link once.

mod harness;
mod metrics;
mod sleeping;
