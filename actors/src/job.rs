//! The job model: ids, states, submission options and the record that
//! `status`, `wait` and `list` show. Nothing here runs a job; see
//! `dispatcher` for that.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A job's identity. Opaque to clients: on the wire it is a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(JobId)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Accept both "42" and 42: clients echo ids back as they got them, and
        // some hand-written clients send numbers.
        match Value::deserialize(d)? {
            Value::String(s) => s.parse().map_err(serde::de::Error::custom),
            Value::Number(n) => n
                .as_u64()
                .map(JobId)
                .ok_or_else(|| serde::de::Error::custom("job id must be a non-negative integer")),
            _ => Err(serde::de::Error::custom(
                "job id must be a string or a number",
            )),
        }
    }
}

/// Where a job is in its life. See DESIGN.md "Job model".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting in its pool's queue for a free worker.
    Queued,
    /// Waiting for its `run_at` time (a delay or a retry backoff).
    Delayed,
    /// A worker is running it.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Its only (or last, when `max_attempts` is 1) attempt failed.
    Failed,
    /// Cancelled before it could finish.
    Cancelled,
    /// Its only attempt ran past the job's timeout.
    TimedOut,
    /// Failed after all of its retries were used up.
    Dead,
}

impl JobState {
    /// All states, in the order of a job's life.
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Delayed,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Dead,
    ];

    /// True for states a job never leaves by itself (only `retry` moves it on).
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::Delayed | JobState::Running
        )
    }

    /// The wire name (`"timed_out"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delayed => "delayed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("no job state named '{s}'"))
    }
}

/// Exponential retry backoff: `base_ms * factor^(attempt-1)`, capped at
/// `max_ms`, minus up to 20% jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the first retry, in milliseconds.
    #[serde(default = "Backoff::default_base")]
    pub base_ms: u64,
    /// Growth factor per further retry.
    #[serde(default = "Backoff::default_factor")]
    pub factor: f64,
    /// Upper bound of any single delay, in milliseconds.
    #[serde(default = "Backoff::default_max")]
    pub max_ms: u64,
}

impl Backoff {
    fn default_base() -> u64 {
        1000
    }
    fn default_factor() -> f64 {
        2.0
    }
    fn default_max() -> u64 {
        300_000
    }

    /// The delay before retrying after failed attempt number `attempt`
    /// (1-based), before jitter.
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let ms = (self.base_ms as f64) * self.factor.max(1.0).powi(exp);
        Duration::from_millis(ms.min(self.max_ms as f64).max(0.0) as u64)
    }

    /// The delay with jitter: `nominal * (1 - j)` where `j` in `[0, 0.2)` comes
    /// from `seed` (any well-mixed number; the dispatcher uses job id and
    /// attempt so the choice is reproducible in tests).
    pub fn delay(&self, attempt: u32, seed: u64) -> Duration {
        let nominal = self.nominal_delay(attempt);
        // splitmix64 finaliser: cheap, good enough to spread retries.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let jitter = (z % 2000) as f64 / 10_000.0; // 0.0 ..< 0.2
        nominal.mul_f64(1.0 - jitter)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: Self::default_base(),
            factor: Self::default_factor(),
            max_ms: Self::default_max(),
        }
    }
}

/// Who submitted a job over the socket (from `SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// User id of the submitting process.
    pub uid: u32,
    /// Group id of the submitting process.
    pub gid: u32,
    /// Process id of the submitting process.
    pub pid: i32,
}

/// Options of one submission. Everything not set comes from the kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOptions {
    /// Run on this pool instead of the kind's.
    pub pool: Option<String>,
    /// Higher runs first; FIFO within a priority.
    pub priority: i32,
    /// Do not start before this much time has passed.
    pub delay: Option<Duration>,
    /// Deadline of each attempt, counted from its start.
    pub timeout: Option<Duration>,
    /// Attempts in all (1 = no retries). Defaults to the kind's.
    pub max_attempts: Option<u32>,
    /// Retry backoff. Defaults to the kind's.
    pub backoff: Option<Backoff>,
    /// While a job of the same kind and key is not final, submitting another
    /// answers the existing job instead.
    pub unique_key: Option<String>,
    /// Run only after all of these jobs succeeded.
    pub after: Vec<JobId>,
    /// Who submitted it (socket jobs).
    pub submitted_by: Option<Peer>,
}

