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

/// Upper bounds, in seconds, of the buckets a [`Distribution`] counts
/// samples into (the last bucket, `+Inf`, is implied by its `count`).
pub const LATENCY_BUCKETS_SECONDS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0, 3600.0,
];

/// A latency distribution in the shape of a Prometheus histogram: what the
/// `metrics` exposition needs. Not part of the `stats` JSON.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Distribution {
    /// Samples recorded.
    pub count: u64,
    /// Sum of all samples, in seconds (exact, not bucketed).
    pub sum_seconds: f64,
    /// `(upper bound in seconds, samples in this bucket only)` for each of
    /// [`LATENCY_BUCKETS_SECONDS`]; samples above the last bound are
    /// `count` minus the sum of these. A sample is placed by the lowest value
    /// its histogram bin stands for, so edges are exact to within 1%.
    pub buckets: Vec<(f64, u64)>,
}

/// A latency histogram in microseconds, 1 µs to 1 h, 2 significant digits,
/// with the exact sum of its samples.
#[derive(Debug, Clone)]
pub(crate) struct Latency {
    /// The histogram; None only if its constant bounds were refused.
    hist: Option<Histogram<u64>>,
    /// Sum of the samples in microseconds (saturating).
    sum_us: u64,
}

impl Latency {
    pub(crate) fn new() -> Self {
        // Bounds are constants that hdrhistogram accepts; None only if they
        // were invalid, and then we record nothing rather than fail.
        Latency {
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 2).ok(),
            sum_us: 0,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        if let Some(h) = &mut self.hist {
            let us = (d.as_micros() as u64).max(1);
            h.saturating_record(us);
            self.sum_us = self.sum_us.saturating_add(us);
        }
    }

    /// Add another histogram's samples to this one.
    pub(crate) fn add(&mut self, other: &Latency) {
        if let (Some(h), Some(o)) = (&mut self.hist, &other.hist) {
            // Same bounds on both sides: `add` cannot fail; if it ever did,
            // the samples would be missing from an aggregate, not wrong.
            let _ = h.add(o);
            self.sum_us = self.sum_us.saturating_add(other.sum_us);
        }
    }

