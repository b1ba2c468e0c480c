//! Integration tests: the real `sdp` binary against a real git server with Basic auth.
//! One binary, so everything links once.

mod harness;

mod access;
mod agents;
mod branches;
mod browser;
mod canary;
mod cli;
mod deploy;
mod dev_smoke;
mod docker;
mod exhaustion;
mod frames;
mod input;
mod isolation;
mod lifecycle;
mod limits;
mod login;
mod router;
mod tls;
