//! The integration tests: one harness (one test binary, as cargo's own testsuite is), a module
//! per area. Every test runs the real thing: a broker on ephemeral loopback ports with a dev
//! PKI made at test time, real mTLS clients, and a `redis-server` of its own where Redis is used.
//!
//! Run one area with `cargo test --test testsuite <module>::`, e.g. `cargo test --test testsuite
//! faults::`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed expectation is a failed test"
)]

mod common;

mod bench;
mod ci;
mod cli;
mod config;
mod credentials;
mod delegation;
mod deploy;
mod docs;
mod failover;
mod faults;
mod helm;
mod mtls;
mod operating;
mod operator;
mod reaper;
mod revocations;
mod store;
mod tasks;
mod topology;
mod trust_boundaries;
mod verify;
mod walkthrough;
