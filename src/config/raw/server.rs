//! `[server]`: the two listeners and the limits of each connection.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{
    CheckError, DAY, DEFAULT_GRPC_ADDR, DEFAULT_HTTP_ADDR, HOUR, MINUTE, SECOND, TENTH_OF_A_SECOND,
    budget, duration, range,
};
use crate::config::{AcceptLimits, ServerConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    http_tls: bool,
    max_http_connections: usize,
    max_http_connections_per_source: usize,
    #[serde(deserialize_with = "duration")]
    http_idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    http_max_age: Duration,
    max_message_bytes: usize,
    max_concurrent_rpcs_per_connection: u32,
    max_connections: usize,
    max_anonymous_connections: usize,
    #[serde(deserialize_with = "duration")]
    handshake_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    anonymous_idle_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    anonymous_max_age: Duration,
    max_connections_per_identity: usize,
    max_anonymous_connections_per_source: usize,
    max_handshakes_per_source: usize,
    #[serde(deserialize_with = "duration")]
    request_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    shutdown_grace: Duration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            grpc_addr: parse_default(DEFAULT_GRPC_ADDR),
            http_addr: parse_default(DEFAULT_HTTP_ADDR),
            http_tls: false,
            max_http_connections: 1024,
            max_http_connections_per_source: 32,
            http_idle_timeout: Duration::from_secs(10),
            http_max_age: Duration::from_secs(60),
            max_message_bytes: 256 * 1024,
            max_concurrent_rpcs_per_connection: 128,
            max_connections: 10_000,
            max_anonymous_connections: 1_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            anonymous_idle_timeout: Duration::from_secs(30),
            anonymous_max_age: Duration::from_secs(5 * 60),
            max_connections_per_identity: 256,
            max_anonymous_connections_per_source: 32,
            max_handshakes_per_source: 64,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

fn parse_default(addr: &str) -> SocketAddr {
    // DEFAULT_GRPC_ADDR and DEFAULT_HTTP_ADDR are valid socket addresses; the fallback is never
    // taken.
    addr.parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
}

impl RawServer {
    pub(super) fn check(self) -> Result<ServerConfig, CheckError> {
        let s = self;
        let server = ServerConfig {
            grpc_addr: s.grpc_addr,
            http_addr: s.http_addr,
            http_tls: s.http_tls,
            max_http_connections: budget("server.max_http_connections", s.max_http_connections)?,
            max_http_connections_per_source: budget(
                "server.max_http_connections_per_source",
                s.max_http_connections_per_source,
            )?,
            http_idle_timeout: range(
                "server.http_idle_timeout",
                s.http_idle_timeout,
                TENTH_OF_A_SECOND,
                HOUR,
            )?,
            http_max_age: range("server.http_max_age", s.http_max_age, SECOND, DAY)?,
            max_message_bytes: range(
                "server.max_message_bytes",
                s.max_message_bytes,
                4096,
                16 << 20,
            )?,
            max_concurrent_rpcs_per_connection: range(
                "server.max_concurrent_rpcs_per_connection",
                s.max_concurrent_rpcs_per_connection,
                1,
                10_000,
            )?,
            accept: AcceptLimits {
                max_connections: budget("server.max_connections", s.max_connections)?,
                // Part of max_connections: never more than it.
                max_anonymous_connections: range(
                    "server.max_anonymous_connections",
                    s.max_anonymous_connections,
                    0,
                    1_000_000,
                )?
                .min(s.max_connections),
                idle_timeout: range("server.idle_timeout", s.idle_timeout, SECOND, DAY)?,
                anonymous_idle_timeout: range(
                    "server.anonymous_idle_timeout",
                    s.anonymous_idle_timeout,
                    SECOND,
                    HOUR,
                )?,
                anonymous_max_age: range(
                    "server.anonymous_max_age",
                    s.anonymous_max_age,
                    SECOND,
                    DAY,
                )?,
                max_connections_per_identity: budget(
                    "server.max_connections_per_identity",
                    s.max_connections_per_identity,
                )?,
                max_anonymous_connections_per_source: budget(
                    "server.max_anonymous_connections_per_source",
                    s.max_anonymous_connections_per_source,
                )?,
                max_handshakes_per_source: budget(
                    "server.max_handshakes_per_source",
                    s.max_handshakes_per_source,
                )?,
                handshake_timeout: range(
                    "server.handshake_timeout",
                    s.handshake_timeout,
                    TENTH_OF_A_SECOND,
                    2 * MINUTE,
                )?,
            },
            request_timeout: range(
                "server.request_timeout",
                s.request_timeout,
                TENTH_OF_A_SECOND,
                10 * MINUTE,
            )?,
            shutdown_grace: range(
                "server.shutdown_grace",
                s.shutdown_grace,
                Duration::ZERO,
                10 * MINUTE,
            )?,
        };
        if server.grpc_addr == server.http_addr && server.grpc_addr.port() != 0 {
            return Err((
                "server.http_addr",
                "is the same address as server.grpc_addr".into(),
            ));
        }
        Ok(server)
    }
}
