//! The floors each figure is compared with, measured in the same run on the same machine: raw
//! signatures per second on every core (ring, as the broker signs), and raw scripted lease writes
//! per second on the bench's Redis (one script doing the writes a lease needs, over one
//! multiplexed connection as the broker uses). The third floor, a no-op authenticated RPC, is a
//! load run like the others (`noop`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair};

use super::load::{Shape, Stats, drive};

/// A message the size of a token's signing input.
const MESSAGE: [u8; 420] = [b'x'; 420];

/// Signatures per second over all cores: one thread per core signing for `time`.
///
/// # Errors
/// When a key cannot be made.
pub fn signatures_per_sec(alg: &str, time: Duration) -> Result<f64, String> {
    let rng = SystemRandom::new();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
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
    let until = Instant::now() + time;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let sign = Arc::clone(&sign);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until {
                    for _ in 0..64 {
                        sign();
                    }
                    n += 64;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().filter_map(|h| h.join().ok()).sum();
    #[allow(clippy::cast_precision_loss)]
    Ok(total as f64 / time.as_secs_f64())
}

/// The writes of one lease (the broker's `ISSUE` script without its checks): the lease hash,
/// the task's lease set, the credential and lease indexes, the expiry index.
const LEASE_WRITE: &str = r"
redis.call('HSET', KEYS[1], 'data', ARGV[1], 'state', 'active', 'cred', ARGV[2], 'exp_ns', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[4])
redis.call('SET', KEYS[4], ARGV[5])
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5] .. '/' .. ARGV[4])
return 1";

/// Scripted lease writes per second on the Redis at `url`, with `shape`; the keys (under
/// `bench:`) are deleted afterwards.
///
/// # Errors
/// When Redis cannot be reached.
pub async fn redis_lease_writes(url: &str, shape: Shape) -> Result<Stats, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let script = Arc::new(redis::Script::new(LEASE_WRITE));
    // A lease record the size of the broker's.
    let data = Arc::new("d".repeat(480));
    let stats = drive(shape, move |w, n| {
        let (mut conn, script, data) = (conn.clone(), Arc::clone(&script), Arc::clone(&data));
        async move {
            let id = format!("{w}-{n}");
            let task = format!("t{}", w % 16);
            script
                .key(format!("bench:lease:{{{task}}}:{id}"))
                .key(format!("bench:leases:{{{task}}}"))
                .key(format!("bench:cred:{{{task}}}:{id}"))
                .key(format!("bench:leaseidx:{id}"))
                .key("bench:expiry")
                .arg(data.as_str())
                .arg(&id)
                .arg(n)
                .arg(&id)
                .arg(&task)
                .arg(n)
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
