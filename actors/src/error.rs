//! `JobError`: every way a job operation can fail, one variant per cause so
//! callers can match on it. The wire codes (`JobError::code`) are the stable
//! snake_case words of DESIGN.md.

use crate::job::{ErrorInfo, JobId, JobState};

/// Why a job operation did not produce the job's result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The handler returned an error (after all attempts).
    #[error("job {id} failed: {message}")]
    Failed {
        /// The job.
        id: JobId,
        /// The handler's error message.
        message: String,
        /// `Failed` (single attempt) or `Dead` (retries used up).
        state: JobState,
    },
    /// The handler panicked (after all attempts).
    #[error("job {id} panicked: {message}")]
    Panicked {
        /// The job.
        id: JobId,
        /// The panic message.
        message: String,
    },
    /// The job ran past its own timeout.
    #[error("job {id} timed out")]
    TimedOut {
        /// The job.
        id: JobId,
    },
    /// The job was cancelled (by a caller or because a dependency failed).
    #[error("job {id} was cancelled: {reason}")]
    Cancelled {
        /// The job.
        id: JobId,
        /// Who or what cancelled it.
        reason: String,
        /// `dependency_failed` when a job it waited for did not succeed.
        code: &'static str,
    },
    /// The caller's wait ended before the answer came; for `wait` the job
    /// goes on, for `call` it is cancelled.
    #[error("no answer within {waited_ms} ms")]
    WaitTimeout {
        /// The job waited for, if the wait was for a job.
        id: Option<JobId>,
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// The pool's `max_queued` is reached; try again later.
    #[error("pool '{pool}' is full ({max_queued} jobs waiting)")]
    QueueFull {
        /// The full pool.
        pool: String,
        /// Its limit.
        max_queued: usize,
    },
    /// No handler is registered for this kind.
    #[error("no job kind named '{0}'")]
    UnknownKind(String),
    /// No pool has this name.
    #[error("no pool named '{0}'")]
    UnknownPool(String),
    /// No job has this id (never existed, or pruned).
    #[error("no job with id {0}")]
    NotFound(String),
    /// The request itself is malformed (bad options, bad id list, …).
    #[error("{0}")]
    BadRequest(String),
    /// The runtime is shutting down, or was shut down (`Runtime::shutdown`,
    /// dropping the `Runtime`, `Handle::shutdown_async`), and takes no new
    /// work.
    #[error("jobd is shutting down")]
    ShuttingDown,
    /// The input could not be encoded or the output decoded.
    #[error("payload: {0}")]
    Payload(String),
    /// The runtime's thread is gone without a shutdown having been asked
    /// for (it crashed, or its System was stopped from outside jobd).
    #[error("the jobd runtime is gone")]
    RuntimeGone,
    /// A blocking call was made on an actix arbiter thread, where it would
    /// deadlock; use the async variant there.
    #[error("blocking jobd call on an actix arbiter thread (use the async method)")]
    OnArbiterThread,
    /// The store cannot take writes right now (disk full, I/O error).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A bug or an operating-system failure inside jobd.
    #[error("internal error: {0}")]
    Internal(String),
}

impl JobError {
    /// The stable wire code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            JobError::Failed { .. } | JobError::Panicked { .. } => "job_failed",
            JobError::TimedOut { .. } => "timed_out",
            JobError::Cancelled { code, .. } => code,
            JobError::WaitTimeout { .. } => "timeout",
            JobError::QueueFull { .. } => "queue_full",
            JobError::UnknownKind(_) => "unknown_kind",
            JobError::UnknownPool(_) => "unknown_pool",
            JobError::NotFound(_) => "not_found",
            JobError::BadRequest(_) | JobError::Payload(_) => "bad_request",
            JobError::ShuttingDown => "shutting_down",
            JobError::RuntimeGone | JobError::Unavailable(_) => "unavailable",
            JobError::OnArbiterThread | JobError::Internal(_) => "internal",
        }
    }

    /// This error as the `{code, message}` pair of the wire protocol.
    pub fn info(&self) -> ErrorInfo {
        ErrorInfo::new(self.code(), self.to_string())
    }
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The builder's declarations contradict each other.
    #[error("invalid runtime configuration: {0}")]
    Config(String),
    /// A thread could not be spawned.
    #[error("cannot spawn {what}: {source}")]
    Spawn {
        /// Which thread.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened or recovered.
    #[error("store: {0}")]
    Store(String),
    /// The runtime thread died while starting.
    #[error("the runtime thread stopped while starting")]
    Died,
}

/// Why a shutdown was not clean.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// Some handlers were still running at the deadline; their threads are
    /// left to finish on their own.
    #[error("{0} worker thread(s) still busy at the shutdown deadline")]
    WorkersBusy(usize),
    /// The runtime thread panicked.
    #[error("the runtime thread panicked")]
    Panicked,
}
