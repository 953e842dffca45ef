//! Counters, gauges and latency histograms per pool and per kind. Owned and
//! updated by the Dispatcher only (no locks); `stats` returns a snapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Event counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Jobs accepted.
    pub submitted: u64,
    /// Attempts started.
    pub started: u64,
    /// Jobs that succeeded.
    pub succeeded: u64,
    /// Jobs that ended `failed`.
    pub failed: u64,
    /// Failed attempts that were retried.
    pub retried: u64,
    /// Jobs that ended `dead`.
    pub dead: u64,
    /// Jobs that were cancelled.
    pub cancelled: u64,
    /// Attempts that passed their deadline.
    pub timed_out: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// A latency histogram in microseconds, 1 µs to 1 h, 2 significant digits.
#[derive(Debug, Clone)]
pub(crate) struct Latency(Option<Histogram<u64>>);

impl Latency {
    pub(crate) fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts; None only if they
        // were invalid, and then we record nothing rather than fail.
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 2).ok())
    }

    pub(crate) fn record(&mut self, d: Duration) {
        if let Some(h) = &mut self.0 {
            h.saturating_record((d.as_micros() as u64).max(1));
        }
    }

    pub(crate) fn percentiles(&self) -> Percentiles {
        let Some(h) = &self.0 else {
            return Percentiles::default();
        };
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Running totals for one kind.
#[derive(Debug, Clone)]
pub(crate) struct KindTotals {
    pub(crate) counters: Counters,
    pub(crate) queue_wait: Latency,
    pub(crate) run_time: Latency,
}

impl KindTotals {
    pub(crate) fn new() -> Self {
        KindTotals {
            counters: Counters::default(),
            queue_wait: Latency::new(),
            run_time: Latency::new(),
        }
    }
}

/// A pool as `stats` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStats {
    /// Worker threads.
    pub threads: usize,
    /// Threads running a handler (including handlers whose job already
    /// timed out or was cancelled but which have not returned yet).
    pub busy: usize,
    /// Threads free for the next job.
    pub idle: usize,
    /// Threads of the pool's size before a resize, still finishing the job
    /// they had; they take no new job and exit after it (not counted in
    /// `threads`, `busy` or `idle`).
    pub retiring: usize,
    /// Jobs ready to run, waiting for a thread.
    pub queued: usize,
    /// Jobs waiting for their run time or for dependencies.
    pub delayed: usize,
    /// Jobs in state `running`.
    pub running: usize,
    /// Admission limit on queued + delayed.
    pub max_queued: usize,
    /// True while the pool is paused.
    pub paused: bool,
    /// Event counters of the pool's jobs.
    pub counters: Counters,
}

/// A kind as `stats` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KindStats {
    /// Event counters of the kind's jobs.
    pub counters: Counters,
    /// Time from ready to started.
    pub queue_wait_ms: Percentiles,
    /// Time handlers ran.
    pub run_time_ms: Percentiles,
}

/// Everything `stats` returns.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsSnapshot {
    /// Per pool.
    pub pools: BTreeMap<String, PoolStats>,
    /// Per kind.
    pub kinds: BTreeMap<String, KindStats>,
    /// Jobs not final yet.
    pub active_jobs: usize,
    /// Finished jobs still kept in memory for `status`.
    pub retained_jobs: usize,
    /// The durable store, when there is one.
    pub store: Option<StoreStats>,
}

/// The durable store as `stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Bytes on disk (database and write-ahead log).
    pub bytes: u64,
    /// Changes waiting for the next commit.
    pub pending_changes: usize,
    /// Changes committed since start.
    pub committed_changes: u64,
    /// Why writes fail, while they do.
    pub failing: Option<String>,
}
