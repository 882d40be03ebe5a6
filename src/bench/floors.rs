//! The floors each figure is compared with, measured in the same run on the same machine: raw
//! signatures and signature checks per second on every core (ring, as the broker signs and
//! checks), raw scripted lease writes per second on the bench's Redis (one script doing the
//! writes a lease needs, over one multiplexed connection as the broker uses), and the CI path's
//! floor: a fresh TLS 1.3 handshake without client certificate (both ends, in memory, with the
//! broker's crypto provider) plus one ES256 ID-token signature check. The no-op authenticated
//! RPC is a load run like the others (`noop`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};

use super::cost::Meter;
use super::load::{Shape, Stats, drive_metered};

/// A message the size of a token's signing input.
const MESSAGE: [u8; 420] = [b'x'; 420];

/// Signatures per second over all cores: one thread per core signing for `time`.
///
/// # Errors
/// When a key cannot be made.
pub fn signatures_per_sec(alg: &str, time: Duration) -> Result<Floor, String> {
    let rng = SystemRandom::new();
    let sign: Arc<dyn Fn() + Send + Sync> = match alg {
        "ed25519" => {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
            let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| e.to_string())?;
            Arc::new(move || {
                std::hint::black_box(key.sign(&MESSAGE));
            })
        }
        _ => {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|e| e.to_string())?;
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
                    .map_err(|e| e.to_string())?;
            Arc::new(move || {
                let _ = std::hint::black_box(key.sign(&rng, &MESSAGE));
            })
        }
    };
    Ok(on_every_core(time, &sign))
}

/// Signature checks per second over all cores (`p256`: ECDSA P-256 with SHA-256, as a CSR or
/// an ES256 ID token is checked; `ed25519`).
///
/// # Errors
/// When a key cannot be made.
pub fn verifications_per_sec(alg: &str, time: Duration) -> Result<Floor, String> {
    let check = verifier(alg)?;
    Ok(on_every_core(time, &check))
}

/// One signature check of `alg` over a token-sized message, ready to repeat.
fn verifier(alg: &str) -> Result<Arc<dyn Fn() + Send + Sync>, String> {
    use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, KeyPair as _, UnparsedPublicKey};
    let rng = SystemRandom::new();
    Ok(match alg {
        "ed25519" => {
            let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
            let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| e.to_string())?;
            let sig = key.sign(&MESSAGE).as_ref().to_vec();
            let public = UnparsedPublicKey::new(&ED25519, key.public_key().as_ref().to_vec());
            Arc::new(move || {
                let _ = std::hint::black_box(public.verify(&MESSAGE, &sig));
            })
        }
        _ => {
            let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|e| e.to_string())?;
            let key =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref(), &rng)
                    .map_err(|e| e.to_string())?;
            let sig = key
                .sign(&rng, &MESSAGE)
                .map_err(|e| e.to_string())?
                .as_ref()
                .to_vec();
            let public = UnparsedPublicKey::new(
                &ECDSA_P256_SHA256_FIXED,
                key.public_key().as_ref().to_vec(),
            );
            Arc::new(move || {
                let _ = std::hint::black_box(public.verify(&MESSAGE, &sig));
            })
        }
    })
}

/// The CI path's floor per second over all cores: a full TLS 1.3 handshake without client
/// certificate and without resumption (client and server in memory, the broker's crypto
/// provider, a P-256 server certificate as the dev PKI's) plus one ES256 signature check.
///
/// # Errors
/// When the TLS configurations cannot be made.
pub fn ci_handshakes_per_sec(time: Duration) -> Result<Floor, String> {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .and_then(|p| p.self_signed(&key))
        .map_err(|e| e.to_string())?;
    let provider = crate::tls::provider();
    let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).map_err(|e| e.to_string())?;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();
    let (server, client) = (Arc::new(server), Arc::new(client));
    let check = verifier("p256")?;
    // One handshake first: a configuration that cannot complete one is an error, not a floor.
    handshake(&server, &client)?;
    let op: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let _ = std::hint::black_box(handshake(&server, &client));
        check();
    });
    Ok(on_every_core(time, &op))
}

/// One full handshake between `client` and `server`, in memory.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut c: rustls::Connection = rustls::ClientConnection::new(Arc::clone(client), name)
        .map_err(|e| e.to_string())?
        .into();
    let mut s: rustls::Connection = rustls::ServerConnection::new(Arc::clone(server))
        .map_err(|e| e.to_string())?
        .into();
    let mut buf = Vec::with_capacity(8192);
    for _ in 0..8 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
        pass(&mut c, &mut s, &mut buf)?;
        pass(&mut s, &mut c, &mut buf)?;
    }
    Err("the handshake did not complete".into())
}