impl JobOptions {
    /// Options with the given priority.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    /// Options with a start delay.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
    /// Options with a per-attempt timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Options that run the job on another pool than its kind's.
    pub fn pool(mut self, pool: impl Into<String>) -> Self {
        self.pool = Some(pool.into());
        self
    }
    /// Options with a number of attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Options with a retry backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    /// Options with a unique key.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    /// Options that make the job wait for others.
    pub fn after(mut self, ids: impl IntoIterator<Item = JobId>) -> Self {
        self.after = ids.into_iter().collect();
        self
    }
}

/// A job to submit: which handler, its input, and options.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The handler's kind name.
    pub kind: String,
    /// Input, handed to the handler.
    pub payload: Value,
    /// Submission options.
    pub options: JobOptions,
}

/// An error as recorded on a job and sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable snake_case code (`job_failed`, `timed_out`, …).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
}

impl ErrorInfo {
    /// An error with a code and a message.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        ErrorInfo {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// One attempt at running a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// When the attempt started (ms since the epoch).
    pub start: u64,
    /// When it ended, if it has.
    pub end: Option<u64>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// Everything known about a job, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job's id.
    pub id: JobId,
    /// Its kind (handler name). Shared by every job of the kind (one
    /// allocation per kind, not per job).
    pub kind: Arc<str>,
    /// The pool it runs on (shared by the pool's jobs, as `kind`).
    pub pool: Arc<str>,
    /// Where it is in its life.
    pub state: JobState,
    /// Higher runs first.
    pub priority: i32,
    /// Number of the current or last attempt (0 before the first start).
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// The input.
    pub payload: Arc<Value>,
    /// The handler's output once succeeded (boxed, as `error`).
    pub result: Option<Box<Value>>,
    /// Why it did not succeed, once final (or why the last attempt failed).
    /// Boxed: most jobs never have one, and a queued job's record should
    /// stay small.
    pub error: Option<Box<ErrorInfo>>,
    /// Each attempt's timing and error.
    pub attempts: Vec<Attempt>,
    /// Per-attempt timeout in ms, if any.
    pub timeout_ms: Option<u64>,
    /// Retry backoff.
    pub backoff: Backoff,
    /// Dedup key, if any.
    pub unique_key: Option<Box<str>>,
    /// Jobs that must succeed before this one runs.
    pub after: Box<[JobId]>,
    /// Submission time (ms since the epoch).
    pub created_at: u64,
    /// Earliest start time (ms since the epoch).
    pub run_at: u64,
    /// Start of the latest attempt.
    pub started_at: Option<u64>,
    /// When it became final.
    pub finished_at: Option<u64>,
    /// Who submitted it, for socket jobs.
    pub submitted_by: Option<Peer>,
}

impl JobRecord {
    /// The typed result of a final job, or the error its waiters get
    /// (`Failed`, `Panicked`, `TimedOut`, `Cancelled`); what the blocking
    /// `Handle::wait` returns, for a record from `wait_async` or `status`.
    /// A job that is not final yet gives `JobError::Internal`.
    pub fn outcome<O: serde::de::DeserializeOwned>(&self) -> Result<O, crate::JobError> {
        let v = crate::dispatcher::outcome_of(self)?;
        serde_json::from_value(v)
            .map_err(|e| crate::JobError::Payload(format!("cannot decode result: {e}")))
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_reads_strings_and_numbers() {
        let a: JobId = serde_json::from_str("\"42\"").unwrap();
        let b: JobId = serde_json::from_str("42").unwrap();
        assert_eq!(a, b);
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"42\"");
        assert!(serde_json::from_str::<JobId>("\"x\"").is_err());
        assert!(serde_json::from_str::<JobId>("-1").is_err());
    }

    #[test]
    fn backoff_grows_caps_and_jitters_down_by_at_most_a_fifth() {
        let b = Backoff::default();
        assert_eq!(b.nominal_delay(1), Duration::from_secs(1));
        assert_eq!(b.nominal_delay(2), Duration::from_secs(2));
        assert_eq!(b.nominal_delay(30), Duration::from_secs(300));
        for seed in 0..1000 {
            let d = b.delay(3, seed);
            assert!(
                d <= Duration::from_secs(4) && d > Duration::from_millis(3200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn states_round_trip_by_name() {
        for st in JobState::ALL {
            assert_eq!(st.as_str().parse::<JobState>().unwrap(), st);
            assert_eq!(serde_json::to_value(st).unwrap(), Value::from(st.as_str()));
        }
        assert!(!JobState::Running.is_final());
        assert!(JobState::Dead.is_final());
    }
}
