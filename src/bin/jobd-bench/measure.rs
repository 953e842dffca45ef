//! What every load mode shares: how long a run lasts (`Limit`, `Budget`),
//! what one connection records (`Recorder`), and the merged result of a run
//! (`Stats`: throughput and latency percentiles from an hdrhistogram).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;

/// Highest latency the histograms hold, in microseconds (one minute).
const MAX_US: u64 = 60_000_000;

/// How much work a run does.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// This many jobs in all.
    Count(u64),
    /// For this long, after a warm-up that is not measured.
    Time {
        /// Measured time.
        run: Duration,
        /// Unmeasured time before it.
        warmup: Duration,
    },
}

/// A run's budget, shared by its connections.
pub struct Budget {
    /// Jobs not handed out yet (`Limit::Count`).
    left: AtomicU64,
    /// When the run started.
    start: Instant,
    /// Answers before this are not measured (the warm-up).
    measure_from: Instant,
    /// No new request after this (`Limit::Time`).
    until: Option<Instant>,
}

impl Budget {
    /// A budget starting now.
    pub fn new(limit: Limit) -> Budget {
        let start = Instant::now();
        match limit {
            Limit::Count(n) => Budget {
                left: AtomicU64::new(n),
                start,
                measure_from: start,
                until: None,
            },
            Limit::Time { run, warmup } => Budget {
                left: AtomicU64::new(u64::MAX),
                start,
                measure_from: start + warmup,
                until: Some(start + warmup + run),
            },
        }
    }

    /// May one more job be sent?
    pub fn take(&self) -> bool {
        match self.until {
            Some(t) => Instant::now() < t,
            None => self
                .left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
        }
    }

    /// Does an answer that came at `at` count?
    fn counts(&self, at: Instant) -> bool {
        at >= self.measure_from && self.until.is_none_or(|u| at <= u)
    }

    /// The measured time of a run whose last answer came at `end`.
    pub fn window(&self, end: Instant) -> Duration {
        match self.until {
            Some(u) => u - self.measure_from,
            None => end - self.start,
        }
    }
}

/// What one connection (or worker) measured.
pub struct Recorder {
    /// Latency of each counted job, in microseconds.
    hist: Histogram<u64>,
    /// Jobs answered within the measured window.
    completed: u64,
    /// Answers that were errors (all of them, measured or not).
    failures: u64,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Result<Recorder> {
        Ok(Recorder {
            hist: Histogram::new_with_bounds(1, MAX_US, 3)?,
            completed: 0,
            failures: 0,
        })
    }

    /// A job sent at `sent` was answered now.
    pub fn record(&mut self, budget: &Budget, sent: Instant, ok: bool) {
        let now = Instant::now();
        if !ok {
            self.failures += 1;
        }
        if budget.counts(now) {
            let us = now.saturating_duration_since(sent).as_micros() as u64;
            self.hist.saturating_record(us.max(1));
            self.completed += 1;
        }
    }
}

/// The result of a run.
#[derive(Clone)]
pub struct Stats {
    /// Jobs answered within the measured window.
    pub completed: u64,
    /// Answers that were errors.
    pub failures: u64,
    /// The measured window.
    pub elapsed: Duration,
    /// Latencies in microseconds.
    pub hist: Histogram<u64>,
}

impl Stats {
    /// Merge the recorders of one run that ended at `end`.
    pub fn merge(budget: &Budget, end: Instant, parts: Vec<Recorder>) -> Result<Stats> {
        let mut hist = Histogram::new_with_bounds(1, MAX_US, 3)?;
        let mut completed = 0;
        let mut failures = 0;
        for p in parts {
            hist.add(&p.hist)?;
            completed += p.completed;
            failures += p.failures;
        }
        Ok(Stats {
            completed,
            failures,
            elapsed: budget.window(end),
            hist,
        })
    }

    /// Jobs per second.
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Median latency, ms.
    pub fn p50_ms(&self) -> f64 {
        self.hist.value_at_quantile(0.5) as f64 / 1000.0
    }

    /// 99th percentile latency, ms.
    pub fn p99_ms(&self) -> f64 {
        self.hist.value_at_quantile(0.99) as f64 / 1000.0
    }

    /// Slowest, ms.
    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }
}

/// The median of some numbers (the lower middle one for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(v.len() - 1) / 2]
}
