//! The router's integration tests, on real sockets on loopback: one binary, so they link once.

mod differential;
mod fast;
mod harness;
mod hyper_check;
mod metrics;
mod sleeping;