    pub(crate) fn percentiles(&self) -> Percentiles {
        let Some(h) = &self.hist else {
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

    pub(crate) fn distribution(&self) -> Distribution {
        let mut buckets: Vec<(f64, u64)> =
            LATENCY_BUCKETS_SECONDS.iter().map(|b| (*b, 0)).collect();
        let Some(h) = &self.hist else {
            return Distribution {
                buckets,
                ..Distribution::default()
            };
        };
        for v in h.iter_recorded() {
            let secs = h.lowest_equivalent(v.value_iterated_to()) as f64 / 1e6;
            if let Some(b) = buckets.iter_mut().find(|(le, _)| secs <= *le) {
                b.1 += v.count_at_value();
            }
        }
        Distribution {
            count: h.len(),
            sum_seconds: self.sum_us as f64 / 1e6,
            buckets,
        }
    }
}

/// Running totals of one kind in one pool.
#[derive(Debug, Clone)]
pub(crate) struct PairTotals {
    pub(crate) counters: Counters,
    pub(crate) queue_wait: Latency,
    pub(crate) run_time: Latency,
}

/// Running totals of one kind, per pool (a job may run in a pool other
/// than its kind's). Pools are indexed as the Dispatcher indexes them; a
/// pool's entry is made on its first job of the kind.
#[derive(Debug, Clone)]
pub(crate) struct KindTotals {
    by_pool: Vec<Option<PairTotals>>,
}

impl KindTotals {
    pub(crate) fn new() -> Self {
        KindTotals {
            by_pool: Vec::new(),
        }
    }

    /// The totals of this kind in `pool`, made on first use.
    pub(crate) fn pool(&mut self, pool: usize) -> &mut PairTotals {
        if self.by_pool.len() <= pool {
            self.by_pool.resize_with(pool + 1, || None);
        }
        self.by_pool[pool].get_or_insert_with(|| PairTotals {
            counters: Counters::default(),
            queue_wait: Latency::new(),
            run_time: Latency::new(),
        })
    }

    /// The totals in `pool`, if it ever had a job of this kind.
    pub(crate) fn in_pool(&self, pool: usize) -> Option<&PairTotals> {
        self.by_pool.get(pool).and_then(Option::as_ref)
    }

    /// This kind over all pools.
    pub(crate) fn stats(&self) -> KindStats {
        let mut counters = Counters::default();
        let (mut wait, mut run) = (Latency::new(), Latency::new());
        for t in self.by_pool.iter().flatten() {
            counters.add(&t.counters);
            wait.add(&t.queue_wait);
            run.add(&t.run_time);
        }
        KindStats {
            counters,
            queue_wait_ms: wait.percentiles(),
            run_time_ms: run.percentiles(),
        }
    }
}

impl Counters {
    /// Add another set of counters to these.
    fn add(&mut self, o: &Counters) {
        self.submitted += o.submitted;
        self.started += o.started;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.retried += o.retried;
        self.dead += o.dead;
        self.cancelled += o.cancelled;
        self.timed_out += o.timed_out;
    }
}

/// Per-kind statistics of one pool, and its latency figures over all
/// kinds: what [`PoolStats`] needs beyond the pool's own gauges.
pub(crate) fn pool_breakdown<'a>(
    pool: usize,
    kinds: impl Iterator<Item = (&'a String, &'a KindTotals)>,
) -> (BTreeMap<String, PoolKindStats>, Percentiles, Percentiles) {
    let (mut wait, mut run) = (Latency::new(), Latency::new());
    let mut by_kind = BTreeMap::new();
    for (name, t) in kinds {
        let Some(t) = t.in_pool(pool) else { continue };
        wait.add(&t.queue_wait);
        run.add(&t.run_time);
        by_kind.insert(
            name.clone(),
            PoolKindStats {
                counters: t.counters,
                queue_wait: t.queue_wait.distribution(),
                run_time: t.run_time.distribution(),
            },
        );
    }
    (by_kind, wait.percentiles(), run.percentiles())
}

/// One kind within one pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolKindStats {
    /// Event counters of the kind's jobs in this pool.
    pub counters: Counters,
    /// Time from ready to started, as a histogram (not in the JSON).
    #[serde(skip)]
    pub queue_wait: Distribution,
    /// Time handlers ran, as a histogram (not in the JSON).
    #[serde(skip)]
    pub run_time: Distribution,
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
    /// Time from ready to started, over all kinds.
    pub queue_wait_ms: Percentiles,
    /// Time handlers ran, over all kinds.
    pub run_time_ms: Percentiles,
    /// The same per kind that ran here.
    pub kinds: BTreeMap<String, PoolKindStats>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_counts_each_sample_once_in_its_bucket() {
        let mut l = Latency::new();
        for us in [300, 800, 800, 20_000, 2_000_000, 7_200_000_000] {
            l.record(Duration::from_micros(us));
        }
        let d = l.distribution();
        assert_eq!(d.count, 6);
        // The sum is exact: 7_202_021_900 µs (the 2 h sample saturates the
        // histogram, not the sum).
        assert!(
            (d.sum_seconds - 7202.0219).abs() < 1e-9,
            "{}",
            d.sum_seconds
        );
        let at = |le: f64| d.buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(0.0005), 1);
        assert_eq!(at(0.001), 2);
        assert_eq!(at(0.025), 1);
        assert_eq!(at(2.5), 1);
        // The 2 h sample is recorded at the histogram's 1 h ceiling.
        assert_eq!(at(3600.0), 1);
        assert_eq!(d.buckets.iter().map(|b| b.1).sum::<u64>(), 6);
    }

    #[test]
    fn a_kind_sums_its_pools_and_a_pool_its_kinds() {
        let mut echo = KindTotals::new();
        echo.pool(0).counters.succeeded = 2;
        echo.pool(0).run_time.record(Duration::from_millis(10));
        echo.pool(2).counters.succeeded = 3;
        echo.pool(2).run_time.record(Duration::from_millis(30));
        let mut sleep = KindTotals::new();
        sleep.pool(2).counters.failed = 1;
        sleep.pool(2).run_time.record(Duration::from_millis(50));

        let k = echo.stats();
        assert_eq!(k.counters.succeeded, 5);
        assert_eq!(k.run_time_ms.count, 2);
        assert!((k.run_time_ms.max - 30.0).abs() < 0.5);

        let kinds = [("echo".to_string(), echo), ("sleep".to_string(), sleep)];
        let (by_kind, _, run) = pool_breakdown(2, kinds.iter().map(|(n, t)| (n, t)));
        assert_eq!(by_kind["echo"].counters.succeeded, 3);
        assert_eq!(by_kind["sleep"].counters.failed, 1);
        assert_eq!(run.count, 2);
        let (by_kind, _, _) = pool_breakdown(1, kinds.iter().map(|(n, t)| (n, t)));
        assert!(by_kind.is_empty(), "pool 1 ran nothing");
    }
}
