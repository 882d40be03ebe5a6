//! What a figure costs, beside how fast it runs: the CPU the broker (and Redis) spent per call
//! over a run's measured window, read from /proc of the child processes, and the part of it the
//! cryptography a call cannot avoid does not explain (`overhead_us`). CPU per call does not
//! depend on the load generator sharing the cores, where a rate does.

/// CPU time process `pid` has used so far (all its threads, user and system), in nanoseconds:
/// the sum of its threads' `schedstat` run times, else `stat`'s ticks (1/100 s).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut any = false;
    for t in threads.flatten() {
        let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = s
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    if any {
        return Some(total);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// The processes whose CPU a run measures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meter {
    /// The broker's pid.
    pub broker: Option<u32>,
    /// Redis' pid.
    pub redis: Option<u32>,
}

/// CPU read at the start of a measured window.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    broker: Option<u64>,
    redis: Option<u64>,
}

impl Meter {
    /// Reads both processes now.
    pub fn read(&self) -> Reading {
        Reading {
            broker: self.broker.and_then(cpu_ns),
            redis: self.redis.and_then(cpu_ns),
        }
    }

    /// Microseconds of CPU per call of each process between `start` and `end`, over `calls`
    /// calls.
    pub fn per_call(start: Reading, end: Reading, calls: u64) -> (Option<f64>, Option<f64>) {
        let per = |a: Option<u64>, b: Option<u64>| -> Option<f64> {
            let spent = b?.checked_sub(a?)?;
            #[allow(clippy::cast_precision_loss)]
            (calls > 0).then(|| spent as f64 / 1000.0 / calls as f64)
        };
        (per(start.broker, end.broker), per(start.redis, end.redis))
    }
}

/// Microseconds of one core per operation, from operations per second measured on `threads`
/// threads (one per core).
pub fn us_per_op(per_sec: f64, threads: usize) -> f64 {
    if per_sec > 0.0 {
        #[allow(clippy::cast_precision_loss)]
        let t = threads as f64;
        t * 1e6 / per_sec
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Our own CPU grows while we spin, and the meter sees it.
    #[test]
    fn reads_a_process_cpu_time() {
        let pid = std::process::id();
        let before = cpu_ns(pid).unwrap();
        let until = std::time::Instant::now() + Duration::from_millis(50);
        let mut x = 0u64;
        while std::time::Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_ns(pid).unwrap();
        assert!(after - before >= 30_000_000, "{before} {after}");
        let meter = Meter {
            broker: Some(pid),
            redis: None,
        };
        let start = meter.read();
        let (broker, redis) = Meter::per_call(start, meter.read(), 10);
        assert!(broker.is_some_and(|us| us >= 0.0));
        assert!(redis.is_none());
        assert!((us_per_op(1000.0, 2) - 2000.0).abs() < 1e-9);
    }
}
