//! taskcred: a just-in-time credential broker for AI agents and CI jobs.
//!
//! Callers prove who they are with a client certificate carrying a SPIFFE ID (mutual TLS on the
//! gRPC port); the broker hands out credentials that live exactly as long as one approved task.
//!
//! # Layout
//! Arrows say what a module may use; nothing points back up. `ARCHITECTURE.md` (at the top of
//! the repository) has the map of `broker/` and `store/` and the path of one issuance.
//!
//! ```text
//! main.rs     flags -> config::load -> telemetry -> app (exit 64 on bad config)
//! app         composition root: TLS, servers, shutdown and drain
//! config      TOML + TASKCRED_* + flags -> typed, checked Config
//! telemetry   tracing subscriber, Prometheus recorder, metric names
//! clock       Clock trait; real and manual clocks
//! identity    WorkloadId (SPIFFE ID), PeerIdentity from a leaf, the rustls client verifier;
//!             CiJob, what a verified CI ID token proved
//! task        Task, Approval, the state machine and its rules (separation of duties, quorum)
//! lease       Lease: the record of one issued credential; what may be issued or renewed
//! mint        JWT signing keys, the key ring and JWKS, the jsonwebtoken provider over ring, X509-SVIDs
//! ci          CI OIDC ID tokens: trusted issuers, their JWK Sets, verification, reading the CiJob
//! policy      Cedar: schema, load and validate, decide, quorum from @quorum
//! store       Store trait, embedded (redb) and Redis backends (their conformance suite is in tests/)
//! audit       one JSON line per decision
//! broker      the use cases, one file each: tasks, issue, renew, introspect, revoke, agents
//!             (locks), ci, keys, policy reload; the revoker (every way a credential ends); the
//!             reaper (its own type); revocations (watch feed), CRL, store epoch, lease listing
//! tls         gRPC port TLS: server config, accept loop, per-connection identity
//! api         gRPC: generated code, auth and metrics middleware, thin handlers, Status map
//! http        axum: /healthz, /readyz, /metrics, /crl, /.well-known/jwks.json, openid-configuration
//! devpki      the development PKI and policies (DEV_POLICIES) of `dev init` and `serve --dev`
//! client      a gRPC client over mTLS to the broker: ClientArgs (the global flags), connect
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
pub mod client;
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