/// Hands what `from` has to write to `to`, through `buf`.
fn pass(
    from: &mut rustls::Connection,
    to: &mut rustls::Connection,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).map_err(|e| e.to_string())?;
    }
    let mut rd = buf.as_slice();
    while !rd.is_empty() {
        to.read_tls(&mut rd).map_err(|e| e.to_string())?;
        to.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs `op` on one thread per core for `time`; operations per second over all of them.
fn on_every_core(time: Duration, op: &Arc<dyn Fn() + Send + Sync>) -> Floor {
    let until = Instant::now() + time;
    let handles: Vec<_> = (0..cores())
        .map(|_| {
            let op = Arc::clone(op);
            std::thread::spawn(move || {
                let cpu0 = thread_cpu_ns();
                let mut n = 0u64;
                while Instant::now() < until {
                    for _ in 0..16 {
                        op();
                    }
                    n += 16;
                }
                (n, thread_cpu_ns().saturating_sub(cpu0))
            })
        })
        .collect();
    let (mut total, mut cpu_ns) = (0u64, 0u64);
    for (n, ns) in handles.into_iter().filter_map(|h| h.join().ok()) {
        total += n;
        cpu_ns += ns;
    }
    #[allow(clippy::cast_precision_loss)]
    Floor {
        per_sec: total as f64 / time.as_secs_f64(),
        us: if total > 0 && cpu_ns > 0 {
            cpu_ns as f64 / 1000.0 / total as f64
        } else {
            super::cost::us_per_op(total as f64 / time.as_secs_f64(), cores())
        },
    }
}

/// A floor: operations per second over all cores (wall time, so what else runs on the machine
/// lowers it), and CPU per operation on one core (from the threads' own CPU time, so it does not
/// depend on what else runs).
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// Operations per second over all cores.
    pub per_sec: f64,
    /// Microseconds of CPU per operation.
    pub us: f64,
}

/// CPU time of the calling thread so far, in nanoseconds (0 if /proc cannot say).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

/// The cores the floors run on.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The writes of one lease (the broker's `ISSUE` script, `src/store/redis/lua/issue.lua`,
/// without its checks): the record in the task's lease hash, the credential in the task's
/// credential hash, the expiry index (a 24-byte member), the agent's live tasks.
const LEASE_WRITE: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
redis.call('SADD', KEYS[4], ARGV[6])
return 1";

/// Scripted lease writes per second on the Redis at `url`, with `shape`; the keys (under
/// `bench:`) are deleted afterwards.
///
/// # Errors
/// When Redis cannot be reached.
pub async fn redis_lease_writes(url: &str, shape: Shape, meter: Meter) -> Result<Stats, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let script = Arc::new(redis::Script::new(LEASE_WRITE));
    // A lease record the size of the broker's (a 128-bit `jti`, a SHA-256 `cnf`).
    let data = Arc::new(vec![b'd'; 86]);
    let stats = drive_metered(shape, meter, move |w, n| {
        let (mut conn, script, data) = (conn.clone(), Arc::clone(&script), Arc::clone(&data));
        async move {
            let task = format!("t{}", w % 16);
            // Unique over the workers, as lease ids are.
            let id = (u64::try_from(w).unwrap_or_default() << 40) | n;
            let suffix = id.to_be_bytes();
            let mut credential = vec![0x90];
            credential.extend_from_slice(&u128::from(id).to_be_bytes());
            let mut member = vec![0u8; 16];
            member[0] = u8::try_from(w % 16).unwrap_or_default();
            member.extend_from_slice(&suffix);
            script
                .key(format!("bench:l:{{{task}}}"))
                .key(format!("bench:c:{{{task}}}"))
                .key("bench:exp")
                .key(format!("bench:live:{w}"))
                .arg(&suffix[..])
                .arg(data.as_slice())
                .arg(credential)
                .arg(n)
                .arg(member)
                .arg(&task)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    })
    .await;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    // Scratch Redis of the bench: only its own keys go.
    let _: Result<(), _> = redis::cmd("EVAL")
        .arg("for _, k in ipairs(redis.call('KEYS', 'bench:*')) do redis.call('UNLINK', k) end return 0")
        .arg(0)
        .query_async(&mut conn)
        .await;
    Ok(stats)
}
