//! What a handler sees of its job (`JobContext`), and the small piece of
//! state a running attempt shares between its worker thread and the
//! Dispatcher (`AttemptShared`): who decided the attempt's outcome, and the
//! waiter that the worker may answer directly.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering, fence};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::job::JobId;
use crate::reply::DirectReply;

/// The outcome of an attempt has not been claimed yet: the handler runs.
const RUNNING: u8 = 0;
/// The worker claimed the outcome: the handler returned first.
const FINISHED: u8 = 1;
/// The Dispatcher claimed it: cancelled by a caller.
const CANCELLED: u8 = 2;
/// The Dispatcher claimed it: the attempt passed its deadline.
const TIMED_OUT: u8 = 3;
/// The Dispatcher claimed it: the runtime is shutting down past its deadline.
const ABANDONED: u8 = 4;

/// Who ended an attempt, when the Dispatcher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupt {
    Cancelled,
    TimedOut,
    Abandoned,
}

/// Shared between one running attempt's worker and the Dispatcher. Exactly
/// one side wins `claim_*`; the winner decides the outcome and answers the
/// direct waiter. This is what lets a worker reply to a caller without a
/// hop through the Dispatcher and still never double-answer a timed-out job.
pub(crate) struct AttemptShared {
    /// The job this attempt belongs to.
    pub(crate) id: JobId,
    /// 1-based attempt number.
    pub(crate) attempt: u32,
    /// True when no retry follows a failure: the worker may then answer the
    /// direct waiter with the failure too.
    pub(crate) last_attempt: bool,
    /// The job's per-attempt timeout, counted from `started`.
    timeout: Option<Duration>,
    /// When a worker started the attempt. Set by the worker: an attempt
    /// may wait in its pool's handoff slot before it starts.
    started: OnceLock<Instant>,
    /// One of RUNNING, FINISHED, CANCELLED, TIMED_OUT, ABANDONED.
    status: AtomicU8,
    /// Someone (a waiter, a dependent job) waits for this attempt's report:
    /// the worker must wake the Dispatcher when it files it.
    notify: AtomicBool,
    /// A caller blocked on this job's outcome (`Handle::call`), answered by
    /// whichever side claims the outcome.
    pub(crate) direct: Mutex<Option<DirectReply>>,
}

impl AttemptShared {
    pub(crate) fn new(
        id: JobId,
        attempt: u32,
        last_attempt: bool,
        timeout: Option<Duration>,
        direct: Option<DirectReply>,
    ) -> Self {
        AttemptShared {
            id,
            attempt,
            last_attempt,
            timeout,
            started: OnceLock::new(),
            status: AtomicU8::new(RUNNING),
            notify: AtomicBool::new(false),
            direct: Mutex::new(direct),
        }
    }

    /// Mark the attempt started (once; later calls keep the first time) and
    /// return when it started.
    pub(crate) fn start(&self) -> Instant {
        *self.started.get_or_init(Instant::now)
    }

    /// When the attempt started, if a worker started it.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started.get().copied()
    }

    /// True when the job has a timeout (the Dispatcher keeps its timer).
    pub(crate) fn has_timeout(&self) -> bool {
        self.timeout.is_some()
    }

    /// Ask the worker to wake the Dispatcher with this attempt's report
    /// (the Dispatcher; it must read the inbox once more afterwards, as the
    /// report may already be in it).
    pub(crate) fn request_notify(&self) {
        self.notify.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// True once `request_notify` was called.
    pub(crate) fn must_notify(&self) -> bool {
        self.notify.load(Ordering::SeqCst)
    }

    /// When the attempt times out: its start plus the job's timeout.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        Some(self.started()? + self.timeout?)
    }

    /// The worker's claim: true if the handler's outcome stands. Never
    /// past the deadline: the attempt timed out, whatever the handler
    /// returned (typically the error of a handler that stopped because
    /// `is_cancelled()` turned true), and the Dispatcher records it so.
    pub(crate) fn claim_finished(&self) -> bool {
        if self.deadline().is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.status
            .compare_exchange(RUNNING, FINISHED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The Dispatcher's claim: true if it ended the attempt first.
    pub(crate) fn claim_interrupt(&self, why: Interrupt) -> bool {
        let code = match why {
            Interrupt::Cancelled => CANCELLED,
            Interrupt::TimedOut => TIMED_OUT,
            Interrupt::Abandoned => ABANDONED,
        };
        self.status
            .compare_exchange(RUNNING, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Take the direct waiter, if it is still there.
    pub(crate) fn take_direct(&self) -> Option<DirectReply> {
        // A poisoned lock means a thread panicked while moving a reply in or
        // out; the Option inside is still consistent, so use it.
        match self.direct.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    fn interrupted(&self) -> bool {
        self.status.load(Ordering::Acquire) >= CANCELLED
    }
}

/// What a handler knows about the job it runs.
///
/// A synchronous handler cannot be preempted: when its job is cancelled or
/// passes its deadline, the waiters are answered at once and
/// [`is_cancelled`](JobContext::is_cancelled) turns true, but the worker
/// thread stays busy until the handler returns. Long handlers should poll
/// `is_cancelled()` (or compare `deadline()` with the clock) and return early.
pub struct JobContext<'a> {
    pub(crate) shared: &'a AttemptShared,
    pub(crate) pool: &'a str,
}

impl JobContext<'_> {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.shared.id
    }

    /// The attempt number, 1 for the first run.
    pub fn attempt(&self) -> u32 {
        self.shared.attempt
    }

    /// The pool this attempt runs on.
    pub fn pool(&self) -> &str {
        self.pool
    }

    /// When this attempt times out, if it has a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.shared.deadline()
    }

    /// True once the job was cancelled, timed out, or abandoned by a
    /// shutdown: the result will be thrown away, so stop as soon as you can.
    pub fn is_cancelled(&self) -> bool {
        self.shared.interrupted() || self.shared.deadline().is_some_and(|d| Instant::now() >= d)
    }
}
