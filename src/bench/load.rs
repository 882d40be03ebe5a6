//! The load generator: C workers calling one operation as fast as it answers for a fixed time,
//! and the latency distribution of what they measured (after a warm-up).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::cost::Meter;

/// What one run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Calls that succeeded in the measured window, per second.
    pub per_sec: f64,
    /// Median latency, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: f64,
    /// Calls that succeeded in the measured window.
    pub calls: u64,
    /// Calls that failed (all of them are reported: a figure with errors is suspect).
    pub errors: u64,
    /// The first failure, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Workers (calls in flight).
    pub concurrency: usize,
    /// The broker's CPU per successful call over the measured window, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_us: Option<f64>,
    /// Redis' CPU per successful call over the measured window, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_cpu_us: Option<f64>,
}

/// How long and how wide a run is.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Calls in flight.
    pub concurrency: usize,
    /// Not measured, first.
    pub warmup: Duration,
    /// Measured.
    pub measure: Duration,
}

/// The quantile `q` of sorted latencies in microseconds, as milliseconds.
fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted.get(i).copied().unwrap_or_default()) / 1000.0
}

/// Runs `call(worker, n)` on `shape.concurrency` workers until the warm-up and the measured
/// window have passed; counts what succeeded and how long each call took in the window.
pub async fn drive<F, Fut>(shape: Shape, call: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    drive_metered(shape, Meter::default(), call).await
}

/// [`drive`], reading the CPU `meter`'s processes spent in the measured window.
pub async fn drive_metered<F, Fut>(shape: Shape, meter: Meter, call: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let call = Arc::new(call);
    let start = Instant::now();
    let from = start + shape.warmup;
    let until = from + shape.measure;
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(from.into()).await;
        let at_start = meter.read();
        tokio::time::sleep_until(until.into()).await;
        (at_start, meter.read())
    });
    let mut workers = Vec::with_capacity(shape.concurrency);
    for w in 0..shape.concurrency {
        let call = Arc::clone(&call);
        workers.push(tokio::spawn(async move {
            let mut lat: Vec<u32> = Vec::with_capacity(1 << 14);
            let (mut errors, mut first_error) = (0u64, None);
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= until {
                    break;
                }
                let r = call(w, n).await;
                n += 1;
                let t1 = Instant::now();
                if t0 < from || t1 > until {
                    continue;
                }
                match r {
                    Ok(()) => {
                        let us =
                            u32::try_from(t1.duration_since(t0).as_micros()).unwrap_or(u32::MAX);
                        lat.push(us);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (lat, errors, first_error)
        }));
    }
    let mut all = Vec::new();
    let mut stats = Stats {
        concurrency: shape.concurrency,
        ..Stats::default()
    };
    for w in workers {
        if let Ok((lat, errors, first)) = w.await {
            all.extend(lat);
            stats.errors += errors;
            if stats.first_error.is_none() {
                stats.first_error = first;
            }
        }
    }
    all.sort_unstable();
    stats.calls = all.len() as u64;
    if let Ok((at_start, at_end)) = sampler.await {
        (stats.broker_cpu_us, stats.redis_cpu_us) = Meter::per_call(at_start, at_end, stats.calls);
    }
    #[allow(clippy::cast_precision_loss)]
    {
        stats.per_sec = stats.calls as f64 / shape.measure.as_secs_f64();
    }
    stats.p50_ms = quantile(&all, 0.5);
    stats.p99_ms = quantile(&all, 0.99);
    stats.p999_ms = quantile(&all, 0.999);
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let v: Vec<u32> = (1..=1000).map(|i| i * 1000).collect();
        assert!((quantile(&v, 0.5) - 500.0).abs() < f64::EPSILON);
        assert!((quantile(&v, 0.99) - 990.0).abs() < f64::EPSILON);
        assert!((quantile(&v, 0.999) - 999.0).abs() < f64::EPSILON);
        assert!(quantile(&[], 0.5).abs() < f64::EPSILON);
    }

    #[tokio::test]
    async fn drive_counts_calls_and_errors_in_the_window() {
        let shape = Shape {
            concurrency: 4,
            warmup: Duration::from_millis(50),
            measure: Duration::from_millis(300),
        };
        let s = drive(shape, |_, n| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if n % 10 == 9 {
                Err("boom".into())
            } else {
                Ok(())
            }
        })
        .await;
        assert!(s.calls > 100, "{s:?}");
        assert!(s.errors > 0 && s.first_error.as_deref() == Some("boom"));
        assert!(s.p50_ms >= 2.0 && s.p50_ms < 50.0, "{s:?}");
    }
}
