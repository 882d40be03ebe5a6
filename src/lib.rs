//! taskcred: a just-in-time credential broker for AI agents and CI jobs.
//!
//! Callers prove who they are with a client certificate carrying a SPIFFE ID (mutual TLS on the
//! gRPC port); the broker hands out credentials that live exactly as long as one approved task.
//!
//! # Layout
//! Arrows say what a module may use; nothing points back up.
//!
//! ```text
//! main.rs     flags -> config::load -> telemetry -> app (exit 64 on bad config)
//! app         composition root: TLS, servers, shutdown and drain
//! config      TOML + TASKCRED_* + flags -> typed, checked Config
//! telemetry   tracing subscriber, Prometheus recorder, metric names
//! clock       Clock trait; real and manual clocks
//! identity    WorkloadId (SPIFFE ID), PeerIdentity from a leaf, the rustls client verifier
//! task        Task, Approval, the state machine and its rules (separation of duties, quorum)
//! lease       Lease: the record of one issued credential; what may be issued or renewed
//! mint        JWT signing keys, the key ring and JWKS, the jsonwebtoken provider over ring, X509-SVIDs
//! ci          CI OIDC ID tokens: trusted issuers, their JWK Sets, verification, the CiJob
//! policy      Cedar: schema, load and validate, decide, quorum from @quorum
//! store       Store trait, embedded (redb) and Redis backends, the conformance suite
//! audit       one JSON line per decision
//! broker      the use cases: tasks (request ... complete), credentials (issue, renew, revoke,
//!             introspect), reload policy; agents (force-revoke locks); keys (publication,
//!             rotation); reaper; revocations (watch feed), CRL, store epoch, lease listing
//! tls         gRPC port TLS: server config, accept loop, per-connection identity
//! api         gRPC: generated code, auth and metrics middleware, thin handlers, Status map
//! http        axum: /healthz, /readyz, /metrics, /crl, /.well-known/jwks.json, openid-configuration
//! devpki      the development PKI and policies of `dev init` and `serve --dev`
//! cli         client subcommands over the generated gRPC client
//! bench       `taskcred bench`: load runs, floors and scale runs against child brokers
//! fetch       bounded HTTPS GETs of JWK Sets (rustls, ring, the roots given)
//! files       whether a file that decides whom the broker trusts can be trusted itself
//! net         connection budgets of both ports: per-key slot caps, idle and maximum-age clocks
//! verify      for resource servers: JWKS, token checks, cnf, the revocation stream
//! text        what free text shown to people may hold
//! ```

pub mod api;
pub mod app;
pub mod audit;
pub mod bench;
pub mod broker;
pub mod ci;
pub mod cli;
pub mod clock;
pub mod config;
pub mod devpki;
pub mod fetch;
pub mod files;
pub mod http;
pub mod identity;
pub mod lease;
pub mod mint;
pub mod net;
pub mod policy;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod verify;
